"""test.py's inputs from the checkpoint's recorded run, and the vote sizes of small lists."""
import argparse
import json

import pytest

import train
from cxr import report_inputs, run_data, train_args
from cxr.errors import UserError
from dataset import DatasetError


def flags(**given):
    values = dict(dataset=None, test_dataset_dir=None, test_image_list=None, bit_depth=None)
    return argparse.Namespace(**{**values, **given})


def test_each_input_from_flag_checkpoint_or_default(tmp_path):
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "list.txt").write_text("")
    checkpoint = {"args": {"dataset": "demo", "dataset_dir": str(tmp_path / "data"),
                           "test_image_list": str(tmp_path / "data" / "list.txt")}, "bit_depth": 12}
    inputs = report_inputs.resolve_inputs(flags(), checkpoint)
    assert inputs == {"dataset": {"value": "demo", "from": "checkpoint"},
                      "test_dataset_dir": {"value": str(tmp_path / "data" / "test"), "from": "checkpoint"},
                      "test_image_list": {"value": str(tmp_path / "data" / "list.txt"), "from": "checkpoint"},
                      "bit_depth": {"value": 12, "from": "checkpoint"}}
    # flags win, one by one
    inputs = report_inputs.resolve_inputs(flags(test_image_list="other.txt", bit_depth="16"), checkpoint)
    assert inputs["test_image_list"] == {"value": "other.txt", "from": "flag"}
    assert inputs["bit_depth"] == {"value": 16, "from": "flag"}
    assert inputs["test_dataset_dir"]["from"] == "checkpoint"
    # another data set than the recorded one: the recorded paths are not its paths
    inputs = report_inputs.resolve_inputs(flags(dataset="covid"), checkpoint)
    assert inputs["test_dataset_dir"] == {"value": "data/test", "from": "default"}
    assert inputs["test_image_list"] == {"value": "./test_COVIDx4.txt", "from": "default"}
    # bare weights record nothing: the seed's defaults
    inputs = report_inputs.resolve_inputs(flags(), {"state_dict": {}})
    assert [e["from"] for e in inputs.values()] == ["default"] * 4
    assert inputs["dataset"]["value"] == "covid" and inputs["bit_depth"]["value"] == "auto"
    # a recorded path that is not on this machine is named, with the flag to give
    moved = {"args": {**checkpoint["args"], "dataset_dir": str(tmp_path / "elsewhere")}}
    with pytest.raises(UserError, match=r"checkpoint's test dataset dir .*elsewhere/test .* --test-dataset-dir"):
        report_inputs.resolve_inputs(flags(), moved)
    assert report_inputs.resolve_inputs(flags(test_dataset_dir="here"), moved)["test_dataset_dir"]["from"] == "flag"


def test_neighbours_available_and_vote_sizes():
    patients = [f"P{i}" for i in range(15)] + ["P0"]  # 16 films, two of one patient
    assert report_inputs.neighbours_available(patients) == 14
    assert report_inputs.neighbours_available(patients, exclude_same_patient=False) == 15
    assert report_inputs.neighbours_available(["A", "B"], ["A", "C", "C", "B", "A"]) == 3
    assert report_inputs.neighbours_available(["A", "B"], ["A", "C"], exclude_same_patient=False) == 2
    lines = []
    assert report_inputs.choose_vote_ks(None, 14, lines.append) == ((1, 5, 10), [15, 20])
    assert len(lines) == 1 and "15, 20" in lines[0] and "only 14" in lines[0]
    assert report_inputs.choose_vote_ks(None, 100, lines.append) == ((1, 5, 10, 15, 20), []) and len(lines) == 1
    assert report_inputs.choose_vote_ks([7, 3, 3], 14) == ((3, 7), [])
    with pytest.raises(UserError, match="--vote-ks 15: each query has only 14"):
        report_inputs.choose_vote_ks([1, 15], 14)
    with pytest.raises(UserError, match="positive"):
        report_inputs.choose_vote_ks([0, 3], 14)
    assert report_inputs.choose_vote_k(None, (1, 5, 10)) == 10 and report_inputs.choose_vote_k(None, (1, 3)) == 3
    with pytest.raises(UserError, match="--vote-k 5 is not among"):
        report_inputs.choose_vote_k(5, (1, 3))


