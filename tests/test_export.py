"""Checkpoints a cluster can hold: the best checkpoint as a hard link or weights-only, the
safetensors export every program reads, and resuming from weights only as a warm start."""
import json
import os

import pytest
import torch

import export
import test as test_program
import train
from cxr import checkpoints, engine
from cxr.checkpoints import load_checkpoint, load_trained_model
from cxr.errors import UserError
from cxr.ood_detector import default_detector_path
from test_train import ckpt, phantoms, read_metrics, tiny_args  # noqa: F401  (the phantoms fixture)


def scripted_validation(monkeypatch, values):
    """train.evaluate replaced by fixed validation mAPs, one per evaluation (epoch 0 first)."""
    calls = {"val": 0, "test": 0}

    def fake_evaluate(model, loader, args, runtime, split, keep=None):
        value = values[calls[split]] if split == "val" else 1.0
        calls[split] += 1
        return {f"{split}_R@1": value, f"{split}_mAP": value, f"{split}_mP@1": value}
    monkeypatch.setattr(engine, "evaluate", fake_evaluate)


def full_states(folder):
    return sorted(p.name for p in folder.glob("*.pth")
                  if "optimizer" in torch.load(p, weights_only=True))


def test_best_is_a_link_to_its_epoch_then_weights_only_once_that_epoch_is_pruned(phantoms, tmp_path,
                                                                              monkeypatch):
    scripted_validation(monkeypatch, [0.0, 10.0, 30.0, 20.0, 25.0])  # epoch 2 is best
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "2", "--keep-checkpoints", "1"))
    assert os.path.samefile(ckpt(tmp_path, "best"), ckpt(tmp_path, "epoch_2"))  # no second copy
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "4", "--keep-checkpoints", "1",
                         "--resume", str(ckpt(tmp_path, "epoch_2"))))
    assert full_states(tmp_path) == [ckpt(tmp_path, "epoch_4").name]  # one full state in the folder
    best = torch.load(ckpt(tmp_path, "best"), weights_only=True)
    assert best["epoch"] == 2 and best["weights_only"] and "optimizer" not in best
    assert best["selection"] == "val_mAP" and best["model_config"] and best["classes"]
    model, _, _ = load_trained_model(ckpt(tmp_path, "best"), "cpu")  # evaluable as before
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_kill_before_the_best_link_is_repaired_on_resume(phantoms, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.0, 10.0, 5.0])
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1"))
    ckpt(tmp_path, "best").unlink()  # as if killed between the epoch save and the link
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "2", "--resume", "auto"))
    assert os.path.samefile(ckpt(tmp_path, "best"), ckpt(tmp_path, "epoch_1"))


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_run")
    train.main(tiny_args(phantoms, folder, "--epochs", "1"))
    return folder


def test_export_writes_safetensors_that_embed_as_the_checkpoint(trained, tmp_path):
    out = export.main(export.get_args_parser().parse_args([str(ckpt(trained, "best")),
                                                           "--out", str(tmp_path / "model.safetensors")]))
    description = json.loads((tmp_path / "model.json").read_text())
    assert description["model_config"]["name"] == "hybrid_convnext_vit" and description["classes"]
    full_size, weights_size = ckpt(trained, "best").stat().st_size, out.stat().st_size
    assert weights_size < 0.5 * full_size  # no optimiser state
    original, checkpoint, fingerprint = load_trained_model(ckpt(trained, "best"), "cpu")
    exported, described, exported_fingerprint = load_trained_model(out, "cpu")
    assert exported_fingerprint == fingerprint  # the OOD detector and the index accept it
    assert described["bit_depth"] == checkpoint["bit_depth"] and described["args"] == checkpoint["args"]
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(original(images), exported(images))


