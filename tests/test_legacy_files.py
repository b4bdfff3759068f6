"""Files written by an earlier release (tests/data/legacy, before the library moved into its
package) load in today's programs and give the same numbers: a train.py checkpoint, its
safetensors export, the OOD detector fitted for it (and ood.py refitting it) and a retrieval index."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_train import phantoms  # noqa: F401  (the phantoms fixture the files were written on)

LEGACY = ROOT / "tests" / "data" / "legacy"
METRIC_KEYS = ("num_queries", "num_gallery", "protocol", "recall_at_k", "map", "precision_at_k",
               "classification", "per_class", "branch_attribution", "abstention")


# The same float32 arithmetic on another CPU's kernels moves the sixth decimal (a Mahalanobis
# threshold by 1.2e-6, a similarity printed to six decimals across a rounding boundary): the
# files must give the same numbers to 1e-5, far below any metric's resolution.
FLOAT_TOLERANCE = 1e-5


def run(argv, cwd):
    result = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_close(actual, expected, where=""):
    """Equal structures; floats equal to FLOAT_TOLERANCE (the same arithmetic on the same files)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=FLOAT_TOLERANCE), where
    else:
        assert actual == expected, where


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy")
    for item in LEGACY.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, folder / item.name)
    return folder


@pytest.mark.parametrize("weights", ["legacy_ckpt.pth", "model.safetensors"])
def test_test_py_reproduces_the_earlier_report(legacy, phantoms, tmp_path, weights):  # noqa: F811
    expected_name = "expected_report_ckpt.json" if weights.endswith(".pth") else "expected_report_safetensors.json"
    expected = json.loads((legacy / expected_name).read_text())
    report = tmp_path / "report.json"
    run(["test.py", "--resume", str(legacy / weights), "--test-dataset-dir", "test",
         "--test-image-list", "test_split.txt", "--workers", "0", "--device", "cpu",
         "--report", str(report)], cwd=phantoms)
    actual = json.loads(report.read_text())
    for key in METRIC_KEYS:
        assert_close(actual[key], expected[key], key)
    assert ("ood" in actual) == ("ood" in expected)  # the detector beside the checkpoint, used by default
    if "ood" in expected:
        assert_close({k: v for k, v in actual["ood"].items() if k != "detector"},
                     {k: v for k, v in expected["ood"].items() if k != "detector"}, "ood")


def test_the_earlier_index_and_detector_answer_queries_as_before(legacy, phantoms, tmp_path):  # noqa: F811
    expected = json.loads((legacy / "expected_query.json").read_text())["queries"]
    out = tmp_path / "query"
    run(["retrieve.py", "query", "--index", str(legacy / "gallery.index"), "--resume",
         str(legacy / "legacy_ckpt.pth"), "--topk", "5", "--image-list", "test_split.txt",
         "--dataset-dir", "test", "--dataset", "covid", "--out", str(out), "--device", "cpu"], cwd=phantoms)
    actual = json.loads((out / "results.json").read_text())["queries"]
    assert len(actual) == len(expected) == 25
    for a, e in zip(actual, expected):
        assert (a["query"], a["vote"], a["label"], a["correct"]) == (e["query"], e["vote"], e["label"], e["correct"])
        assert [Path(n["path"]).name for n in a["neighbours"]] == [Path(n["path"]).name for n in e["neighbours"]]
        assert [n["similarity"] for n in a["neighbours"]] == pytest.approx(
            [n["similarity"] for n in e["neighbours"]], abs=FLOAT_TOLERANCE)
        assert a["ood"]["flagged"] == e["ood"]["flagged"]
        assert a["ood"]["value"] == pytest.approx(e["ood"]["value"], abs=1e-5)


def test_ood_py_refits_the_earlier_detector_on_the_earlier_checkpoint(legacy, phantoms, tmp_path):  # noqa: F811
    """ood.py on the earlier checkpoint fits the same detector again: the same thresholds and rates."""
    expected = json.loads((legacy / "expected_ood_report.json").read_text())
    report = tmp_path / "ood.json"
    run(["ood.py", "--resume", str(legacy / "legacy_ckpt.pth"), "--dataset-dir", str(phantoms), "--workers", "0",
         "--device", "cpu", "--ood-image-list", str(phantoms / "test_split.txt"), "--ood-dataset-dir",
         str(phantoms / "test"), "--report", str(report), "--save", str(tmp_path / "refit_ood.pth")], cwd=tmp_path)
    actual = json.loads(report.read_text())
    for key in ("tpr", "temperature", "k", "num_fit", "num_calibration", "num_in", "in_flagged_share", "results",
                "thresholds"):
        assert_close(actual[key], expected[key], key)
    assert (tmp_path / "refit_ood.pth").read_bytes() != b""
