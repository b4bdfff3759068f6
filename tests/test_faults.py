"""Faults: SIGKILL at random moments (checkpoint writes included), clean stops on SIGTERM and
Ctrl-C, corrupt checkpoints, --resume auto, non-finite steps, unwritable and full save folders."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT
from cxr import faults, train_args
from cxr.cli import run_cli
from cxr.errors import RunStopped, UserError
from loss import TripletMarginLoss
from test_train import TINY, ckpt, phantoms, read_metrics, tiny_args  # noqa: F401 (fixture)

KILLS = 20
KILL_LOOP_EPOCHS = 14
SAVE_PAUSE_S = 0.2  # HYBRID_SAVE_PAUSE_S: the finished temporary file waits this long before its rename


def train_command(phantoms, save_dir, epochs, *extra):
    return [sys.executable, str(ROOT / "train.py"), *TINY, "--dataset-dir", str(phantoms),
            "--train-image-list", str(phantoms / "train_split.txt"),
            "--test-image-list", str(phantoms / "test_split.txt"),
            "--save-dir", str(save_dir), "--epochs", str(epochs), *extra]


def start(command, log, **env):
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=log.parent,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def wait_for(condition, process, timeout=120):
    """Poll until condition() or the process ends; True when the condition came first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the training process neither reached the point nor ended")


def newest_epoch(save_dir):
    return max((faults._epoch_of(p) for p in Path(save_dir).glob("*_epoch_*_ckpt.pth")), default=0)


def epochs_logged(log):
    """Epochs this process finished (metrics lines of epoch 1 and later in its log)."""
    return sum(1 for line in log.read_text().splitlines()
               if line.startswith('{"epoch"') and not line.startswith('{"epoch": 0,'))


def comparable(record):
    return {k: v for k, v in record.items() if k not in ("time_s", "train_time_s", "images_per_s")}