# ---------------------------------------------------------------- test.py on a tiny demo run
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny `train.py --dataset demo` run in a temporary folder (a small phantom set)."""
    root = tmp_path_factory.mktemp("demo_run")
    patch = pytest.MonkeyPatch()
    patch.setattr(run_data, "DEMO_DATA", dict(train_per_class=6, test_per_class=4, size=64, seed=0))
    try:
        train.main(train_args.parse_args([
            "--dataset", "demo", "--dataset-dir", str(root / "demo"), "--save-dir", str(root / "run"),
            "--epochs", "1", "--img-size", "32", "--embedding-dim", "16", "-p", "5", "-k", "2",
            "--batches-per-epoch", "2", "--workers", "0", "--eval-batch-size", "16", "--device", "cpu"]))
    finally:
        patch.undo()
    return root, root / "run" / "demo_hybrid_convnext_vit_embed_16_seed_0_best_ckpt.pth"


def run_test_py(*argv):
    import test as evaluate_cli
    return evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([*map(str, argv)]))


NUMBERS = ("recall_at_k", "map", "precision_at_k", "classification", "num_queries", "num_gallery")


def test_checkpoint_alone_evaluates_the_runs_test_list(demo_run, capsys):
    root, checkpoint = demo_run
    alone = run_test_py("--resume", checkpoint)  # no other flag
    assert alone["num_queries"] == 20
    assert {k: v["from"] for k, v in alone["inputs"].items()} == {
        "dataset": "checkpoint", "test_dataset_dir": "checkpoint", "test_image_list": "checkpoint",
        "bit_depth": "default", "vote_ks": "default"}
    assert alone["inputs"]["test_image_list"]["value"] == str(root / "demo" / "test_split.txt")
    assert "inputs: dataset demo (checkpoint)" in capsys.readouterr().out
    # the seed README's command and the fully explicit one give the same numbers
    seed = run_test_py("--resume", checkpoint, "--dataset", "demo", "--report", root / "seed.json")
    assert seed["inputs"]["dataset"]["from"] == "flag"
    explicit = run_test_py("--resume", checkpoint, "--dataset", "demo", "--test-dataset-dir",
                           root / "demo" / "test", "--test-image-list", root / "demo" / "test_split.txt",
                           "--report", root / "explicit.json")
    assert {k for k, v in explicit["inputs"].items() if v["from"] == "flag"} == {
        "dataset", "test_dataset_dir", "test_image_list"}
    for key in NUMBERS:
        assert alone[key] == seed[key] == explicit[key], key
    on_disk = json.loads(checkpoint.with_name(checkpoint.stem + "_report.json").read_text())
    assert on_disk["inputs"]["dataset"] == {"value": "demo", "from": "checkpoint"}


def test_small_list_leaves_out_default_votes_it_cannot_hold(demo_run, capsys):
    root, checkpoint = demo_run
    lines = (root / "demo" / "test_split.txt").read_text().splitlines()[:16]
    first_patient = lines[0].split()[0]
    lines[1] = " ".join([first_patient, *lines[1].split()[1:]])  # two films of one patient
    small = root / "small.txt"
    small.write_text("\n".join(lines) + "\n")
    common = ["--resume", checkpoint, "--test-image-list", small, "--report", root / "small.json", "--no-plots"]
    report = run_test_py(*common)
    assert report["num_queries"] == 16 and set(report["classification"]) == {"1", "5", "10"}
    assert report["inputs"]["vote_ks"] == {"value": [1, 5, 10], "from": "default", "left_out": [15, 20]}
    assert report["abstention"]["vote_k"] == 10
    out = capsys.readouterr().out
    assert out.count("majority votes of 15, 20 neighbours left out") == 1 and "only 14" in out
    # sizes asked for: evaluated, or an error when a query cannot hold them
    report = run_test_py(*common, "--vote-ks", "1", "3", "7")
    assert set(report["classification"]) == {"1", "3", "7"} and report["abstention"]["vote_k"] == 7
    with pytest.raises(UserError, match="--vote-ks 15: each query has only 14 neighbours"):
        run_test_py(*common, "--vote-ks", "1", "15")
    with pytest.raises(UserError, match="--vote-k 10 is not among"):
        run_test_py(*common, "--vote-ks", "1", "3", "--vote-k", "10")
    # the films of one patient kept in the ranking: 15 neighbours each
    report = run_test_py(*common, "--keep-same-patient")
    assert set(report["classification"]) == {"1", "5", "10", "15"}


def test_test_py_ends_in_one_error_line_for_a_vote_size_too_large(demo_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    root, checkpoint = demo_run
    lines = (root / "demo" / "test_split.txt").read_text().splitlines()[:16]
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "test.py"), "--resume", str(checkpoint),
                             "--test-image-list", str(tmp_path / "l.txt"), "--vote-ks", "20",
                             "--workers", "0", "--report", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --vote-ks 20: each query has only 15 neighbours")


def test_queries_in_one_list_format_against_a_gallery_in_another(demo_run):
    root, checkpoint = demo_run
    rows = [line.split() for line in (root / "demo" / "train_split.txt").read_text().splitlines()]
    gallery = root / "gallery.csv"  # the training list rewritten as CSV, the queries stay COVIDx
    gallery.write_text("filename,label,patient_id\n" + "".join(f"{r[1]},{r[2]},{r[0]}\n" for r in rows))
    common = ["--resume", checkpoint, "--gallery-dataset-dir", root / "demo" / "train", "--no-plots"]
    mixed = run_test_py(*common, "--gallery-image-list", gallery, "--gallery-dataset", "csv",
                        "--report", root / "mixed.json")
    same = run_test_py(*common, "--gallery-image-list", root / "demo" / "train_split.txt",
                       "--report", root / "same.json")
    assert mixed["protocol"] == "query-gallery" and mixed["num_gallery"] == len(rows)
    for key in NUMBERS:
        assert mixed[key] == same[key], key
    with pytest.raises(DatasetError, match="gallery.csv:1: expected .*set its format: .*--gallery-dataset"):
        run_test_py(*common, "--gallery-image-list", gallery, "--report", root / "wrong.json")
