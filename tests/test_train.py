"""End-to-end: train.py and test.py on small phantom sets, resume, DDP, bad inputs."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT
from cxr import demo_dataset, engine, phantom, recipe, train_args
from cxr.errors import UserError
from cxr.runtime import Runtime, resolve_amp
from loss import TripletMarginLoss
from model import build_model

TINY = ["--dataset", "covid", "--convnext-name", "convnextv2_atto", "--vit-name",
        "vit_tiny_patch16_224", "--img-size", "32", "--embedding-dim", "16", "--no-pretrained",
        "-p", "5", "-k", "2", "--workers", "0", "--eval-batch-size", "16", "--lr", "1e-3",
        "--batches-per-epoch", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "demo"
    demo_dataset.write_demo_dataset(root, train_per_class=6, test_per_class=5, size=64, seed=0)
    return root


def tiny_args(phantoms, save_dir, *extra):
    return train_args.parse_args([*TINY, "--dataset-dir", str(phantoms),
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
    for key in ("train_loss", "train_triplet", "train_id", "active_triplets", "embedding_spread",
                "val_R@1", "val_mAP", "test_R@1", "test_mAP", "lr", "images_per_s", "time_s", "best_epoch"):
        assert key in records[-1]
    assert "R@1" not in records[-1] and "mAP" not in records[-1]  # every number names its split
    state = torch.load(ckpt(tmp_path, "epoch_2"), weights_only=True)
    for key in ("model", "model_config", "classes", "epoch", "optimizer", "scheduler", "scaler",
                "rng_states", "args", "best_metric", "format_version", "criterion", "best_epoch"):
        assert key in state
    assert state["classes"] == sorted(phantom.CLASSES) and state["epoch"] == 2
    assert ckpt(tmp_path, "best").exists() and json.loads((tmp_path / "args.json").read_text())["epochs"] == 2

    import test as evaluate_cli
    report_path = tmp_path / "report.json"
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_2")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0",
        "--report", str(report_path), "--device", "cpu"]))
    on_disk = json.loads(report_path.read_text())
    assert set(on_disk) >= {"checkpoint", "model", "embedding_dim", "classes", "num_queries",
                            "num_gallery", "protocol", "recall_at_k", "map", "precision_at_k",
                            "classification"}
    assert on_disk["protocol"] == "leave-one-out" and on_disk["num_queries"] == 25
    assert set(on_disk["classification"]) == {"1", "5", "10", "15", "20"}
    assert on_disk["map"] == pytest.approx(records[-1]["test_mAP"], abs=1e-3)  # same model, same metric
    assert report["recall_at_k"]["1"] == pytest.approx(records[-1]["test_R@1"], abs=1e-3)
    assert (tmp_path / f"{ckpt(tmp_path, 'epoch_2').stem}_test_split_embeddings.npz").exists()
    assert (tmp_path / "learning_curves.png").exists()

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
        "--resume", str(bare), "--model", "hybrid_convnext_vit", "--embedding-dim", "16", "--neck", "bn",
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
        for key in ("train_loss", "active_triplets", "val_mAP", "test_R@1", "test_mAP", "lr"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key


def test_resume_errors(phantoms, tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        train.main(tiny_args(phantoms, tmp_path, "--resume", str(tmp_path / "missing.pth")))
    train.main(tiny_args(phantoms, tmp_path / "a", "--epochs", "1"))
    with pytest.raises(SystemExit, match="trained with"):
        train.main(tiny_args(phantoms, tmp_path / "b", "--embedding-dim", "32",
                             "--resume", str(ckpt(tmp_path / "a", "epoch_1"))))
    with pytest.raises(SystemExit, match="another loss"):
        train.main(tiny_args(phantoms, tmp_path / "b", "--id-loss-weight", "0", "--epochs", "2",
                             "--resume", str(ckpt(tmp_path / "a", "epoch_1"))))
    for flags, named in ((["--soft-margin"], "--soft-margin False -> True"),
                         (["--margin", "0.3"], "--margin 0.2 -> 0.3"),
                         (["--mining", "batch_hard"], "--mining batch_all -> batch_hard"),
                         (["--shuffle-labels"], "--shuffle-labels False -> True")):
        with pytest.raises(SystemExit, match=named):
            train.main(tiny_args(phantoms, tmp_path / "b", *flags, "--epochs", "2",
                                 "--resume", str(ckpt(tmp_path / "a", "epoch_1"))))
    # a checkpoint of the seed's recipe saved before --neck and the identity loss existed
    train.main(tiny_args(phantoms, tmp_path / "c", "--epochs", "1", "--recipe", "seed"))
    old = torch.load(ckpt(tmp_path / "c", "epoch_1"), weights_only=True)
    del old["model_config"]["neck"], old["criterion"], old["best_epoch"]
    torch.save(old, tmp_path / "old.pth")
    train.main(tiny_args(phantoms, tmp_path / "d", "--epochs", "2", "--recipe", "seed",
                         "--resume", str(tmp_path / "old.pth")))
    assert [r["epoch"] for r in read_metrics(tmp_path / "d")] == [2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(phantoms, tmp_path, monkeypatch):
    real_forward = TripletMarginLoss.forward
    calls = {"n": 0}

    def poisoned(self, embeddings, labels):
        calls["n"] += 1
        loss, active = real_forward(self, embeddings, labels)
        return (loss * float("nan") if calls["n"] > 2 else loss), active  # epoch 2 diverges

    monkeypatch.setattr(TripletMarginLoss, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 2"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", "--print-freq", "1",
                             "--branch-loss-weight", "0"))  # one triplet loss per step
    good = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not ckpt(tmp_path, "epoch_2").exists()


def test_batch_geometry_rules():
    args = train_args.parse_args(["--batch-size", "16", "-p", "4"])
    assert (args.labels_per_batch, args.samples_per_label, args.batch_size) == (4, 4, 16)
    args = train_args.parse_args(["--batch-size", "48"])  # the paper's P = 3 for COVIDx
    assert (args.labels_per_batch, args.samples_per_label) == (3, 16)
    with pytest.raises(SystemExit, match="contradicts"):
        train_args.parse_args(["--batch-size", "16", "-p", "3", "-k", "4"])
    args = train_args.parse_args(["--batch-size", "16"])  # the seed's command: K = 16 // 3
    assert (args.labels_per_batch, args.samples_per_label, args.batch_size) == (3, 5, 15)
    with pytest.raises(SystemExit, match="smaller than"):
        train_args.parse_args(["--batch-size", "2", "-p", "3"])
    demo = train_args.parse_args(["--dataset", "demo"])
    assert demo.convnext_name == "convnextv2_atto" and demo.pretrained is False
    pretrained = train_args.parse_args(["--dataset", "demo", "--pretrained"])
    assert pretrained.pretrained is True and pretrained.vit_stem == "patch"  # conv stem: from scratch only
    assert demo.vit_stem == "conv" and demo.fusion == "norm" and demo.branch_loss_weight == 0.5
    with pytest.raises(SystemExit, match="--vit-stem conv has no pre-trained weights"):
        train_args.parse_args(["--dataset", "demo", "--pretrained", "--vit-stem", "conv"])


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
            train_args.parse_args(command.split())
        return
    args = train_args.parse_args(command.split())
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
    assert report["map"] == pytest.approx(records[-1]["test_mAP"], abs=1e-3)
    # test.py under torchrun: each rank embeds a shard, rank 0 reports the same numbers
    result = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                      str(ROOT / "test.py"), "--resume", str(ckpt(tmp_path, "epoch_2")),
                      "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
                      str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
                      "--eval-batch-size", "4", "--report", str(tmp_path / "r2.json")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = json.loads((tmp_path / "r2.json").read_text())
    assert distributed["num_queries"] == 25
    for key in ("recall_at_k", "precision_at_k"):
        assert distributed[key] == pytest.approx(report[key], abs=1e-9), key
    for k, row in report["classification"].items():
        assert distributed["classification"][k]["confusion_matrix"] == row["confusion_matrix"], k
    assert distributed["map"] == pytest.approx(report["map"], abs=1e-9)


def test_ddp_gradients_are_views_of_the_all_reduce_buckets(monkeypatch):
    """train.py's DDP wrapper (runtime.distributed_module): after a backward pass every gradient of
    a channels-last model is a view into DDP's buckets, so no gradient is copied into its bucket
    each step (tested in a one-process gloo group; the view check fails without the flag)."""
    import torch.distributed as dist

    from cxr.runtime import Runtime, distributed_module
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 2))
        model = model.to(memory_format=torch.channels_last)
        wrapped = distributed_module(model, Runtime(torch.device("cpu"), 0, 2))
        wrapped(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
        assert all(p.grad is not None and p.grad._base is not None for p in model.parameters())
        plain = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))  # the default: copies
        plain(torch.randn(2, 3)).sum().backward()
        assert all(p.grad._base is None for p in plain.module.parameters())
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_with_channels_last_trains(phantoms, tmp_path):
    result = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      "29519", str(ROOT / "train.py"), *TINY, "--dataset-dir", str(phantoms),
                      "--train-image-list", str(phantoms / "train_split.txt"),
                      "--test-image-list", str(phantoms / "test_split.txt"), "--channels-last",
                      "--save-dir", str(tmp_path), "--epochs", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "channels_last=True" in result.stdout and [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1]
    assert "bucket view strides" not in result.stderr + result.stdout


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


def test_best_checkpoint_follows_validation_not_test(phantoms, tmp_path, monkeypatch):
    # Scripted numbers where validation and test disagree: epoch 2 is best on validation,
    # epoch 1 on test. The kept checkpoint must be epoch 2.
    scripted = {"val": [5.0, 10.0, 30.0, 20.0], "test": [5.0, 50.0, 10.0, 40.0]}
    calls = {"val": 0, "test": 0}

    def fake_evaluate(model, loader, args, runtime, split, keep=None):
        value = scripted[split][calls[split]]
        calls[split] += 1
        return {f"{split}_R@1": value, f"{split}_mAP": value, f"{split}_mP@1": value}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "3"))
    assert torch.load(ckpt(tmp_path, "best"), weights_only=True)["epoch"] == 2
    assert [r["best_epoch"] for r in read_metrics(tmp_path)[1:]] == [1, 2, 2]


def test_shuffled_labels_train_on_permuted_labels_and_keep_the_validation_ones(phantoms, tmp_path, monkeypatch):
    seen = {}

    def sampler(labels, *rest, **options):  # the training labels the PK batches are drawn from
        seen.setdefault("labels", []).append(list(labels))
        return real_sampler(labels, *rest, **options)

    real_sampler = train.PKSampler
    monkeypatch.setattr(train, "PKSampler", sampler)
    real_load = train.load_data
    monkeypatch.setattr(train, "load_data", lambda *a: seen.setdefault("data", []).append(real_load(*a))
                        or seen["data"][-1])
    train.main(tiny_args(phantoms, tmp_path / "true", "--epochs", "1"))
    train.main(tiny_args(phantoms, tmp_path / "shuffled", "--epochs", "1", "--shuffle-labels"))
    true, shuffled = seen["labels"]
    assert sorted(true) == sorted(shuffled) and true != shuffled  # every class keeps its count
    data_true, data_shuffled = seen["data"]
    assert data_true.train_set.paths == data_shuffled.train_set.paths  # the same images, other labels
    assert torch.equal(data_true.val_set.targets, data_shuffled.val_set.targets)  # validation keeps its own
    assert torch.load(ckpt(tmp_path / "shuffled", "best"), weights_only=False)["args"]["shuffle_labels"] is True
    train.shuffle_labels(data_true.train_set, seed=0)  # seeded: the same permutation again
    assert data_true.train_set.targets.tolist() == shuffled


def test_validation_fraction_zero_selects_on_test_with_a_warning(phantoms, tmp_path, capsys):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1", "--val-fraction", "0"))
    out = capsys.readouterr().out
    assert "chosen on the test list" in out and "optimistic" in out
    record = read_metrics(tmp_path)[-1]
    assert "val_mAP" not in record and "test_mAP" in record
    assert torch.load(ckpt(tmp_path, "best"), weights_only=True)["selection"] == "test_mAP"


def test_validation_list_and_split_sizes(phantoms, tmp_path, capsys):
    train.main(tiny_args(phantoms, tmp_path / "a", "--epochs", "1"))
    assert "train: 20 images, validation: 10, test: 25" in capsys.readouterr().out
    # an explicit validation list (here the test list, images in the test folder)
    train.main(tiny_args(phantoms, tmp_path / "b", "--epochs", "1",
                         "--val-image-list", str(phantoms / "test_split.txt"),
                         "--val-dataset-dir", str(phantoms / "test"), "--allow-patient-overlap"))
    assert "train: 30 images, validation: 25, test: 25" in capsys.readouterr().out
    record = read_metrics(tmp_path / "b")[-1]
    assert record["val_mAP"] == pytest.approx(record["test_mAP"])  # the same images


def test_overwrite_keeps_the_new_runs_checkpoints(phantoms, tmp_path):
    # An older, longer run in the same folder: its epochs 48-50 must not crowd out the new ones.
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1"))
    old = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    for epoch in (48, 49, 50):
        torch.save({**old, "epoch": epoch}, ckpt(tmp_path, f"epoch_{epoch}"))
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", "--keep-checkpoints", "2", "--overwrite"))
    for epoch in (2, 3):
        assert torch.load(ckpt(tmp_path, f"epoch_{epoch}"), weights_only=True)["epoch"] == epoch
    assert not ckpt(tmp_path, "epoch_1").exists()  # pruned: the new run's oldest
    assert all(ckpt(tmp_path, f"epoch_{e}").exists() for e in (48, 49, 50))  # not ours: untouched
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_partial_accumulation_group_is_averaged_over_its_own_size(monkeypatch):
    seen = []

    def fake_step(objective, optimizer, scheduler, scaler, images, labels, args, accum_steps=1, step_now=True,
                  guard=None, step=0):
        seen.append((accum_steps, step_now))
        zero = torch.zeros(())
        return zero, {"triplet": zero, "id": zero, "active": zero, "spread": zero}

    class Objective(torch.nn.Module):
        pass

    monkeypatch.setattr(engine, "train_step", fake_step)
    args = train_args.parse_args(["--dataset", "demo", "--grad-accum", "2", "--device", "cpu"])
    loader = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))] * 5
    engine.train_one_epoch(Objective(), None, None, None, loader, 1, args, Runtime(torch.device("cpu")))
    assert seen == [(2, False), (2, True), (2, False), (2, True), (1, True)]


def test_collapse_warning():
    args = train_args.parse_args(["--dataset", "demo"])
    healthy = {"epoch": 3, "active_triplets": 0.4, "train_triplet": 0.1, "embedding_spread": 1.1}
    assert recipe.collapse_warning(healthy, args) is None
    pinned = {**healthy, "active_triplets": 1.0, "train_triplet": 0.2}
    assert "collapsed at epoch 3" in recipe.collapse_warning(pinned, args)
    soft = train_args.parse_args(["--dataset", "demo", "--soft-margin"])
    assert recipe.collapse_warning(healthy, soft) is None
    # a collapsed soft-margin batch costs log 2 with no triplet counted as violated
    assert "collapsed" in recipe.collapse_warning({**healthy, "active_triplets": 0.0,
                                                  "train_triplet": 0.6931}, soft)
    shrunk = {**healthy, "embedding_spread": 0.01}
    assert "--recipe strong" in recipe.collapse_warning(shrunk, args)


def test_recipes_and_help_show_both_setups(capsys):
    seed = train_args.parse_args(["--recipe", "seed"])
    assert (seed.optimizer, seed.lr, seed.schedule, seed.mining, seed.neck, seed.id_loss_weight,
            seed.weight_decay, seed.backbone_lr_mult) == ("adam", 1e-4, "constant", "batch_hard", "none",
                                                         0.0, 0.0, 1.0)
    strong = train_args.parse_args(["--dataset", "demo"])
    assert (strong.neck, strong.mining, strong.optimizer) == ("bn", "batch_all", "adamw")
    assert train_args.parse_args(["--recipe", "seed", "--lr", "3e-4"]).lr == 3e-4  # flags win
    with pytest.raises(SystemExit):
        train_args.get_args_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "paper: 384; --dataset demo: 64" in text and "--recipe seed: batch_hard" in text
    assert "[default: 0.1]" in text  # --val-fraction


def test_amp_auto_by_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_amp("auto", "cuda") == expected
        assert resolve_amp("auto", "cuda:0") == expected
    assert resolve_amp("auto", "cpu") == "none"
    assert resolve_amp("fp16", "cpu") == "fp16"


def test_user_mistakes_end_in_one_error_line(tmp_path):
    for script, args in (("train.py", ["--dataset", "covid", "--dataset-dir", str(tmp_path / "none"),
                                       "--no-pretrained", "--device", "cpu"]),
                         ("test.py", ["--resume", str(tmp_path / "missing.pth")]),
                         ("retrieve.py", ["query", "--index", str(tmp_path), "--resume", str(tmp_path / "m.pth"),
                                          "x.png", "--out", str(tmp_path / "q")])):
        result = run_cli([str(ROOT / script), *args], cwd=tmp_path, timeout=120)
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    debug = run_cli([str(ROOT / "test.py"), "--resume", str(tmp_path / "missing.pth")], cwd=tmp_path,
                    timeout=120, **{})
    assert "HYBRID_DEBUG=1" in debug.stderr
    env = dict(os.environ, HYBRID_DEBUG="1", PYTHONPATH=str(ROOT))
    shown = subprocess.run([sys.executable, str(ROOT / "test.py"), "--resume", str(tmp_path / "missing.pth")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_split_of_one_patient_per_class_is_scored_with_a_warning(monkeypatch, capsys):
    embeddings = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    monkeypatch.setattr(engine, "extract_embeddings", lambda *a, **k: (embeddings, labels))
    loader = type("Loader", (), {"dataset": type("Data", (), {"patients": list("aaabbb")})()})()
    args = train_args.parse_args(["--dataset", "demo"])
    result = engine.evaluate(None, loader, args, Runtime(torch.device("cpu")), "val")
    assert 0 <= result["val_mAP"] <= 100  # no crash: every relevant image is the query's patient's
    assert "scored with same-patient images" in capsys.readouterr().out
    monkeypatch.setattr(engine, "extract_embeddings", lambda *a, **k: (embeddings, labels))
    loader.dataset.patients = list("abcdef")
    assert engine.evaluate(None, loader, args, Runtime(torch.device("cpu")), "val")["val_mAP"] > 0


def test_hybrid_logs_branch_losses_and_shares_and_test_reports_them(phantoms, tmp_path):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1"))  # strong recipe: branch losses at 0.5
    record = read_metrics(tmp_path)[-1]
    for key in ("train_branch_convnext", "train_branch_vit"):
        assert record[key] > 0
    for split in ("val", "test"):
        assert record[f"{split}_convnext_share"] + record[f"{split}_vit_share"] == pytest.approx(100, abs=0.02)
    state = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    assert state["model_config"]["branch_heads"] and state["branch_criteria"]
    assert any(k.startswith("branch_heads.vit") for k in state["model"])

    import test as evaluate_cli
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_1")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
        "--report", str(tmp_path / "report.json")]))
    shares = report["branch_attribution"]
    assert set(shares) == {"convnext", "vit"} and sum(shares.values()) == pytest.approx(100, abs=0.02)
    assert shares["vit"] == pytest.approx(record["test_vit_share"], abs=0.05)  # one definition


def test_checkpoint_saved_before_the_fusion_options_evaluates_unchanged(phantoms, tmp_path):
    """A config without fusion / mxa / ViT-stem keys rebuilds the paper's fusion."""
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1", "--fusion", "seed", "--vit-stem", "patch",
                         "--branch-loss-weight", "0"))
    state = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    assert "branch_criteria" in state and not state["branch_criteria"]
    for key in ("fusion", "mxa", "vit_patch_size", "vit_stem", "branch_heads"):
        del state["model_config"][key]
    torch.save(state, tmp_path / "old.pth")
    import test as evaluate_cli
    reports = [evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(path), "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
        "--report", str(tmp_path / f"{path.stem}.json")]))
        for path in (ckpt(tmp_path, "epoch_1"), tmp_path / "old.pth")]
    assert reports[0]["map"] == reports[1]["map"]
    assert reports[0]["branch_attribution"] == reports[1]["branch_attribution"]
    # resuming it under today's defaults (another fusion) names the flags that give its model
    with pytest.raises(SystemExit, match="--fusion seed"):
        train.main(tiny_args(phantoms, tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "old.pth")))