@pytest.mark.slow
def test_kill_loop_loses_nothing_and_ends_with_the_uninterrupted_weights(phantoms, tmp_path, capsys):
    """SIGKILL the run 20 times at seeded random moments: during start-up, mid-epoch, and inside
    checkpoint writes (the temporary file is watched for, then the kill lands before its
    rename). After every kill each checkpoint on disk must load; `--resume auto` continues.
    The finished run must equal an uninterrupted one bit for bit, and metrics.jsonl must hold
    one line per epoch."""
    reference = start(train_command(phantoms, tmp_path / "reference", KILL_LOOP_EPOCHS),
                      tmp_path / "reference.log")
    save_dir = tmp_path / "killed"
    command = train_command(phantoms, save_dir, KILL_LOOP_EPOCHS, "--resume", "auto")
    rng = random.Random(0)
    counts = {"kills": 0, "in_checkpoint_write": 0, "before_first_epoch": 0, "checkpoints_on_disk_after_kills": 0,
              "partial_files_cleaned": 0}
    started, verified = time.time(), set()
    for cycle in range(KILLS):
        log = tmp_path / f"cycle{cycle}.log"
        process = start(command, log, HYBRID_SAVE_PAUSE_S=str(SAVE_PAUSE_S))
        started_at = time.time()
        mode = rng.choice(("start-up", "mid-epoch", "checkpoint write", "checkpoint write"))
        if cycle == 0:  # the first kill lands before any checkpoint exists
            mode = "start-up"
        if newest_epoch(save_dir) >= KILL_LOOP_EPOCHS - 3:  # near the end: kills that cannot finish it
            mode = rng.choice(("start-up", "first checkpoint write"))
        if mode == "start-up":  # importing, reading lists, building the model, epoch-0 evaluation
            delay = rng.uniform(0.0, 5.0)
            wait_for(lambda: time.time() - started_at > delay or epochs_logged(log) >= 1, process)
        elif mode == "mid-epoch":  # after this process saved an epoch: training, evaluating or saving
            first = newest_epoch(save_dir)
            wait_for(lambda: newest_epoch(save_dir) > first, process)
            delay = time.time() + rng.uniform(0.0, 1.0)
            wait_for(lambda: time.time() > delay or newest_epoch(save_dir) > first + 1, process)
        else:
            nth = 1 if mode == "first checkpoint write" else rng.choice((1, 2, 3, 4))
            seen = set()

            def writing():
                seen.update(p.name for p in save_dir.glob(".*_ckpt.pth.tmp*"))
                return len(seen) >= nth

            wait_for(writing, process)
            time.sleep(rng.uniform(0.0, SAVE_PAUSE_S * 0.8))
        assert process.poll() is None, f"cycle {cycle}: the run ended before its kill:\n{log.read_text()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait()
        counts["kills"] += 1
        partial = list(save_dir.glob(".*_ckpt.pth.tmp*"))
        counts["in_checkpoint_write"] += bool(partial)
        counts["partial_files_cleaned"] += len(partial)
        checkpoints = sorted(save_dir.glob("*_ckpt.pth"))
        counts["before_first_epoch"] += not checkpoints
        for path in checkpoints:  # whatever was on disk at the kill is complete
            stat = path.stat()
            identity = (path.name, stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if identity not in verified:  # a file loaded after an earlier kill is unchanged since
                state = torch.load(path, map_location="cpu", weights_only=True)
                # An epoch file is a full state; the best is its hard link or, once that epoch
                # is pruned, weights-only (export.py).
                assert state["epoch"] >= 1 and ("optimizer" in state or
                                                (path.name.endswith("_best_ckpt.pth") and state["weights_only"]))
                verified.add(identity)
            counts["checkpoints_on_disk_after_kills"] += 1
    killed_at = newest_epoch(save_dir)
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(save_dir.glob(".*.tmp*"))  # the resumed run cleaned up after the kills
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    ours, theirs = read_metrics(save_dir), read_metrics(tmp_path / "reference")
    assert [r["epoch"] for r in ours] == list(range(KILL_LOOP_EPOCHS + 1))  # none missing, none twice
    assert [comparable(r) for r in ours] == [comparable(r) for r in theirs]
    for tag in (f"epoch_{KILL_LOOP_EPOCHS}", "best"):
        a = torch.load(ckpt(save_dir, tag), weights_only=True)
        b = torch.load(ckpt(tmp_path / "reference", tag), weights_only=True)
        assert a["epoch"] == b["epoch"], tag
        for key in b["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (tag, key)  # bit for bit
        assert a.get("weights_only") == b.get("weights_only"), tag
        for index, state in b.get("optimizer", {"state": {}})["state"].items():
            for name, value in state.items():
                assert torch.equal(a["optimizer"]["state"][index][name], value), (tag, index, name)
    summary = {**counts, "distinct_checkpoint_files_loaded": len(verified),
               "epochs_done_before_the_last_start": killed_at,
               "seconds": round(time.time() - started)}
    with capsys.disabled():
        print(f"\nkill loop: {json.dumps(summary)}")
    assert counts["kills"] == KILLS and counts["in_checkpoint_write"] >= 3 and killed_at >= 5


def run_train(args, cwd, **env):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_cleanly_and_print_the_resume_command(phantoms, tmp_path):
    save_dir = tmp_path / "run"
    command = train_command(phantoms, save_dir, 30)
    for signum, expected_code, rounds in ((signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 1)):
        log = tmp_path / f"{signum.name}.log"
        process = start(command, log)
        before = newest_epoch(save_dir)
        wait_for(lambda: newest_epoch(save_dir) > before, process)
        process.send_signal(signum)
        assert process.wait(timeout=120) == expected_code, log.read_text()[-3000:]
        out = log.read_text()
        assert f"stopped by {signum.name}" in out and "Traceback" not in out, out[-3000:]
        last = newest_epoch(save_dir)
        assert f"the last completed epoch, {last}, is saved in {ckpt(save_dir, f'epoch_{last}')}" in out
        state = torch.load(ckpt(save_dir, f"epoch_{last}"), weights_only=True)
        assert state["epoch"] == last and not list(save_dir.glob(".*.tmp*"))
        resume = out.split("Continue with:\n")[1].splitlines()[0].strip()
        assert resume.startswith("python ") and resume.endswith("--resume auto") and "--epochs 30" in resume
        command = resume.split()[1:]  # the printed command, run as printed
        command = [sys.executable, *command]
    # the printed command continues the run to its end (here: cut to two more epochs)
    command[command.index("--epochs") + 1] = str(last + 2)
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continuing from {ckpt(save_dir, f'epoch_{last}')}" in result.stdout
    assert [r["epoch"] for r in read_metrics(save_dir)] == list(range(last + 3))


def test_corrupt_checkpoints_are_named_and_resume_auto_passes_over_them(phantoms, tmp_path, capsys):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "2"))
    good = ckpt(tmp_path, "epoch_2").read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 3])
    for name, message in (("empty.pth", "empty \\(0 bytes\\)"), ("cut.pth", "truncated, corrupt")):
        with pytest.raises(UserError, match=f"--resume .*{name}: .*{message}.*--resume auto"):
            train.main(tiny_args(phantoms, tmp_path / "other", "--epochs", "3", "--resume", str(tmp_path / name)))
        import test as evaluate_cli
        with pytest.raises(UserError, match=f"{name}: .*{message}"):
            evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
                ["--resume", str(tmp_path / name), "--device", "cpu"]))
    # the newest checkpoint of the run is cut off (a disk that filled up under a copy)
    ckpt(tmp_path, "epoch_2").write_bytes(good[:1000])
    capsys.readouterr()
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", "--resume", "auto"))
    out = capsys.readouterr().out
    assert f"passes over --resume {ckpt(tmp_path, 'epoch_2')}" in out
    assert f"continuing from {ckpt(tmp_path, 'epoch_1')}" in out
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # epoch 2 was logged twice: once kept
    torch.load(ckpt(tmp_path, "epoch_3"), weights_only=True)
    # every checkpoint unreadable: an error, nothing deleted
    for path in tmp_path.glob("*_epoch_*_ckpt.pth"):
        path.write_bytes(b"")
    with pytest.raises(UserError, match="none of the 3 checkpoints"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "4", "--resume", "auto"))
    assert len(read_metrics(tmp_path)) == 4


