"""Every user mistake ends in one `error:` line and exit code 2, never a traceback; every
program's --help shows --debug, which brings the traceback back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import TINY, phantoms  # noqa: F401  (the phantoms fixture)

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("train.py", "test.py", "ood.py", "explain.py", "retrieve.py", "chexmask.py", "export.py",
            "demo_data.py", "ood_probes.py")


def run(*argv, env=None):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYBRID_DEBUG": "0", **(env or {})})


def assert_one_error_line(result, *phrases):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error:"), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_help_shows_debug(program):
    result = run(program, "--help")
    assert result.returncode == 0 and "--debug" in result.stdout, result.stdout + result.stderr


def test_more_labels_per_batch_than_classes(phantoms, tmp_path):
    argv = [*TINY, "--dataset-dir", str(phantoms), "--train-image-list", str(phantoms / "train_split.txt"),
            "--test-image-list", str(phantoms / "test_split.txt"), "--save-dir", str(tmp_path), "-p", "6"]
    result = run("train.py", *argv)
    assert_one_error_line(result, "P (--labels-per-batch) = 6", "use -p 5 or fewer")
    debug = run("train.py", *argv, "--debug", "--overwrite")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows where


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert_one_error_line(run("export.py", str(tmp_path / "notes.pth")), "cannot load checkpoint")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bare.pth")
    assert_one_error_line(run("export.py", str(tmp_path / "bare.pth")), "written by train.py")


def test_a_cache_dir_that_cannot_be_created(phantoms, tmp_path):
    (tmp_path / "file").write_text("")
    argv = [*TINY, "--dataset-dir", str(phantoms), "--train-image-list", str(phantoms / "train_split.txt"),
            "--test-image-list", str(phantoms / "test_split.txt"), "--save-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "file" / "cache")]
    assert_one_error_line(run("train.py", *argv), "--cache-dir", "cannot create the cache folder")


def test_demo_data_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "other.txt").write_text("someone's file")
    assert_one_error_line(run("demo_data.py", "--out", str(tmp_path)), str(tmp_path))
    assert (tmp_path / "other.txt").read_text() == "someone's file"  # nothing lost


@pytest.mark.parametrize("argv, phrase", [
    (["test.py", "--resume", "no_such.pth"], "no such checkpoint file"),
    (["ood.py", "--resume", "no_such.pth"], "no such checkpoint file"),
    (["explain.py", "--resume", "no_such.pth", "--image", "x.png", "--out", "o"], "--image x.png: no such file"),
    (["retrieve.py", "query", "--index", "no_such_index", "--resume", "no_such.pth", "x.png", "--out", "o"],
     "no_such"),
    (["chexmask.py", "to-png", "no_such.csv", "--out", "o"], "no_such.csv"),
])
def test_a_missing_input_is_one_error_line_in_every_program(tmp_path, argv, phrase):
    result = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HYBRID_DEBUG": "0"})
    assert_one_error_line(result, phrase)