def test_position_embeddings_and_tokens_get_no_weight_decay(phantoms, tmp_path):
    args = tiny_args(phantoms, tmp_path, "--model", "vit")
    model = build_model(**train_args.model_config(args), pretrained=False)
    objective = recipe.ModelWithLoss(model, recipe.build_criterion(args, 5), torch.device("cpu"), "none")
    optimizer = recipe.build_optimizer(objective, args, torch.device("cpu"))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(objective.named_parameters())
    assert decay_of[id(named["model.branch.backbone.pos_embed"])] == 0.0
    assert decay_of[id(named["model.branch.backbone.cls_token"])] == 0.0
    assert decay_of[id(named["model.branch.backbone.blocks.0.attn.qkv.weight"])] == args.weight_decay > 0


def test_run_saved_before_the_token_decay_exemption_resumes(phantoms, tmp_path):
    """Its optimiser state has the old parameter groups; the resume rebuilds them."""
    train.main(tiny_args(phantoms, tmp_path / "a", "--epochs", "1"))
    state = torch.load(ckpt(tmp_path / "a", "epoch_1"), weights_only=True)
    args = tiny_args(phantoms, tmp_path / "x")
    model = build_model(**train_args.model_config(args), pretrained=False)
    criterion = recipe.build_criterion(args, 5)
    branch = torch.nn.ModuleDict({b: recipe.build_criterion(args, 5) for b in model.BRANCHES})
    objective = recipe.ModelWithLoss(model, criterion, torch.device("cpu"), "none", branch, 0.5)
    old_optimizer = recipe.build_optimizer(objective, args, torch.device("cpu"), grouping=1)
    assert len(old_optimizer.param_groups[0]["params"]) != len(state["optimizer"]["param_groups"][0]["params"])
    state["optimizer"] = old_optimizer.state_dict()
    del state["param_grouping"]
    torch.save(state, tmp_path / "old.pth")
    train.main(tiny_args(phantoms, tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "old.pth")))
    resumed = torch.load(ckpt(tmp_path / "b", "epoch_2"), weights_only=True)
    assert resumed["param_grouping"] == 1  # the run keeps its groups to the end


