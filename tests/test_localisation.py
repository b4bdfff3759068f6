"""Localisation against baselines that never look at the image: chance level, location prior,
mismatched lesions, zone prior, Wilson intervals, and faithfulness against smooth random and
image-independent maps. Hand-made masks and toy models only: runs in seconds."""
import numpy as np
import pytest
import torch

import explain
from cxr import faithfulness, regions, report_stats
from cxr import localisation as loc

TOL = loc.tolerances()  # 5% of the width, and 10%
BRANCHES = ["convnext", "fused"]
SIZE = (48, 40)  # (H, W): 5% of the width is 2 px, 10% is 4 px


# ---------------------------------------------------------------------- hand-made phantoms
def chest(size=SIZE):
    lungs = np.zeros(size, bool)
    lungs[8:42, 3:18] = True  # image left = patient right
    lungs[8:42, 22:37] = True
    return lungs


def disk(size, centre, radius=3):
    rows, cols = np.mgrid[: size[0], : size[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def phantom(rng, label, size=SIZE):
    """(lungs, lesion): pneumonia anywhere in the lungs; COVID-19 low and at the chest wall."""
    lungs = chest(size)
    rows, cols = np.nonzero(lungs)
    if label == "COVID-19":
        keep = (rows >= 34) & ((cols < 8) | (cols >= 32))
        rows, cols = rows[keep], cols[keep]
    pick = rng.integers(len(rows))
    return lungs, disk(size, (rows[pick], cols[pick])) & lungs


def one_hot(size, xy):
    saliency = np.zeros(size)
    saliency[xy[1], xy[0]] = 1.0
    return saliency


def record(name, label, lungs, lesion, peak_xy, prior=None):
    """A batch record as explain_batch writes it, for a map that peaks at `peak_xy`."""
    full = {b: one_hot(lesion.shape, peak_xy) for b in BRANCHES}
    stats = regions.region_statistics(full["fused"], lungs)
    check = loc.lesion_check(full, {"lungs": lungs, "lesion": lesion}, lesion.shape, BRANCHES,
                             stats["top_zone"], TOL, prior, label)
    return {"image": name, "label": label, "predicted": label, "peaks": {b: list(peak_xy) for b in BRANCHES},
            "lesion": check, "rules_fired": [], "ctr": None, "branch_attribution": None}


def phantom_set(seed, per_class, labels=("pneumonia", "COVID-19")):
    rng = np.random.default_rng(seed)
    return [(f"{seed}_{label}_{i}.png", label, *phantom(rng, label)) for label in labels for i in range(per_class)]


def finish(records, lesions, prior=None):
    loc.mismatched_hits(records, lambda name, size: lesions[name], TOL, BRANCHES)
    zones_from = loc.zone_prior_agreement(records, prior)
    return explain.aggregate(records, BRANCHES, TOL, prior, zones_from)


def fit(images):
    return {**loc.fit_prior(((label, lesion, lungs, None) for _, label, lungs, lesion in images), TOL),
            "fitted_on": "fitting list"}


# ---------------------------------------------------------------------- intervals
def test_wilson_interval_and_rates():
    assert report_stats.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)  # textbook values
    assert report_stats.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert report_stats.wilson(10, 10)[1] == pytest.approx(1.0) and report_stats.wilson(0, 0) is None
    r = loc.rate([True, False, None, 1.0])  # None: no measure for that image, left out
    assert r["rate"] == pytest.approx(2 / 3) and r["n"] == 3 and r["ci95"][0] < 2 / 3 < r["ci95"][1]
    assert loc.rate([None]) is None
    d = loc.paired_difference([1, 1, 0, 1], [0.5, 0.5, 0.5, None])
    assert d["n"] == 3 and d["mean"] == pytest.approx(1 / 6) and d["ci95"][0] < d["mean"] < d["ci95"][1]


# ---------------------------------------------------------------------- chance level
def test_chance_level_is_the_dilated_lesion_area_within_the_lungs_over_the_lung_area():
    size = (40, 20)  # 5% of the width: 1 px, so the dilation adds the 4-neighbours only
    lungs = np.zeros(size, bool)
    lungs[10:30, :] = True  # 400 lung pixels
    lesion = np.zeros(size, bool)
    lesion[14:16, 8:10] = True  # 2 x 2 inside: dilated by 1 px = 4 + 8 pixels
    assert loc.Lesion(lesion).chance(lungs, 0.05) == pytest.approx(12 / 400)
    edge = np.zeros(size, bool)
    edge[9:11, 8:10] = True  # straddles the top of the lungs: 6 of its 12 dilated pixels inside
    assert loc.Lesion(edge).chance(lungs, 0.05) == pytest.approx(6 / 400)
    assert loc.Lesion(lesion).chance(None, 0.05) is None
    # the hit test is the one the pointing game has always used (regions.pointing_hit)
    target = loc.Lesion(lesion)
    for x in range(20):
        for y in range(40):
            assert target.hit(loc.to_unit((x, y), size), 0.1) == regions.pointing_hit((x, y), lesion, 2.0)


def test_a_pixel_survives_the_round_trip_through_normalised_coordinates():
    for size in ((48, 40), (7, 300)):
        for xy in ((0, 0), (size[1] - 1, size[0] - 1), (3, 5)):
            assert loc.to_pixel(loc.to_unit(xy, size), size) == xy


# ---------------------------------------------------------------------- baselines
def test_a_map_fixed_at_the_prior_point_has_no_gain_and_scores_its_prior_baseline():
    fitting, reporting = phantom_set(1, 30), phantom_set(2, 12)
    prior = fit(fitting)
    records, lesions = [], {}
    for name, label, lungs, lesion in reporting:
        point = loc.to_pixel(prior["points"]["pointing_game"][label], SIZE)  # the same pixel for every image
        records.append(record(name, label, lungs, lesion, point, prior))
        lesions[name] = lesion
    aggregate = finish(records, lesions, prior)
    for label in ("pneumonia", "COVID-19"):
        game = aggregate["pointing_game"]["by_label"][label]
        assert game["map"]["fused"]["rate"] == game["prior_point"]["rate"]
        assert game["image_specific_gain"]["fused"]["mean"] == pytest.approx(0.0, abs=1e-12)
        assert game["gain_over_prior_point"]["fused"]["mean"] == 0.0
    covid = aggregate["pointing_game"]["by_label"]["COVID-19"]
    assert covid["prior_point"]["rate"] > covid["chance"]["rate"] + 0.1  # where COVID-19 lies is informative
    assert aggregate["image_specific_gain"]["overall"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_a_map_on_each_images_own_lesion_has_a_large_gain():
    reporting = phantom_set(3, 12)
    records, lesions = [], {}
    for name, label, lungs, lesion in reporting:
        rows, cols = np.nonzero(lesion)
        records.append(record(name, label, lungs, lesion, (int(np.median(cols)), int(np.median(rows)))))
        lesions[name] = lesion
    aggregate = finish(records, lesions)
    pneumonia = aggregate["pointing_game"]["by_label"]["pneumonia"]
    assert pneumonia["map"]["fused"]["rate"] == 1.0
    assert pneumonia["mismatched"]["fused"]["rate"] < 0.3  # another image's lesion is elsewhere
    gain = aggregate["image_specific_gain"]
    assert gain["pneumonia"]["mean"] > 0.7 and gain["pneumonia"]["ci95"][0] > 0.5
    assert gain["pneumonia"] == pneumonia["image_specific_gain"]["fused"]
    # COVID-19 lesions share a place, so part of a hit is the class's usual location
    assert 0 < gain["by_label"]["COVID-19"]["mean"] < gain["pneumonia"]["mean"]
    # the wider 10% target makes hitting someone else's lesion easier
    wide = aggregate["pointing_game_at_10pct"]["by_label"]["pneumonia"]
    assert wide["mismatched"]["fused"]["rate"] >= pneumonia["mismatched"]["fused"]["rate"]
    assert wide["chance"]["rate"] > pneumonia["chance"]["rate"]
    # no fitting list: the prior point is not computed rather than fitted on these images
    assert pneumonia["prior_point"] is None and aggregate["location_prior"]["points"] is None
    assert "not computed" in aggregate["location_prior"]["note"]


def test_the_prior_is_fitted_on_its_own_list_only():
    def corner(names, top_left):
        images = []
        for i, name in enumerate(names):
            lungs, lesion = chest(), np.zeros(SIZE, bool)
            centre = (10 + i % 3, 5 + i % 4) if top_left else (38 - i % 3, 34 - i % 4)
            lesion |= disk(SIZE, centre, 2) & lungs
            images.append((name, "pneumonia", lungs, lesion))
        return images

    fitting = corner([f"fit{i}" for i in range(8)], top_left=True)
    reporting = corner([f"report{i}" for i in range(8)], top_left=False)
    prior = fit(fitting)
    x, y = prior["points"]["pointing_game"]["pneumonia"]
    assert x < 0.5 and y < 0.5 and prior["fit_hit_rate"]["pointing_game"]["pneumonia"] == 1.0
    records = [record(n, lab, lu, le, (20, 20), prior) for n, lab, lu, le in reporting]
    aggregate = finish(records, {n: le for n, _, _, le in reporting}, prior)
    assert aggregate["pointing_game"]["overall"]["prior_point"]["rate"] == 0.0  # never saw these lesions
    assert fit(reporting)["points"] != prior["points"]  # fitted on them, it would have found them
    assert aggregate["location_prior"]["fitted_on"] == "fitting list"
    assert aggregate["location_prior"]["zones"] == {"pneumonia": "right_upper"}
    assert aggregate["zone_agreement"]["overall"]["prior_zone"]["rate"] == 0.0


def test_mismatched_is_the_share_of_the_other_images_lesions_hit():
    lungs = chest()
    squares = [np.zeros(SIZE, bool) for _ in range(3)]
    squares[0][10:14, 5:9] = True
    squares[1][30:34, 24:28] = True
    squares[2][30:34, 31:35] = True  # 3 px right of lesion 1: a point between them is 2 px from both
    peaks = [(6, 11), (29, 32), (10, 25)]  # on lesion 0; between 1 and 2; on none
    records = [record(f"m{i}", "pneumonia", lungs, squares[i], peaks[i]) for i in range(3)]
    finish(records, {f"m{i}": squares[i] for i in range(3)})
    own = [r["lesion"]["pointing_game"]["hits"]["fused"] for r in records]
    mismatched = [r["lesion"]["pointing_game"]["mismatched"]["fused"] for r in records]
    assert own == [True, True, False] and mismatched == [0.0, 0.5, 0.0]  # never the image's own lesion


def test_zone_prior_without_a_fitting_list_leaves_each_image_out():
    records = [{"label": "effusion", "lesion": {"lesion_zones": zones, "zone_agrees": True}}
               for zones in (["right_lower"], ["right_lower"], ["left_lower"], ["left_upper"])]
    assert "leave-one-out" in loc.zone_prior_agreement(records)
    # others of image 0: right_lower once, left_lower and left_upper once: a tie, won by ZONES order
    assert [r["lesion"]["prior_zone_agrees"] for r in records] == [True, True, False, False]
    alone = [{"label": "pneumonia", "lesion": {"lesion_zones": ["right_upper"], "zone_agrees": False}}]
    loc.zone_prior_agreement(alone)
    assert alone[0]["lesion"]["prior_zone_agrees"] is None  # nothing else to learn the zone from


def test_lesion_check_and_aggregate_on_a_hand_made_case():
    lungs = chest()
    lesion = np.zeros(SIZE, bool)
    lesion[33:39, 6:12] = True  # right lower zone
    records = [record("a", "pneumonia", lungs, lesion, (8, 35)),  # on the lesion
               record("b", "pneumonia", lungs, lesion, (30, 12))]  # left upper, far away
    assert records[0]["lesion"]["pointing_game"]["hits"]["fused"] and records[0]["lesion"]["zone_agrees"]
    assert not records[1]["lesion"]["pointing_game"]["hits"]["fused"] and not records[1]["lesion"]["zone_agrees"]
    assert records[0]["lesion"]["pointing_game"]["tolerance_px"] == pytest.approx(2.0)
    aggregate = finish(records, {"a": lesion, "b": lesion})
    game = aggregate["pointing_game"]["overall"]
    assert game["map"]["fused"]["rate"] == 0.5 and game["map"]["fused"]["n"] == 2
    assert game["mismatched"]["fused"]["rate"] == 0.5  # the same lesion twice: no image-specific part
    assert aggregate["image_specific_gain"]["overall"]["mean"] == 0.0
    assert aggregate["zone_agreement"]["overall"]["map"]["rate"] == 0.5
    assert aggregate["num_with_lesion"] == 2 and aggregate["vote_accuracy"] == 1.0
    no_lungs = loc.lesion_check({"fused": one_hot(SIZE, (8, 35))}, {"lungs": np.zeros_like(lungs), "lesion": lesion},
                                SIZE, ["fused"], None, TOL)
    assert "zone_agrees" not in no_lungs and no_lungs["pointing_game"]["chance"] is None  # no crash


# ---------------------------------------------------------------------- faithfulness
class RegionModel(torch.nn.Module):
    """Similarity = mean intensity over a fixed region: the pixels that matter are known."""

    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, x):
        inside = x[:, :, self.region].mean(dim=(1, 2))
        return torch.stack([inside, torch.zeros_like(inside)], dim=1)


def test_a_map_of_the_pixels_the_model_uses_beats_both_baselines():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[2:9, 20:29] = True  # off-centre, so the centred blob does not cover it
    model, target = RegionModel(region), torch.tensor([1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(6):
        image = torch.rand(3, 32, 32, generator=generator) * 0.2
        image[:, region] += 0.8
        truth = region.float() + 0.01 * torch.rand(32, 32, generator=generator)
        baselines = {"smooth_random": faithfulness.smooth_random_map((32, 32), seed=[0, index]),
                     "image_independent": faithfulness.centred_blob((32, 32))}
        curves = faithfulness.curves(model, image, target, truth, baselines, steps=8)
        records.append({"faithfulness": {**curves, "image_independent_map": "centred_gaussian"}})
    summary = faithfulness.summary(records)
    assert summary["beats_both"] and summary["beats_both_beyond_ci"]
    assert summary["map"]["deletion_auc"] < summary["smooth_random"]["deletion_auc"]
    assert summary["map"]["insertion_auc"] > summary["image_independent"]["insertion_auc"]
    # the opposite map (everything but the region first) loses to the random one
    curves = faithfulness.curves(model, image, target, 1 - truth, baselines, steps=8)
    assert curves["deletion_auc"] > curves["smooth_random_deletion_auc"]


def test_faithfulness_baseline_maps():
    a, b = faithfulness.smooth_random_map((40, 40), [0, 1]), faithfulness.smooth_random_map((40, 40), [0, 2])
    assert np.array_equal(a, faithfulness.smooth_random_map((40, 40), [0, 1])) and not np.allclose(a, b)
    # smooth: neighbouring pixels nearly equal, unlike white noise
    assert np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] > 0.9
    blob = faithfulness.centred_blob((41, 41))
    assert np.unravel_index(blob.argmax(), blob.shape) == (20, 20)


def test_image_independent_map_is_the_class_mean_of_the_other_images():
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[4:8, 4:8] = True
    model, target = RegionModel(region), torch.tensor([1.0, 0.0])
    maps = [torch.rand(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    records = [{"predicted": label} for label in ("pneumonia", "pneumonia", "normal")]
    ctx = {"model": model, "device": torch.device("cpu"), "faithfulness_steps": 4,
           "class_maps": {"pneumonia": (maps[0] + maps[1], 2), "normal": (maps[2], 1)},
           "faithfulness_queue": [(r, i, images[i], target, maps[i]) for i, r in enumerate(records)]}
    faithfulness.add_to_records(ctx)
    assert [r["faithfulness"]["image_independent_map"] for r in records] == \
        ["class_mean_map", "class_mean_map", "centred_gaussian"]
    assert ctx["faithfulness_queue"] == []
    # image 0's class mean leaves its own map out: it is image 1's map
    alone = faithfulness.curves(model, images[0], target, maps[0], {"image_independent": maps[1]}, steps=4)
    assert records[0]["faithfulness"]["image_independent_deletion_auc"] == alone["image_independent_deletion_auc"]
