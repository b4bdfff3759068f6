"""End-to-end: train.py and test.py on small phantom sets, resume, DDP, bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import demo_data
import train
from conftest import ROOT

TINY = ["--dataset", "covid", "--convnext-name", "convnextv2_atto", "--vit-name",
        "vit_tiny_patch16_224", "--img-size", "32", "--embedding-dim", "16", "--no-pretrained",
        "-p", "5", "-k", "2", "--workers", "0", "--eval-batch-size", "16", "--lr", "1e-3",
        "--batches-per-epoch", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "demo"
    demo_data.write_demo_dataset(root, train_per_class=6, test_per_class=5, size=64, seed=0)
    return root


def tiny_args(phantoms, save_dir, *extra):
    return train.parse_args([*TINY, "--dataset-dir", str(phantoms),
                             "--train-image-list", str(phantoms / "train_split.txt"),
                             "--test-image-list", str(phantoms / "test_split.txt"),
                             "--save-dir", str(save_dir), *extra])


def read_metrics(save_dir):
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def ckpt(save_dir, tag):
    return Path(save_dir) / f"covid_hybrid_convnext_vit_embed_16_seed_0_{tag}_ckpt.pth"


def test_train_writes_full_checkpoints_metrics_and_report(phantoms, tmp_path):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "2"))
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for key in ("train_loss", "active_triplets", "R@1", "mAP", "lr", "images_per_s", "time_s"):
        assert key in records[-1]
    state = torch.load(ckpt(tmp_path, "epoch_2"), weights_only=True)
    for key in ("model", "model_config", "classes", "epoch", "optimizer", "scheduler", "scaler",
                "rng_states", "args", "best_metric", "format_version"):
        assert key in state
    assert state["classes"] == sorted(demo_data.CLASSES) and state["epoch"] == 2
    assert ckpt(tmp_path, "best").exists() and json.loads((tmp_path / "args.json").read_text())["epochs"] == 2

    import test as evaluate_cli
    report_path = tmp_path / "report.json"
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_2")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0",
        "--report", str(report_path), "--device", "cpu"]))
    on_disk = json.loads(report_path.read_text())
    assert set(on_disk) == {"checkpoint", "model", "embedding_dim", "classes", "num_queries",
                            "num_gallery", "protocol", "recall_at_k", "map", "precision_at_k",
                            "classification"}
    assert on_disk["protocol"] == "leave-one-out" and on_disk["num_queries"] == 25
    assert set(on_disk["classification"]) == {"1", "5", "10", "15", "20"}
    assert on_disk["map"] == pytest.approx(records[-1]["mAP"], abs=1e-3)  # same model, same metric
    assert report["recall_at_k"]["1"] == pytest.approx(records[-1]["R@1"], abs=1e-3)
    assert (tmp_path / f"{ckpt(tmp_path, 'epoch_2').stem}_embeddings.npz").exists()

    # query-gallery: test queries against the training database
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_2")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
        "--gallery-dataset-dir", str(phantoms / "train"),
        "--gallery-image-list", str(phantoms / "train_split.txt"), "--report", str(report_path)]))
    assert report["protocol"] == "query-gallery" and report["num_gallery"] == 30

    with pytest.raises(SystemExit, match="contradict the checkpoint"):
        evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
            "--resume", str(ckpt(tmp_path, "epoch_2")), "--embedding-dim", "1024"]))

    # the seed's bare state dict, described by flags
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": state["model"]}, bare)
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(bare), "--model", "hybrid_convnext_vit", "--embedding-dim", "16",
        "--img-size", "32", "--convnext-name", "convnextv2_atto", "--vit-name", "vit_tiny_patch16_224",
        "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu"]))
    assert report["map"] == pytest.approx(on_disk["map"], abs=1e-3)

    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "1"))


def test_resume_reproduces_the_uninterrupted_run(phantoms, tmp_path):
    train.main(tiny_args(phantoms, tmp_path / "full", "--epochs", "3"))
    # What a 3-epoch run killed after epoch 1 leaves behind, continued in a new folder.
    train.main(tiny_args(phantoms, tmp_path / "resumed", "--epochs", "3",
                         "--resume", str(ckpt(tmp_path / "full", "epoch_1"))))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [2, 3]
    for before, after in zip(full[2:], resumed):
        for key in ("train_loss", "active_triplets", "R@1", "mAP", "lr"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key


def test_resume_errors(phantoms, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train.main(tiny_args(phantoms, tmp_path, "--resume", str(tmp_path / "missing.pth")))
    train.main(tiny_args(phantoms, tmp_path / "a", "--epochs", "1"))
    with pytest.raises(SystemExit, match="trained with"):
        train.main(tiny_args(phantoms, tmp_path / "b", "--embedding-dim", "32",
                             "--resume", str(ckpt(tmp_path / "a", "epoch_1"))))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(phantoms, tmp_path, monkeypatch):
    real_forward = train.TripletMarginLoss.forward
    calls = {"n": 0}

    def poisoned(self, embeddings, labels):
        calls["n"] += 1
        loss, active = real_forward(self, embeddings, labels)
        return (loss * float("nan") if calls["n"] > 2 else loss), active  # epoch 2 diverges

    monkeypatch.setattr(train.TripletMarginLoss, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 2"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", "--print-freq", "1"))
    good = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not ckpt(tmp_path, "epoch_2").exists()


def test_batch_geometry_rules():
    args = train.parse_args(["--batch-size", "16", "-p", "4"])
    assert (args.labels_per_batch, args.samples_per_label, args.batch_size) == (4, 4, 16)
    args = train.parse_args(["--batch-size", "48"])  # the paper's P = 3 for COVIDx
    assert (args.labels_per_batch, args.samples_per_label) == (3, 16)
    with pytest.raises(SystemExit, match="contradicts"):
        train.parse_args(["--batch-size", "16", "-p", "3", "-k", "4"])
    args = train.parse_args(["--batch-size", "16"])  # the seed's command: K = 16 // 3
    assert (args.labels_per_batch, args.samples_per_label, args.batch_size) == (3, 5, 15)
    with pytest.raises(SystemExit, match="smaller than"):
        train.parse_args(["--batch-size", "2", "-p", "3"])
    demo = train.parse_args(["--dataset", "demo"])
    assert demo.convnext_name == "convnextv2_atto" and demo.pretrained is False
    assert train.parse_args(["--dataset", "demo", "--pretrained"]).pretrained is True


SEED_TRAIN = [
    "--model hybrid_convnext_vit --embedding-dim 1024 --dataset covid --dataset-dir ./data "
    "--train-image-list ./train_split.txt --test-image-list ./test_COVIDx4.txt --epochs 50 "
    "--lr 0.0001 --batch-size 16",
    "--model hybrid_convnext_vit --embedding-dim 1024 --labels-per-batch 3 --samples-per-label 16 "
    "--epochs 100 --lr 0.0001 --margin 0.2 --rand-resize --save-dir ./checkpoints/hybrid",
    "--model hybrid_convnext_vit --embedding-dim 1024 --resume ./checkpoints/hybrid/checkpoint_epoch_50.pth",
    "--model convnextv2 --embedding-dim 1024 --batch-size 8 --samples-per-label 8 --workers 2",
]
SEED_TEST = [
    "--model hybrid_convnext_vit --embedding-dim 1024 --dataset covid --test-dataset-dir ./data/test "
    "--test-image-list ./test_COVIDx4.txt --resume ./checkpoints/best_model.pth --eval-batch-size 64",
]


@pytest.mark.parametrize("command", SEED_TRAIN)
def test_seed_readme_train_commands_parse(command):
    if "--batch-size 8 --samples-per-label 8" in command:  # P defaults to 3: 3 x 8 != 8
        with pytest.raises(SystemExit, match="contradicts"):
            train.parse_args(command.split())
        return
    args = train.parse_args(command.split())
    assert args.model in ("hybrid_convnext_vit", "convnextv2") and args.embedding_dim == 1024


@pytest.mark.parametrize("command", SEED_TEST)
def test_seed_readme_test_command_parses(command):
    import test as evaluate_cli
    args = evaluate_cli.get_args_parser().parse_args(command.split())
    assert args.eval_batch_size == 64 and args.test_dataset_dir == "./data/test"


def run_cli(args, cwd, timeout=600, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_two_process_ddp_on_gloo(phantoms, tmp_path):
    result = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      "29517", str(ROOT / "train.py"), *TINY, "--dataset-dir", str(phantoms),
                      "--train-image-list", str(phantoms / "train_split.txt"),
                      "--test-image-list", str(phantoms / "test_split.txt"),
                      "--save-dir", str(tmp_path), "--epochs", "2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]  # rank 0 alone writes
    state = torch.load(ckpt(tmp_path, "epoch_2"), weights_only=True)
    assert len(state["rng_states"]) == 2  # one per rank
    # the gathered evaluation equals a single-process evaluation of the same weights
    import test as evaluate_cli
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_2")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
        "--report", str(tmp_path / "r.json")]))
    assert report["map"] == pytest.approx(records[-1]["mAP"], abs=1e-3)


def test_killed_run_leaves_loadable_checkpoints_and_resumes(phantoms, tmp_path):
    args = [str(ROOT / "train.py"), *TINY, "--dataset-dir", str(phantoms),
            "--train-image-list", str(phantoms / "train_split.txt"),
            "--test-image-list", str(phantoms / "test_split.txt"),
            "--save-dir", str(tmp_path), "--epochs", "30"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt(tmp_path, "epoch_2").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = list(tmp_path.glob("*_ckpt.pth"))
    assert len(checkpoints) >= 2
    for path in checkpoints:  # whatever was on disk at the kill is complete
        torch.load(path, weights_only=True)
    last = max(torch.load(p, weights_only=True)["epoch"] for p in checkpoints)
    result = run_cli([*args[:-1], str(last + 1), "--resume", str(ckpt(tmp_path, f"epoch_{last}"))],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path)[-1]["epoch"] == last + 1