def test_resume_auto_in_an_empty_folder_starts_a_new_run(phantoms, tmp_path):
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1", "--resume", "auto"))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1]


def test_trim_metrics_keeps_one_line_per_epoch_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 0}, {"epoch": 1, "v": "old"}, {"epoch": 1, "v": "new"}, {"epoch": 2}, {"epoch": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "trai')  # cut by a kill
    faults.trim_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 0}, {"epoch": 1, "v": "new"}, {"epoch": 2}]
    faults.trim_metrics(path, 3, {"epoch": 3, "from": "checkpoint"})  # a line lost: the checkpoint's
    assert json.loads(path.read_text().splitlines()[-1]) == {"epoch": 3, "from": "checkpoint"}


# One triplet loss per step, so that the poisoned call number is a step number (the hybrid's
# per-branch losses call it three times a step).
ONE_LOSS = ("--branch-loss-weight", "0")


def poison(monkeypatch, at_call, gradient_only=False):
    """The triplet loss becomes NaN at its `at_call`-th call (epoch 2, step 1 with 2 steps an
    epoch), or keeps a finite value with a NaN gradient."""
    real_forward = TripletMarginLoss.forward
    calls = {"n": 0}

    def poisoned(self, embeddings, labels):
        calls["n"] += 1
        loss, active = real_forward(self, embeddings, labels)
        if calls["n"] == at_call:
            if gradient_only:  # d sqrt(x) / dx at 0 is inf; times 0: NaN, while the value stays
                loss = loss + (embeddings.sum() * 0.0).sqrt()
            else:
                loss = loss * float("nan")
        return loss, active

    monkeypatch.setattr(TripletMarginLoss, "forward", poisoned)


@pytest.mark.parametrize("gradient_only", [False, True])
def test_non_finite_step_stops_naming_step_files_and_last_checkpoint(phantoms, tmp_path, monkeypatch,
                                                                     gradient_only):
    poison(monkeypatch, 3, gradient_only)
    with pytest.raises(faults.NonFiniteError) as error:
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", *ONE_LOSS))
    message = str(error.value)
    assert "at epoch 2, step 1 of 2" in message and ".png (line " in message
    assert f"last good checkpoint is {ckpt(tmp_path, 'epoch_1')} (epoch 1)" in message
    assert "--skip-nonfinite" in message and not ckpt(tmp_path, "epoch_2").exists()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1]


