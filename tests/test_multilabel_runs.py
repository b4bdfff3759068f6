"""End to end on multi-label phantoms in the public layouts: train.py --dataset nih --setup small
trains and keeps a best checkpoint, and test.py's numbers on NIH- and CheXpert-format copies
equal an independent recomputation from the label files as shipped (second findings, follow-up
films, lateral views left out, uncertain labels)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from cxr import train_args
from cxr.multilabel_demo import write_multilabel_demo
from test_multilabel_metrics import reference

pytestmark = pytest.mark.slow
FAST = ["--setup", "small", "--img-size", "32", "--embedding-dim", "16", "-p", "5", "-k", "2", "--epochs", "2",
        "--batches-per-epoch", "3", "--workers", "0", "--eval-batch-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    data = {layout: write_multilabel_demo(root / layout, layout, train_films=80, test_films=40, size=48,
                                          lateral_share=0.2, uncertain_share=0.3) for layout in ("nih", "chexpert")}
    save_dir = root / "run"
    train.main(train_args.parse_args(["--dataset", "nih", "--dataset-dir", str(data["nih"]),
                                      "--save-dir", str(save_dir), *FAST]))
    return data, save_dir / "nih_hybrid_convnext_vit_embed_16_seed_0_best_ckpt.pth"


def run_test_py(*argv):
    import test as evaluate_cli

    return evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([*argv, "--device", "cpu", "--workers", "0",
                                                                       "--no-plots", "--no-ood"]))


def nih_truth(folder, list_name):
    """(path name -> (findings, patient)) of a list's frontal films, read straight from the CSV."""
    with open(folder / "Data_Entry_2017.csv", newline="") as f:
        rows = {row["Image Index"]: row for row in csv.DictReader(f)}
    names = (folder / list_name).read_text().split()
    return {name: (set(rows[name]["Finding Labels"].split("|")), rows[name]["Patient ID"]) for name in names
            if rows[name]["View Position"] in ("PA", "AP")}


def chexpert_truth(folder, list_name):
    with open(folder / "CheXpert-v1.0-small" / list_name, newline="") as f:
        rows = list(csv.DictReader(f))
    observations = [c for c in rows[0] if c not in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")]
    truth = {}
    for row in rows:
        if row["Frontal/Lateral"] != "Frontal":
            continue
        # -1 (uncertain) is negative; devices are not a finding
        positive = {c for c in observations if row[c] == "1.0" and c not in ("No Finding", "Support Devices")}
        truth[Path(row["Path"]).as_posix()] = (positive or {"No Finding"}, row["Path"].split("/")[2])
    return truth


def recompute(npz, truth, key):
    """The report's numbers recomputed from the embeddings and the label files alone."""
    data = np.load(npz)
    films = [truth[key(path)] for path in data["query_paths"]]
    assert len(films) == len(truth)  # every frontal film, no lateral
    findings = sorted(set().union(*(f for f, _ in films)))
    table = np.array([[name in f for name in findings] for f, _ in films])
    return reference(data["query_embeddings"], table, q_groups=[p for _, p in films], ks=(1, 5, 10), knn_ks=(1,))


def assert_matches(report, expected):
    for metric in ("map", "map_at_r", "r_precision"):
        assert report[metric] == pytest.approx(expected[metric], abs=0.01), metric
    for k in ("1", "5", "10"):
        assert report["recall_at_k"][k] == pytest.approx(expected["recall_at_k"][k], abs=0.01)
        assert report["ndcg_at_k"][k] == pytest.approx(expected["ndcg_at_k"][k], abs=0.01)


def test_nih_training_and_report_match_a_recomputation(trained, tmp_path):
    data, checkpoint = trained
    assert checkpoint.is_file()
    state = torch.load(checkpoint, weights_only=False)
    assert state["findings"] == ["Cardiomegaly", "Effusion", "Infiltration", "No Finding", "Pneumonia"]
    records = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["best_epoch"] in (1, 2) and state["selection"] == "val_mAP"
    report = run_test_py("--resume", str(checkpoint), "--report", str(tmp_path / "r.json"),
                         "--save-dir", str(tmp_path))
    truth = nih_truth(data["nih"], "test_list.txt")
    assert report["num_queries"] == len(truth) and report["relevance"] == "any"
    assert_matches(report, recompute(report["files"]["embeddings"], truth, lambda path: Path(path).name))
    assert set(report["per_finding"]) == set(state["findings"])


def test_cross_dataset_chexpert_copy_matches_a_recomputation(trained, tmp_path, capsys):
    data, checkpoint = trained
    folder = data["chexpert"]
    report = run_test_py("--resume", str(checkpoint), "--dataset", "chexpert", "--test-dataset-dir", str(folder),
                         "--test-image-list", str(folder / "CheXpert-v1.0-small" / "valid.csv"),
                         "--report", str(tmp_path / "r.json"), "--save-dir", str(tmp_path))
    assert "differ from the checkpoint's training findings" in capsys.readouterr().out
    truth = chexpert_truth(folder, "valid.csv")
    expected = recompute(report["files"]["embeddings"], truth,
                         lambda path: Path(path).relative_to(folder).as_posix())
    assert_matches(report, expected)
    exact = run_test_py("--resume", str(checkpoint), "--dataset", "chexpert", "--test-dataset-dir", str(folder),
                        "--test-image-list", str(folder / "CheXpert-v1.0-small" / "valid.csv"), "--relevance",
                        "exact", "--report", str(tmp_path / "e.json"), "--save-dir", str(tmp_path))
    assert exact["map"] <= report["map"]  # the same set is stricter than a shared finding


def test_query_gallery_across_formats(trained, tmp_path, capsys):
    # NIH test films against a CheXpert-layout gallery: other finding names, other combinations,
    # the gallery's label file beside its own list.
    data, checkpoint = trained
    folder = data["chexpert"]
    report = run_test_py("--resume", str(checkpoint), "--gallery-dataset", "chexpert", "--gallery-dataset-dir",
                         str(folder), "--gallery-image-list", str(folder / "CheXpert-v1.0-small" / "train.csv"),
                         "--report", str(tmp_path / "g.json"), "--save-dir", str(tmp_path))
    out = capsys.readouterr().out
    assert "findings of only the test list: Effusion, Infiltration" in out
    assert report["protocol"] == "query-gallery" and report["num_gallery"] > 0
    assert set(report["findings"]) >= {"Cardiomegaly", "No Finding", "Pleural Effusion", "Effusion"}


def test_combination_training_and_paired_comparison(trained, tmp_path):
    data, findings_checkpoint = trained
    save_dir = tmp_path / "combinations"
    train.main(train_args.parse_args(["--dataset", "nih", "--dataset-dir", str(data["nih"]), "--save-dir",
                                      str(save_dir), "--label-mode", "combinations", *FAST]))
    combos = save_dir / findings_checkpoint.name
    reports = [run_test_py("--resume", str(path), "--report", str(tmp_path / f"{name}.json"), "--save-dir",
                           str(tmp_path / name)) for name, path in (("a", findings_checkpoint), ("b", combos))]
    compared = run_test_py("--compare", reports[0]["files"]["embeddings"], reports[1]["files"]["embeddings"],
                           "--bootstrap", "50", "--report", str(tmp_path / "c.json"))
    entry = compared["comparison"]["map"]
    assert entry["difference"] == pytest.approx(reports[0]["map"] - reports[1]["map"], abs=1e-6)
    assert compared["relevance"] == "any"
