"""ood.py: each score against a direct computation, thresholds, errors, and the CLI on phantoms."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

import ood
import ood_probes
import train
from cxr import ood_detector, run_data
from cxr.errors import UserError
from test_train import ckpt, phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


def clusters(n_per_class=40, dim=8, classes=3, seed=0):
    """Unit vectors around the same 3 centres whatever the seed (the seed draws the noise)."""
    centres = np.random.default_rng(100).normal(size=(classes, dim)) * 2
    rng = np.random.default_rng(seed)
    x = np.concatenate([centres[c] + rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per_class)


def test_mahalanobis_matches_a_direct_numpy_computation():
    x, y = clusters()
    detector = ood_detector.OODDetector().fit(x, y, ["a", "b", "c"])
    queries, _ = clusters(5, seed=1)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    covariance = LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_
    inverse = np.linalg.inv(covariance)
    expected = [min(np.sqrt((q - m) @ inverse @ (q - m)) for m in means) for q in queries]
    np.testing.assert_allclose(detector.scores(queries)["mahalanobis"], expected, rtol=1e-3)


def test_confidence_and_energy_match_hand_computed_values():
    detector = ood_detector.OODDetector(temperature=0.5, k=1)
    detector.prototypes = np.eye(2, dtype=np.float32)  # two classes along the axes
    detector.means = np.eye(2, dtype=np.float32)
    detector.precision = np.eye(2, dtype=np.float32)
    detector.fitted = np.eye(2, dtype=np.float32)
    query = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)
    scores = detector.scores(query)
    # query 0: logits (2, 0); query 1: logits (1.414, 1.414)
    assert scores["msp"][0] == pytest.approx(1 - np.exp(2) / (np.exp(2) + 1), rel=1e-5)
    assert scores["msp"][1] == pytest.approx(0.5, rel=1e-5)
    assert scores["energy"][0] == pytest.approx(-0.5 * np.log(np.exp(2) + 1), rel=1e-5)
    assert scores["energy"][1] == pytest.approx(-0.5 * np.log(2 * np.exp(2 * np.sqrt(0.5))), rel=1e-5)
    assert scores["knn"] == pytest.approx([0.0, 1 - np.sqrt(0.5)], abs=1e-6)
    s = np.sqrt(0.5)  # distance from (s, s) to the nearest mean (1, 0), identity precision
    assert scores["mahalanobis"] == pytest.approx([0.0, np.sqrt((1 - s) ** 2 + s ** 2)], abs=1e-5)


def test_thresholds_give_the_stated_tpr_and_separate_far_ood():
    x, y = clusters(100)
    held_out, _ = clusters(200, seed=2)
    detector = ood_detector.OODDetector().fit(x, y, ["a", "b", "c"])
    thresholds = detector.calibrate(held_out, tpr=0.9)
    for name, values in detector.scores(held_out).items():
        accepted = np.mean(values <= thresholds[name])
        assert 0.9 <= accepted <= 0.9 + 1 / len(held_out) + 1e-9, name
    far = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    for name in ("mahalanobis", "knn"):
        metrics = ood_detector.detection_metrics(detector.scores(held_out)[name], detector.scores(far)[name], 0.9,
                                        threshold=thresholds[name])
        assert metrics["auroc"] > 0.9, name
    flags = detector.flags(far)
    assert flags["knn"].mean() > 0.5


def test_deployed_rates_use_the_saved_threshold_and_refit_rates_the_test_one():
    """Test scores shifted above the validation ones: the saved threshold (6) accepts fewer test
    images than the re-fitted one (9), so the deployed and re-fitted rates differ."""
    in_scores = np.arange(1.0, 11.0)  # 1..10; the 80% quantile ("higher") is 9
    ood_scores = np.array([2.5, 6.5, 8.5, 9.5, 12, 13, 14, 15, 16, 17])
    metrics = ood_detector.detection_metrics(in_scores, ood_scores, 0.8, threshold=6.0)
    assert metrics["refit_tpr"] == pytest.approx(0.9)  # 1..9 accepted
    assert metrics["refit_fpr"] == pytest.approx(0.3)  # 2.5, 6.5, 8.5
    assert metrics["deployed_tpr"] == pytest.approx(0.6)  # 1..6: a score equal to it is accepted
    assert metrics["deployed_fpr"] == pytest.approx(0.1)  # 2.5
    # AUROC with OOD positive: of the 100 (in, ood) pairs, 2.5 outranks 2, 6.5 outranks 6, 8.5 and
    # 9.5 outrank 8 and 9; the 6 scores above 10 outrank all 10
    assert metrics["auroc"] == pytest.approx((2 + 6 + 8 + 9 + 60) / 100)
    assert "fpr95" not in metrics  # no unqualified name left to read as the deployed rate
    # deployed_tpr is what the guard itself does at that threshold: 1 - the share flags() flags
    detector = ood_detector.OODDetector()
    detector.thresholds = {"knn": 6.0}
    assert metrics["deployed_tpr"] == pytest.approx(1 - detector.flags(None, {"knn": in_scores})["knn"].mean())
    assert metrics["deployed_fpr"] == pytest.approx(1 - detector.flags(None, {"knn": ood_scores})["knn"].mean())
    with pytest.raises(TypeError, match="threshold"):  # never silently the re-fitted one
        ood_detector.detection_metrics(in_scores, ood_scores, 0.8)


def test_save_load_roundtrip(tmp_path):
    x, y = clusters()
    detector = ood_detector.OODDetector().fit(x, y, ["a", "b", "c"])
    detector.calibrate(x)
    detector.save(tmp_path / "d.pth")
    loaded = ood_detector.OODDetector.load(tmp_path / "d.pth")
    for name, values in detector.scores(x[:7]).items():
        np.testing.assert_allclose(loaded.scores(x[:7])[name], values, rtol=1e-6)
    assert loaded.thresholds == detector.thresholds and loaded.classes == ["a", "b", "c"]
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="not an OOD detector"):
        ood_detector.OODDetector.load(tmp_path / "other.pth")


def test_bad_fits_are_clear_errors():
    x, y = clusters()
    with pytest.raises(ValueError, match="at least 2 classes"):
        ood_detector.OODDetector().fit(x[y == 0], y[y == 0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="more images than classes"):
        ood_detector.OODDetector(k=1).fit(x[[0, 40]], y[[0, 40]], ["a", "b", "c"])
    with pytest.raises(RuntimeError, match="calibrate"):
        ood_detector.OODDetector().fit(x, y, ["a", "b", "c"]).flags(x)
    # fewer images than dimensions: the shrunk covariance still inverts
    wide = np.random.default_rng(0).normal(size=(12, 64)).astype(np.float32)
    scores = ood_detector.OODDetector(k=3).fit(wide, np.arange(12) % 3, ["a", "b", "c"]).scores(wide)
    assert np.isfinite(scores["mahalanobis"]).all()


@pytest.mark.slow
def test_cli_on_phantoms_and_test_py_ood(phantoms, tmp_path):  # noqa: F811
    train.main(tiny_args(phantoms, tmp_path, "--epochs", "1"))
    probes = tmp_path / "probes"
    ood_probes.write_probes(probes, per_set=6, size=64, sets=("noise", "inverted", "mass"))
    checkpoint = ckpt(tmp_path, "best")
    # defaults from the checkpoint: fit on its training images, thresholds on its validation split
    common = ["--resume", str(checkpoint), "--workers", "0", "--device", "cpu", "-k", "3"]
    report = ood.main(ood.get_args_parser().parse_args([*common, "--probe-dir", str(probes),
                                                        "--report", str(tmp_path / "ood.json")]))
    assert (report["num_fit"], report["num_calibration"], report["num_in"]) == (20, 10, 25)
    on_disk = json.loads((tmp_path / "ood.json").read_text())
    assert set(on_disk) >= {"results", "thresholds"}
    assert {(r["score"], r["ood_set"]) for r in on_disk["results"]} == {
        (s, n) for s in ood_detector.SCORES for n in ("noise", "inverted", "mass")}
    assert set(on_disk["thresholds"]) == set(ood_detector.SCORES)
    saved = ood_detector.OODDetector.load(ood_detector.default_detector_path(checkpoint))
    assert saved.thresholds == on_disk["thresholds"]
    for r in on_disk["results"]:  # both kinds of rates, each in [0, 1]
        rates = ("auroc", "refit_tpr", "refit_fpr", "deployed_tpr", "deployed_fpr")
        assert all(0 <= r[key] <= 1 for key in rates), r
        assert r["refit_tpr"] >= on_disk["tpr"]
        # the deployed TPR is the test images the saved thresholds accept, the same for every set
        assert r["deployed_tpr"] == pytest.approx(1 - on_disk["in_flagged_share"][r["score"]])

    import test as evaluate_cli
    result = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(checkpoint), "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu", "--ood",
        "--report", str(tmp_path / "r.json")]))
    assert len(result["ood"]["queries"]) == 25 and set(result["ood"]["flagged_share"]) == set(ood_detector.SCORES)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    (tmp_path / "bad.txt").write_text("P1 x.png ood probe\n")
    with pytest.raises(Exception, match="x.png"):
        ood.main(ood.get_args_parser().parse_args([*common, "--ood-image-list", str(tmp_path / "bad.txt"),
                                                   "--ood-dataset-dir", str(tmp_path / "bad")]))
    with pytest.raises(UserError, match="no OOD detector"):
        evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
            "--resume", str(checkpoint), "--ood", "--ood-detector", str(tmp_path / "none.pth"),
            "--test-dataset-dir", str(phantoms / "test"), "--test-image-list", str(phantoms / "test_split.txt")]))
    # a detector fitted on another model's embeddings is refused (a replaced best checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "replaced.pth")
    shutil.copy(ood_detector.default_detector_path(checkpoint),
                ood_detector.default_detector_path(tmp_path / "replaced.pth"))
    with pytest.raises(UserError, match="another model"):
        evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
            "--resume", str(tmp_path / "replaced.pth"), "--ood", "--test-dataset-dir", str(phantoms / "test"),
            "--test-image-list", str(phantoms / "test_split.txt"), "--device", "cpu"]))
    # retrieve.py query --ood flags with the same detector
    import retrieve
    retrieve.main(["index", "--resume", str(checkpoint), "--image-list", str(phantoms / "train_split.txt"),
                   "--dataset-dir", str(phantoms / "train"), "--out", str(tmp_path / "idx"), "--workers", "0",
                   "--device", "cpu"])
    noise = str(probes / "noise" / "noise_0000.png")
    results = retrieve.main(["query", "--index", str(tmp_path / "idx"), "--resume", str(checkpoint), noise,
                             "--ood", "--out", str(tmp_path / "q"), "--device", "cpu"])
    assert set(results[0]["ood"]) == {"flagged", "score", "value", "threshold"}


def test_relocate_moves_the_runs_lists_with_its_dataset_dir():
    run = {"dataset_dir": "old/data", "train_image_list": "old/data/train_split.txt",
           "test_image_list": "lists/test.txt", "val_image_list": None, "val_dataset_dir": "old/data/train"}
    moved = run_data.relocate(run, "new/place")
    assert moved["train_image_list"] == str(Path("new/place/train_split.txt"))
    assert moved["val_dataset_dir"] == str(Path("new/place/train"))
    assert moved["test_image_list"] == "lists/test.txt"  # a list given on its own stays
    assert run_data.relocate(run, None) == run and run_data.relocate(run, "old/data/") == run
