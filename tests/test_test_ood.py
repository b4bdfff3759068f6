"""test.py's OOD guard: on by default with the detector beside the checkpoint (the count printed,
each query flagged in the report and the neighbours file), off with --no-ood, a note only where
there is no detector, a warning for a stale one (an error with --ood)."""
import json
import shutil

import pytest

from cxr import ood_detector
from cxr.checkpoints import load_trained_model
from cxr.errors import UserError
from test_retrieve import save_detector, trained  # noqa: F401  (the trained fixture)
from test_train import phantoms  # noqa: F401  (the phantoms fixture)


def run_test_py(checkpoint, phantoms, report, *extra):  # noqa: F811
    import test as evaluate_cli
    return evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(checkpoint), "--test-dataset-dir", str(phantoms / "test"), "--test-image-list",
        str(phantoms / "test_split.txt"), "--workers", "0", "--device", "cpu", "--no-plots",
        "--report", str(report), "--save-dir", str(report.parent), *extra]))


def neighbours_of(report_path):
    return json.loads(report_path.with_name(report_path.stem + "_neighbours.json").read_text())["queries"]


def test_detector_beside_the_checkpoint_is_used_by_default(trained, phantoms, tmp_path, capsys):  # noqa: F811
    checkpoint = tmp_path / trained.name  # a folder of its own: the shared checkpoint keeps no detector
    shutil.copy(trained, checkpoint)
    capsys.readouterr()
    report = run_test_py(checkpoint, phantoms, tmp_path / "none.json")  # no detector: a note, no error
    printed = capsys.readouterr().out
    assert "no OOD detector found" in printed and f"ood.py --resume {checkpoint}" in printed
    assert "ood" not in report and not any("ood" in q for q in neighbours_of(tmp_path / "none.json"))

    save_detector(checkpoint, load_trained_model(checkpoint, "cpu")[2], -10.0)  # flags every query
    report = run_test_py(checkpoint, phantoms, tmp_path / "guarded.json")
    assert report["ood"]["detector"] == str(ood_detector.default_detector_path(checkpoint))
    assert report["ood"]["flagged_count"] == {name: 25 for name in ood_detector.SCORES}
    printed = capsys.readouterr().out
    assert "mahalanobis 25 of 25 (100.0%)" in printed
    # the counts are at the saved thresholds, not at a TPR measured on these queries
    assert "at the deployed thresholds of" in printed and "(set to accept 95% of its calibration images)" in printed
    neighbours = neighbours_of(tmp_path / "guarded.json")
    assert len(neighbours) == 25 and all(q["ood"]["flagged"] == {name: True for name in ood_detector.SCORES}
                                         for q in neighbours)
    assert [q["ood"]["knn"] for q in neighbours] == [q["knn"] for q in report["ood"]["queries"]]

    report = run_test_py(checkpoint, phantoms, tmp_path / "off.json", "--no-ood")
    assert "ood" not in report and not any("ood" in q for q in neighbours_of(tmp_path / "off.json"))
    assert "OOD" not in capsys.readouterr().out

    save_detector(checkpoint, "0" * 64, -10.0)  # fitted for another model (a replaced checkpoint)
    report = run_test_py(checkpoint, phantoms, tmp_path / "stale.json")
    printed = capsys.readouterr().out
    assert "warning:" in printed and "another model" in printed and "ood" not in report
    with pytest.raises(UserError, match="another model"):  # asked for: the error it was
        run_test_py(checkpoint, phantoms, tmp_path / "required.json", "--ood")