def test_test_py_evaluates_the_exported_file_with_the_checkpoints_numbers(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    checkpoints.export_safetensors(load_checkpoint(ckpt(trained, "best")), out)

    def report(path, name):
        args = test_program.get_args_parser().parse_args([
            "--resume", str(path), "--device", "cpu", "--workers", "0",
            "--report", str(tmp_path / f"{name}.json"), "--bootstrap", "0"])
        test_program.main(args)
        return json.loads((tmp_path / f"{name}.json").read_text())
    a, b = report(ckpt(trained, "best"), "checkpoint"), report(out, "exported")
    assert a["map"] == b["map"] and a["recall_at_k"] == b["recall_at_k"]


def test_export_copies_the_ood_detector_that_test_py_then_uses(trained, tmp_path, capsys):
    from test_retrieve import save_detector
    checkpoint = tmp_path / "run" / "best.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(ckpt(trained, "best").read_bytes())
    out = tmp_path / "deploy" / "model.safetensors"
    export.main(export.get_args_parser().parse_args([str(checkpoint), "--out", str(out)]))
    assert "no OOD detector" in capsys.readouterr().out and not default_detector_path(out).exists()
    save_detector(checkpoint, load_trained_model(checkpoint, "cpu")[2], threshold=-10.0)  # flags every query
    export.main(export.get_args_parser().parse_args([str(checkpoint), "--out", str(out)]))
    assert default_detector_path(out).read_bytes() == default_detector_path(checkpoint).read_bytes()
    report = test_program.main(test_program.get_args_parser().parse_args([
        "--resume", str(out), "--device", "cpu", "--workers", "0", "--report", str(tmp_path / "r.json")]))
    assert report["ood"]["detector"] == str(default_detector_path(out))
    assert report["ood"]["flagged_share"]["mahalanobis"] == 1.0


def test_model_card_holds_the_checkpoints_and_the_reports_numbers(trained, tmp_path):
    checkpoint = tmp_path / "run" / "best.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(ckpt(trained, "best").read_bytes())
    out = tmp_path / "deploy" / "model.safetensors"
    export.main(export.get_args_parser().parse_args([str(checkpoint), "--out", str(out)]))
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "No test report was given" in card and "Synthetic phantoms" not in card  # a covid-format run
    state = torch.load(checkpoint, weights_only=True)
    assert f"mAP {state['metrics']['val_mAP']:.1f}" in card  # the selection numbers, from the checkpoint
    report = test_program.main(test_program.get_args_parser().parse_args([
        "--resume", str(checkpoint), "--device", "cpu", "--workers", "0", "--bootstrap", "20",
        "--report", str(tmp_path / "run" / "best_report.json")]))
    export.main(export.get_args_parser().parse_args([str(checkpoint), "--out", str(out)]))  # finds the report
    card = (out.parent / "MODEL_CARD.md").read_text()
    interval = report["confidence_intervals"]["map"]
    assert f"| mAP | {report['map']:.1f} [{interval['low']:.1f}, {interval['high']:.1f}] |" in card
    for name, c in report["per_class"]["classes"].items():
        assert f"| {name} | {c['queries']} | {c['recall_at_1']:.1f} | {c['ap']:.1f} |" in card
    parameters = sum(v.numel() for v in state["model"].values()) / 1e6
    assert f"parameters: {parameters:.1f} M" in card and "| recipe |" in card and "Intended use" in card
    assert report["lists"]["train"]["sha256"][:16] in card and "No OOD detector" in card
    # a run on the phantoms says so at the top
    state["args"]["dataset"] = "demo"
    torch.save(state, tmp_path / "run" / "demo.pth")
    export.main(export.get_args_parser().parse_args([str(tmp_path / "run" / "demo.pth"),
                                                     "--out", str(tmp_path / "demo" / "m.safetensors")]))
    assert "Warning: trained on synthetic phantoms" in (tmp_path / "demo" / "MODEL_CARD.md").read_text()
    assert "permuted labels" not in (tmp_path / "demo" / "MODEL_CARD.md").read_text()
    state["args"]["shuffle_labels"] = True  # the data-randomisation floor says what it is
    torch.save(state, tmp_path / "run" / "shuffled.pth")
    export.main(export.get_args_parser().parse_args([str(tmp_path / "run" / "shuffled.pth"),
                                                     "--out", str(tmp_path / "shuffled" / "m.safetensors")]))
    assert "**Trained on permuted labels**" in (tmp_path / "shuffled" / "MODEL_CARD.md").read_text()


def test_resume_from_weights_only_is_a_warm_start(phantoms, trained, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    checkpoints.export_safetensors(load_checkpoint(ckpt(trained, "best")), out)
    train.main(tiny_args(phantoms, tmp_path / "warm", "--epochs", "1", "--resume", str(out)))
    assert "warm start" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(tmp_path / "warm")] == [0, 1]  # a new run from epoch 1
    with pytest.raises(SystemExit, match="was trained with another model: --embedding-dim 16"):
        train.main(tiny_args(phantoms, tmp_path / "other", "--epochs", "1", "--resume", str(out),
                             "--embedding-dim", "8"))  # other flags: named
    with pytest.raises(SystemExit, match="a warm start from weights is a new run"):
        train.main(tiny_args(phantoms, tmp_path / "warm", "--epochs", "1", "--resume", str(out)))


def test_export_refuses_a_file_without_a_model_config(tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(UserError, match="needs a checkpoint written by train.py"):
        export.main(export.get_args_parser().parse_args([str(bare), "--out", str(tmp_path / "x.safetensors")]))
    with pytest.raises(UserError, match="without this repository's model description"):
        from safetensors.torch import save_file
        save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
        load_checkpoint(tmp_path / "foreign.safetensors")