def test_vit_patch_size_mistakes_are_one_error_line(phantoms, tmp_path):
    for flags, message in ((["--vit-patch-size", "12"], "divide --img-size"),
                           (["--vit-patch-size", "0"], "must be positive"),
                           (["--vit-stem", "conv", "--vit-patch-size", "24", "--img-size", "96"],
                            "power of two")):
        with pytest.raises(SystemExit, match=message):
            tiny_args(phantoms, tmp_path, *flags)


@pytest.mark.slow
def test_compiled_training_saves_plain_weights_that_test_py_loads(phantoms, tmp_path):
    """--compile (torch.compile; inductor on the CPU): the run trains and its checkpoint holds the
    uncompiled model's weights (no `_orig_mod.` prefixes), which test.py evaluates."""
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1", "--compile"))
    state = torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)
    assert state["args"]["compile"] and not any(k.startswith("_orig_mod.") for k in state["model"])
    import test as evaluate_cli
    report = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(ckpt(tmp_path, "epoch_1")), "--test-dataset-dir", str(phantoms / "test"),
        "--test-image-list", str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu",
        "--report", str(tmp_path / "r.json")]))
    assert report["map"] == pytest.approx(read_metrics(tmp_path)[-1]["test_mAP"], abs=1e-3)


def test_a_run_logged_to_a_file_has_no_bar_redraws_and_readable_lines(phantoms, tmp_path):
    """--progress auto in a pipe (a cluster job's log): plain timestamped lines, numbers rounded,
    the arguments wrapped; metrics.jsonl keeps every digit."""
    result = run_cli([str(ROOT / "train.py"), *TINY, "--dataset-dir", str(phantoms),
                      "--train-image-list", str(phantoms / "train_split.txt"),
                      "--test-image-list", str(phantoms / "test_split.txt"),
                      "--save-dir", str(tmp_path), "--epochs", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "\r" not in log
    lines = result.stdout.splitlines()
    start = lines.index("arguments:")
    arguments = list(itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1:]))
    assert len(arguments) >= 6 and all(len(line) <= 100 for line in arguments)  # one group a line, wrapped
    assert any(line.startswith("  model: model=hybrid_convnext_vit") for line in arguments)
    record_line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch 1  train_loss ")
    epoch_line = next((line for line in lines if record_line.match(line)), None)
    assert epoch_line is not None, result.stdout[-2000:]
    assert re.search(r"epoch 1: 2/2 in \d+ s", result.stdout)  # the phase's own line
    value = read_metrics(tmp_path)[-1]["val_mAP"]
    assert f"val_mAP {value:.4g}" in epoch_line and len(repr(value)) > len(f"{value:.4g}")