def test_skip_nonfinite_skips_and_counts_the_step(phantoms, tmp_path, monkeypatch):
    poison(monkeypatch, 3)
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "3", "--skip-nonfinite", *ONE_LOSS))
    records = read_metrics(tmp_path)
    assert [r.get("train_skipped_steps") for r in records[1:]] == [0, 1, 0]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records[1:])
    state = torch.load(ckpt(tmp_path, "epoch_3"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_unwritable_or_full_save_folder_fails_before_training(phantoms, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--save-dir .*a_file/run cannot be written"):
        train.main(tiny_args(phantoms, tmp_path / "a_file" / "run", "--epochs", "1"))
    real = faults.shutil.disk_usage
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda p: real(p)._replace(free=50 * 2 ** 20))
    with pytest.raises(UserError, match="GiB free, but a checkpoint of this run takes about"):
        train.main(tiny_args(phantoms, tmp_path / "full", "--epochs", "1"))
    assert not list((tmp_path / "full").glob("*_ckpt.pth"))


def test_failed_save_keeps_the_previous_checkpoint_and_says_so(phantoms, tmp_path, monkeypatch):
    real_save, saves = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # epoch 1 wrote its best and epoch files; then the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunStopped, match=r"could not write checkpoint .*No space left.*are intact"):
        train.main(tiny_args(phantoms, tmp_path, "--epochs", "3"))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(ckpt(tmp_path, "epoch_1"), weights_only=True)["epoch"] == 1
    assert torch.load(ckpt(tmp_path, "best"), weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp*"))


def test_missing_pretrained_weights_are_all_named_in_one_message(tmp_path, monkeypatch):
    from model import PretrainedWeightsError, build_model, create_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-cache"))
    names = dict(convnext_name="convnextv2_atto", vit_name="vit_tiny_patch16_224", img_size=64)
    with pytest.raises(PretrainedWeightsError) as error:
        build_model("hybrid_convnext_vit", embedding_dim=8, pretrained=True, weights_dir=str(tmp_path), **names)
    message = str(error.value)
    assert "missing for 2 backbone(s)" in message
    assert f"'convnextv2_atto': no convnextv2_atto.safetensors (or .pth) in {tmp_path}" in message
    assert f"'vit_tiny_patch16_224': no vit_tiny_patch16_224.safetensors (or .pth) in {tmp_path}" in message
    assert "--no-pretrained" in message
    torch.save(create_backbone("convnextv2_atto").state_dict(), tmp_path / "convnextv2_atto.pth")
    with pytest.raises(PretrainedWeightsError, match="missing for 1 backbone") as error:
        build_model("hybrid_convnext_vit", embedding_dim=8, pretrained=True, weights_dir=str(tmp_path), **names)
    assert "convnextv2_atto" not in str(error.value).split("Either")[0]
    with pytest.raises(PretrainedWeightsError, match="the weights file .*nope.pth does not exist"):
        build_model("hybrid_convnext_vit", embedding_dim=8, pretrained=True, weights_dir=str(tmp_path),
                    vit_weights=str(tmp_path / "nope.pth"), **names)


def test_user_mistakes_end_in_one_error_line_and_debug_shows_the_traceback(phantoms, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-cache"))
    (tmp_path / "bad.txt").write_text("P1 only-two-fields\n")
    cases = {
        "missing list file": (["--train-image-list", str(tmp_path / "nope.txt")], "image list not found"),
        "malformed line": (["--train-image-list", str(tmp_path / "bad.txt")], "bad.txt:1: expected"),
        "missing --resume file": (["--resume", str(tmp_path / "nope.pth")], "no such checkpoint file"),
        "missing pretrained weights": (["--pretrained"], "pretrained weights are missing for 2"),
    }
    for name, (flags, message) in cases.items():
        args = [*TINY, "--dataset-dir", str(phantoms), "--train-image-list", str(phantoms / "train_split.txt"),
                "--test-image-list", str(phantoms / "test_split.txt"), "--save-dir", str(tmp_path / name),
                *flags]
        monkeypatch.setattr(sys, "argv", ["train.py", *args])
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: train.main(train_args.parse_args()))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 9, (name, err)
    monkeypatch.setattr(sys, "argv", ["train.py", *args, "--debug"])
    with pytest.raises(Exception, match="pretrained weights are missing"):  # the exception itself
        run_cli(lambda: train.main(train_args.parse_args()))
