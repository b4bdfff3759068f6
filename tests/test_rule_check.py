import hashlib
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import rule_check
from cxr import demo_dataset, phantom, regions, report_stats
from cxr import ontology as onto

ONTOLOGY = onto.load_ontology()
THRESHOLD = float(rule_check.rule_threshold(ONTOLOGY)["ctr"].split()[1])


def _content_digest(root):
    """Hash of a dataset's file names, decoded pixels (not PNG bytes: zlib may vary) and text."""
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            if path.suffix == ".png":
                with Image.open(path) as image:
                    h.update(np.asarray(image).tobytes())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def test_default_demo_dataset_is_unchanged(tmp_path):
    # Digest computed with demo_data.py before ctr_ranges existed (same environment).
    out = demo_dataset.write_demo_dataset(tmp_path / "demo", 1, 1, size=64, seed=0)
    assert _content_digest(out) == "499e27d8c1c3c6856126c9b06a105a800db33f3a54ffabb22176b6d9d7db567f"


def test_ctr_ranges_is_opt_in_and_only_touches_the_labels_it_names():
    def draw(label, **kw):
        img, masks, info = phantom.make_phantom_with_info(np.random.default_rng([5, 1]), label, 64, **kw)
        return img, masks["heart"], info["ctr"]

    for label in ("normal", "pneumonia", "cardiomegaly"):
        default = draw(label)
        explicit = draw(label, ctr_ranges=rule_check.STANDARD_RANGES)
        assert all(np.array_equal(a, b) for a, b in zip(default, explicit))
    other = draw("pneumonia", ctr_ranges=rule_check.BORDERLINE_RANGES)  # pneumonia not named
    assert np.array_equal(other[0], draw("pneumonia")[0])
    assert draw("normal", ctr_ranges={"normal": (0.6, 0.6)})[2] > 0.55


@pytest.fixture(scope="module")
def borderline():
    return rule_check.make_set(rule_check.BORDERLINE_RANGES, per_class=16, size=96, seed=0)


def test_borderline_set_straddles_the_threshold_in_both_classes(borderline):
    for label in rule_check.CLASSES:
        ctr = np.array([c["ctr"] for c in borderline if c["label"] == label])
        assert (ctr > THRESHOLD).any() and (ctr <= THRESHOLD).any(), label  # FP and FN possible
    standard = rule_check.make_set(rule_check.STANDARD_RANGES, per_class=4, size=96, seed=0)
    assert all((c["ctr"] > THRESHOLD) == (c["label"] == "cardiomegaly") for c in standard)


def test_generator_masks_reproduce_the_generator_ctr(borderline):
    for case in borderline[::4]:
        verdict = rule_check.apply_rules(ONTOLOGY, case["lungs"], case["heart"], case["label"])
        assert verdict["ctr"] == case["ctr"] == regions.cardiothoracic_ratio(case["lungs"], case["heart"])
        assert verdict["flagged"] == (case["ctr"] > THRESHOLD)
    result = rule_check.evaluate(borderline[::4], ONTOLOGY, 96, 0, conditions=rule_check.CONDITIONS[:1])[0]
    assert result["ctr_mae"] == 0 and result["flips"] == 0 and result["dice_heart"] == 1


@pytest.mark.parametrize("name,spec", [c for c in rule_check.CONDITIONS if c[1]])
def test_perturbations_change_masks_but_keep_them_plausible(borderline, name, spec):
    case = borderline[0]
    rngs = {kind: np.random.default_rng([1, k]) for k, kind in enumerate(rule_check.KINDS)}
    lungs, heart = rule_check.perturb(case["lungs"], case["heart"], spec, 96, rngs)
    # 2% of a ~35 px heart is sub-pixel at 96 px: nothing to see; every other one moves pixels.
    if name != "heart scale 2%":
        assert not (np.array_equal(lungs, case["lungs"]) and np.array_equal(heart, case["heart"])), name
    for new, old in ((lungs, case["lungs"]), (heart, case["heart"])):
        assert abs(new.sum() / old.sum() - 1) < 0.25, name  # area within 25% (10% heart scale: 21%)
        assert rule_check.dice(new, old) > 0.75, name
        assert ndimage.label(new)[1] <= ndimage.label(old)[1] + 2, name  # no spray of islands
    ctr = regions.cardiothoracic_ratio(lungs, heart)
    assert abs(ctr - case["ctr"]) < 0.15, name
    if name.startswith("shift all"):
        assert ctr == pytest.approx(case["ctr"], abs=0.011)  # moving all masks keeps the CTR


def test_boundary_noise_moves_the_contour_by_at_most_its_amplitude():
    mask = np.zeros((80, 80), bool)
    mask[20:60, 15:65] = True
    assert np.array_equal(rule_check.boundary_noise(mask, 0, np.random.default_rng(0), 3), mask)
    noisy = rule_check.boundary_noise(mask, 3.0, np.random.default_rng(0), 3)
    changed = noisy ^ mask
    assert changed.any()
    distance = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    assert distance[changed].max() <= 3.5


def test_shift_and_scale_of_a_mask():
    mask = np.zeros((60, 60), bool)
    mask[20:40, 10:30] = True
    assert np.array_equal(rule_check.shift_mask(mask, 2, -3), np.roll(np.roll(mask, 2, 0), -3, 1))
    wider = rule_check.scale_mask(mask, 1.1)
    cols = np.flatnonzero(wider.any(axis=0))
    assert cols[-1] - cols[0] + 1 == 22  # 20 px * 1.1


def test_rates_and_wilson_on_a_hand_made_case():
    labels = ["cardiomegaly"] * 4 + ["normal"] * 6
    flagged = [True, True, True, False] + [True, False, False, False, False, False]
    r = rule_check.rates(flagged, labels)
    assert (r["tp"], r["positives"], r["fp"], r["negatives"]) == (3, 4, 1, 6)
    assert r["tpr"] == 0.75 and r["fpr"] == pytest.approx(1 / 6)
    assert r["tpr_ci"] == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert report_stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert report_stats.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert report_stats.wilson(0, 0) is None  # the one empty case of every interval


def test_cli_writes_json_and_table(tmp_path, capsys):
    args = Namespace(out=tmp_path / "out", per_class=2, size=64, seed=0, ontology=onto.DEFAULT_ONTOLOGY,
                     sets=["borderline"])
    rule_check.main(args)
    report = json.loads((tmp_path / "out" / "rule_check.json").read_text())
    results = report["sets"]["borderline"]["results"]
    assert [r["condition"] for r in results] == [c[0] for c in rule_check.CONDITIONS]
    assert report["rule"] == {"id": "enlarged_cardiac_silhouette", "when": {"ctr": "> 0.53"}}
    assert "| generator masks |" in capsys.readouterr().out
    assert (tmp_path / "out" / "rule_check.md").read_text().count("\n|") == len(results) + 2
