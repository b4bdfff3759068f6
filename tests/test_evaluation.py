"""Tests for report_stats.py (bootstrap, paired comparison, per-class, abstention), splits.py
(leakage checks, provenance) and test.py's outputs built on them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_MODEL
from cxr import demo_dataset, phantom, report_stats, splits, train_args
from cxr.errors import UserError
from cxr.retrieval_metrics import evaluate_retrieval

KS, VOTE_KS = (1, 5, 10), (1, 5, 10)


def clustered(n_patients, images_per_patient=3, n_classes=3, dim=8, seed=0, noise=0.6):
    """Embeddings of patients, each a few noisy films of one point near its class centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = rng.integers(0, n_classes, n_patients)
    patient_points = centres[labels] + noise * rng.standard_normal((n_patients, dim))
    patient = np.repeat(np.arange(n_patients), images_per_patient)
    x = patient_points[patient] + 0.3 * rng.standard_normal((len(patient), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels[patient], np.array([f"P{p}" for p in patient])


def per_query_of(x, y, groups, **kwargs):
    return evaluate_retrieval(x, y, query_groups=groups, ks=KS, vote_ks=VOTE_KS,
                              return_per_query=True, **kwargs)


# ---------------------------------------------------------------- bootstrap

def test_point_estimates_are_the_reported_metrics():
    x, y, groups = clustered(40)
    report, per_query = per_query_of(x, y, groups)
    estimates = report_stats.point_estimates(per_query)
    for k in KS:
        assert estimates[("recall_at_k", str(k))] == pytest.approx(report["recall_at_k"][str(k)], abs=1e-9)
        assert estimates[("precision_at_k", str(k))] == pytest.approx(report["precision_at_k"][str(k)], abs=1e-9)
    assert estimates[("map",)] == pytest.approx(report["map"], abs=1e-9)
    for k in VOTE_KS:
        row = report["classification"][str(k)]
        assert estimates[("classification", str(k), "accuracy")] == pytest.approx(row["accuracy"], abs=1e-9)
        assert estimates[("classification", str(k), "f1_macro")] == pytest.approx(row["f1_macro"], abs=1e-9)


def interval_widths(result):
    return {"R@1": result["recall_at_k"]["1"], "mAP": result["map"],
            "mP@5": result["precision_at_k"]["5"],
            "accuracy": result["classification"]["5"]["accuracy"],
            "f1": result["classification"]["5"]["f1_macro"]}


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_patients():
    widths = []
    for n_patients in (30, 480):
        x, y, groups = clustered(n_patients, seed=1)
        _, per_query = per_query_of(x, y, groups)
        result = report_stats.bootstrap(per_query, groups, n_resamples=400, seed=0)
        assert result["patients"] == n_patients and result["resamples"] == 400
        entries = interval_widths(result)
        for name, entry in entries.items():
            assert entry["low"] <= entry["estimate"] <= entry["high"], name
        widths.append({name: entry["high"] - entry["low"] for name, entry in entries.items()})
    for name in widths[0]:
        assert widths[1][name] < 0.6 * widths[0][name], name  # 16x the patients: about 1/4 the width


def test_bootstrap_resamples_patients_not_images():
    # Three near-identical films per patient: resampling films pretends to have 3x the data.
    x, y, groups = clustered(60, images_per_patient=3, seed=2)
    _, per_query = per_query_of(x, y, groups)
    by_patient = report_stats.bootstrap(per_query, groups, 600, seed=0)
    by_image = report_stats.bootstrap(per_query, None, 600, seed=0)
    assert by_image["patients"] == len(y)
    def width(r):
        return r["classification"]["5"]["accuracy"]["high"] - r["classification"]["5"]["accuracy"]["low"]
    assert width(by_patient) > 1.2 * width(by_image)


def test_bootstrap_is_seeded_and_blocked(monkeypatch):
    x, y, groups = clustered(20, seed=3)
    _, per_query = per_query_of(x, y, groups)
    first = report_stats.bootstrap(per_query, groups, 50, seed=7)
    assert report_stats.bootstrap(per_query, groups, 50, seed=7) == first
    monkeypatch.setattr(report_stats, "_WEIGHTS_PER_BLOCK", 100)  # one or two resamples per block
    blocked = report_stats.bootstrap(per_query, groups, 50, seed=7)
    assert blocked["map"]["estimate"] == first["map"]["estimate"]
    assert report_stats.bootstrap(per_query, groups, 50, seed=8) != first
    with pytest.raises(ValueError, match="at least 2"):
        report_stats.bootstrap(per_query, groups, 1)


# ---------------------------------------------------------------- paired comparison

def test_comparing_a_model_with_itself_gives_zero_and_p_one():
    x, y, groups = clustered(30, seed=4)
    _, per_query = per_query_of(x, y, groups)
    result = report_stats.paired_comparison(per_query, per_query, groups, 300, seed=0)
    rows = [result["map"], *result["recall_at_k"].values(), *result["precision_at_k"].values()]
    rows += [v for row in result["classification"].values() for v in row.values()]
    for row in rows:
        assert row["difference"] == 0.0 and row["low"] == 0.0 and row["high"] == 0.0
        assert row["p_value"] == 1.0


def test_a_clearly_better_model_gets_a_small_p_value():
    x, y, groups = clustered(80, seed=5, noise=0.3)
    rng = np.random.default_rng(0)
    worse = x + 0.8 * rng.standard_normal(x.shape).astype(np.float32)
    worse /= np.linalg.norm(worse, axis=1, keepdims=True)
    _, good = per_query_of(x, y, groups)
    _, bad = per_query_of(worse, y, groups)
    result = report_stats.paired_comparison(good, bad, groups, 500, seed=0)
    assert result["map"]["difference"] > 5 and result["map"]["low"] > 0
    assert result["map"]["p_value"] < 0.01
    flipped = report_stats.paired_comparison(bad, good, groups, 500, seed=0)
    assert flipped["map"]["difference"] == pytest.approx(-result["map"]["difference"])
    with pytest.raises(ValueError, match="different queries"):
        report_stats.paired_comparison(good, per_query_of(*clustered(10, seed=6))[1], None, 10)


# ---------------------------------------------------------------- per class

def test_per_class_numbers_average_to_the_macro_numbers():
    x, y, groups = clustered(50, n_classes=4, seed=7)
    report, per_query = evaluate_retrieval(x, y, query_groups=groups, ks=KS, vote_ks=VOTE_KS,
                                           num_classes=6, return_per_query=True)  # 2 classes absent
    names = ["a", "b", "c", "d", "absent1", "absent2"]
    result = report_stats.per_class(per_query, names, groups)
    rows = result["classes"]
    assert set(rows) == {"a", "b", "c", "d"}  # only the classes with queries
    assert sum(row["queries"] for row in rows.values()) == len(y)
    for k in VOTE_KS:
        recalls = [row["vote_recall"][str(k)] for row in rows.values()]
        assert np.mean(recalls) == pytest.approx(result["macro"]["vote_recall"][str(k)])
        assert result["macro"]["vote_recall"][str(k)] == pytest.approx(report["classification"][str(k)]["recall_macro"])
    assert np.mean([row["recall_at_1"] for row in rows.values()]) == pytest.approx(result["macro"]["recall_at_1"])
    assert np.mean([row["ap"] for row in rows.values()]) == pytest.approx(result["macro"]["map"])
    # query-weighted averages of the per-class numbers give the overall (micro) numbers
    weights = np.array([row["queries"] for row in rows.values()])
    assert np.average([row["recall_at_1"] for row in rows.values()], weights=weights) == \
        pytest.approx(report["recall_at_k"]["1"])


# ---------------------------------------------------------------- abstention

def test_risk_coverage_by_hand():
    correct = np.array([True, True, False, True, False])
    confidence = np.array([0.9, 0.9, 0.5, 0.7, 0.1])
    curve = report_stats.risk_coverage(correct, confidence)
    # thresholds 0.9 (2 answered, 0 wrong), 0.7 (3, 0), 0.5 (4, 1), 0.1 (5, 2)
    assert curve["threshold"] == [0.9, 0.7, 0.5, 0.1]
    assert curve["coverage"] == pytest.approx([40, 60, 80, 100])
    assert curve["risk"] == pytest.approx([0, 0, 25, 40])
    assert curve["aurc"] == pytest.approx(100 * (0.4 * 0 + 0.2 * 0 + 0.2 * 0.25 + 0.2 * 0.4))


def test_expected_calibration_error_by_hand():
    # vote shares 0.3 (bin (0.2, 0.3]) twice, one right; 1.0 three times, all right
    ece, bins = report_stats.expected_calibration_error([True, False, True, True, True], [0.3, 0.3, 1, 1, 1])
    assert ece == pytest.approx(100 * (2 / 5) * abs(0.5 - 0.3))
    assert [(b["low"], b["high"], b["count"]) for b in bins] == [(0.2, 0.3, 2), (0.9, 1.0, 3)]


def test_abstention_report():
    x, y, groups = clustered(40, seed=8)
    _, per_query = per_query_of(x, y, groups)
    result = report_stats.abstention(per_query, 10, abstain_below=0.6, ood_scores={"knn": -x[:, 0]})
    share, correct = per_query["vote_share"][10], per_query["votes"][10] == y
    assert result["operating_point"]["coverage"] == pytest.approx(100 * (share >= 0.6).mean())
    assert result["operating_point"]["accuracy_answered"] == pytest.approx(100 * correct[share >= 0.6].mean())
    assert result["risk_coverage"]["coverage"][-1] == 100.0
    assert result["risk_coverage"]["risk"][-1] == pytest.approx(100 * (1 - correct.mean()))
    assert set(result["ood"]) == {"knn"}
    with pytest.raises(ValueError, match="not evaluated"):
        report_stats.abstention(per_query, 7)


# ---------------------------------------------------------------- leakage

def write_list(path, rows):
    path.write_text("".join(f"{patient} {name} {label} demo\n" for patient, name, label in rows))
    return path


def write_images(root, names, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name)


def test_a_patient_on_both_sides_is_refused_and_named(tmp_path):
    write_images(tmp_path / "train", ["a.png", "b.png", "c.png"])
    write_images(tmp_path / "test", ["d.png", "e.png"], seed=1)
    train_list = write_list(tmp_path / "train.txt", [("P1", "a.png", "normal"), ("P2", "b.png", "normal"),
                                                     ("P3", "c.png", "pneumonia")])
    test_list = write_list(tmp_path / "test.txt", [("P3", "d.png", "pneumonia"), ("P9", "e.png", "normal")])
    train = splits.Split.from_list("train", tmp_path / "train", train_list, "covidx")
    test = splits.Split.from_list("test", tmp_path / "test", test_list, "covidx")
    with pytest.raises(UserError, match=r"1 patient in both train .*train.txt.* and test .*test.txt.*: P3") as error:
        splits.check_splits([train, test])
    assert "--allow-patient-overlap" in str(error.value)
    logged = []
    result = splits.check_splits([train, test], allow_overlap=True, log=logged.append)
    assert result["overlap"] == [{"kind": "patient", "splits": ["train", "test"], "count": 1, "first": ["P3"]}]
    assert result["allowed"] and "P3" in logged[0]


def test_many_shared_patients_are_counted_and_the_first_named(tmp_path):
    names = [f"{i}.png" for i in range(8)]
    write_images(tmp_path / "img", names)
    rows = [(f"P{i}", name, "normal") for i, name in enumerate(names)]
    a = splits.Split.from_list("train", tmp_path / "img", write_list(tmp_path / "a.txt", rows), "covidx")
    b = splits.Split.from_list("test", tmp_path / "img", write_list(tmp_path / "b.txt", rows[:7]), "covidx")
    with pytest.raises(UserError, match=r"7 patients in both .*: P0, P1, P2, P3, P4 \(first 5 of 7\)"):
        splits.check_splits([a, b])
    found = splits.check_splits([a, b], allow_overlap=True, log=lambda m: None)
    assert {o["kind"] for o in found["overlap"]} == {"patient", "file"}
    assert all(o["count"] == 7 for o in found["overlap"])


def test_equal_file_names_in_two_folders_are_two_images(tmp_path):
    write_images(tmp_path / "train" / "normal", ["img1.png"])
    write_images(tmp_path / "test" / "normal", ["img1.png"], seed=1)  # other pixels, same name
    train = splits.Split.from_list("train", tmp_path / "train", None, "folder")
    test = splits.Split.from_list("test", tmp_path / "test", None, "folder")
    assert splits.check_splits([train, test], log=lambda m: None)["overlap"] == []
    same = splits.Split.from_list("gallery", tmp_path / "train" / ".." / "train", None, "folder")
    with pytest.raises(UserError, match="1 file in both"):  # one file, spelt another way
        splits.check_splits([train, same])


def test_duplicate_images_across_lists_are_reported(tmp_path):
    write_images(tmp_path / "train", ["a.png", "b.png"])
    write_images(tmp_path / "test", ["x.png", "y.png"], seed=1)
    (tmp_path / "test" / "y.png").write_bytes((tmp_path / "train" / "b.png").read_bytes())  # renamed copy
    train = splits.Split.from_list("train", tmp_path / "train", write_list(
        tmp_path / "train.txt", [("P1", "a.png", "normal"), ("P2", "b.png", "normal")]), "covidx")
    test = splits.Split.from_list("test", tmp_path / "test", write_list(
        tmp_path / "test.txt", [("P7", "x.png", "normal"), ("P8", "y.png", "normal")]), "covidx")
    logged = []
    result = splits.check_splits([train, test], log=logged.append)
    assert result["duplicate_images"] == [{"splits": ["train", "test"], "count": 1, "first": [["b.png", "y.png"]]}]
    assert "byte-identical" in logged[0] and "b.png = y.png" in logged[0]
    # first_only: a gallery that is the training list itself is not an overlap
    gallery = splits.Split.from_list("gallery", tmp_path / "train", tmp_path / "train.txt", "covidx")
    assert splits.check_splits([test, gallery, train], first_only=True, log=lambda m: None)["overlap"] == []


def test_provenance_records_hash_and_counts(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    list_file = write_list(tmp_path / "l.txt", [("P1", "a.png", "normal"), ("P1", "b.png", "normal"),
                                                ("P2", "c.png", "COVID-19")])
    record = splits.provenance(splits.Split.from_list("test", tmp_path / "img", list_file, "covidx"))
    import hashlib
    assert record["sha256"] == hashlib.sha256(list_file.read_bytes()).hexdigest()
    assert (record["images"], record["patients"]) == (3, 2)
    assert record["per_class"] == {"COVID-19": {"images": 1, "patients": 1}, "normal": {"images": 2, "patients": 1}}


# ---------------------------------------------------------------- test.py end to end

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A small phantom set whose test list has several images per patient, and a checkpoint of
    an untrained small model (test.py needs no trained one)."""
    from model import build_model

    root = tmp_path_factory.mktemp("eval")
    data = root / "demo"
    demo_dataset.write_demo_dataset(data, train_per_class=5, test_per_class=6, size=64, seed=0)
    # Patients with two films each: consecutive test lines share a patient id.
    lines = (data / "test_split.txt").read_text().splitlines()
    (data / "test_patients.txt").write_text("".join(
        f"T{i // 2} {' '.join(line.split()[1:])}\n" for i, line in enumerate(lines)))
    config = dict(name="hybrid_convnext_vit", embedding_dim=16, neck="bn", **SMALL_MODEL)
    model = build_model(**config, pretrained=False)
    args = vars(train_args.parse_args(["--dataset", "demo", "--dataset-dir", str(data), "--seed", "3"]))
    state = {"model": model.state_dict(), "model_config": config, "classes": sorted(phantom.CLASSES),
             "epoch": 4, "best_epoch": 4, "selection": "val_mAP", "args": args}
    checkpoint = root / "ckpt.pth"
    torch.save(state, checkpoint)
    return root, data, checkpoint


def run_test_py(*argv):
    import test as evaluate_cli
    return evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([*map(str, argv)]))


def test_test_py_report_files_and_compare(evaluated, capsys):
    root, data, checkpoint = evaluated
    common = ["--resume", checkpoint, "--dataset", "demo", "--test-dataset-dir", data / "test",
              "--workers", "0", "--device", "cpu", "--save-dir", root]
    report = run_test_py(*common, "--test-image-list", data / "test_patients.txt", "--bootstrap", "50",
                         "--report", root / "loo.json", "--vote-k", "5", "--abstain-below", "0.5")
    on_disk = json.loads((root / "loo.json").read_text())
    assert on_disk["same_patient_excluded"] is True and on_disk["num_queries"] == 30
    assert on_disk["provenance"]["checkpoint_epoch"] == 4 and on_disk["provenance"]["seed"] == 3
    assert set(on_disk["provenance"]["versions"]) >= {"torch", "numpy", "timm", "scikit-learn"}
    assert on_disk["lists"]["test"]["patients"] == 15 and on_disk["lists"]["train"]["images"] == 25
    assert on_disk["leakage"]["overlap"] == [] and on_disk["leakage"]["compared"] == ["test", "train"]
    intervals = on_disk["confidence_intervals"]
    assert intervals["patients"] == 15 and intervals["map"]["estimate"] == pytest.approx(report["map"])
    assert set(on_disk["per_class"]["classes"]) == set(phantom.CLASSES)
    assert on_disk["abstention"]["operating_point"]["abstain_below"] == 0.5
    neighbours = json.loads((root / "loo_neighbours.json").read_text())
    first = neighbours["queries"][0]
    assert len(first["neighbours"]) == 10 and all(n["patient"] != first["patient"] for n in first["neighbours"])
    sims = [n["similarity"] for n in first["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    for name in ("confusion", "embedding_map", "risk_coverage"):
        assert (root / f"loo_{name}.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "per class" in out and "macro average" in out and "[" in out  # intervals printed

    # the seed's protocol: same-patient films back in the ranking
    kept = run_test_py(*common, "--test-image-list", data / "test_patients.txt", "--keep-same-patient",
                       "--report", root / "kept.json", "--no-plots", "--neighbours", "0")
    assert kept["same_patient_excluded"] is False
    # query-gallery writes another embeddings file than leave-one-out
    run_test_py(*common, "--test-image-list", data / "test_patients.txt", "--gallery-dataset-dir",
                data / "train", "--gallery-image-list", data / "train_split.txt", "--report", root / "qg.json",
                "--no-plots")
    loo_npz = root / "ckpt_test_patients_embeddings.npz"
    qg_npz = root / "ckpt_test_patients_vs_train_split_embeddings.npz"
    assert loo_npz.is_file() and qg_npz.is_file()
    assert json.loads((root / "qg.json").read_text())["files"]["embeddings"] == str(qg_npz)

    # a checkpoint compared with itself: difference 0, p = 1
    result = run_test_py("--compare", loo_npz, loo_npz, "--bootstrap", "40", "--report", root / "self.json")
    assert result["comparison"]["map"]["difference"] == 0.0 and result["comparison"]["map"]["p_value"] == 1.0
    assert result["comparison"]["patients"] == 15
    assert "A - B" in capsys.readouterr().out
    with pytest.raises(UserError, match="differ in gallery_paths"):
        run_test_py("--compare", loo_npz, qg_npz)


def test_test_py_refuses_a_test_list_that_shares_a_patient_with_training(evaluated):
    root, data, checkpoint = evaluated
    train_lines = (data / "train_split.txt").read_text().splitlines()
    leaking_patient = train_lines[0].split()[0]
    test_lines = (data / "test_split.txt").read_text().splitlines()
    (data / "test_leak.txt").write_text("".join(
        f"{leaking_patient if i == 0 else line.split()[0]} {' '.join(line.split()[1:])}\n"
        for i, line in enumerate(test_lines)))
    common = ["--resume", checkpoint, "--dataset", "demo", "--test-dataset-dir", data / "test",
              "--test-image-list", data / "test_leak.txt", "--workers", "0", "--device", "cpu",
              "--save-dir", root, "--report", root / "leak.json", "--no-plots"]
    with pytest.raises(UserError, match=rf"1 patient in both test .* and train .*: {leaking_patient}"):
        run_test_py(*common)
    report = run_test_py(*common, "--allow-patient-overlap")
    assert report["leakage"]["allowed"] and report["leakage"]["overlap"][0]["first"] == [leaking_patient]
