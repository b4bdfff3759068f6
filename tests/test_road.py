"""ROAD (cxr/road.py): the noisy linear imputation and the MoRF / LeRF curves."""
import numpy as np
import pytest
import torch

from cxr import faithfulness, road
from test_localisation import RegionModel


def ramp(size=16):
    """Three channels, each a different linear function of the row and the column."""
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    return torch.tensor(np.stack([2 * cols + 3 * rows, cols - rows, 0.5 * cols + 7]))


def test_with_no_pixel_removed_the_image_is_unchanged():
    image = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0))
    out = road.impute(image, np.zeros((12, 10), bool), noise=0.5)
    assert torch.equal(out, image) and out is not image


def test_removed_pixels_inside_a_linear_ramp_are_restored_to_the_ramp():
    image = ramp()
    one = np.zeros((16, 16), bool)
    one[7, 9] = True
    assert torch.allclose(road.impute(image, one, noise=0), image, atol=1e-5)
    # a whole block, solved jointly: the ramp is the only solution of the neighbours' means
    block = np.zeros((16, 16), bool)
    block[3:11, 4:13] = True
    filled = road.impute(image, block, noise=0)
    assert torch.allclose(filled, image, atol=1e-4)
    # with noise the imputed pixels leave the ramp, by about the noise's size
    noisy = road.impute(image, block, noise=0.01)
    assert not torch.allclose(noisy, image, atol=1e-4) and torch.allclose(noisy, image, atol=0.1)


def test_an_imputed_pixel_is_the_weighted_mean_of_its_neighbours():
    image = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(3))
    removed = np.zeros((9, 9), bool)
    removed[4, 4] = True
    filled = road.impute(image, removed, noise=0)
    neighbours = sum(w * image[:, 4 + dy, 4 + dx] for (dy, dx), w in road.NEIGHBOUR_WEIGHTS.items())
    assert torch.allclose(filled[:, 4, 4], neighbours, atol=1e-6)
    assert sum(road.NEIGHBOUR_WEIGHTS.values()) == pytest.approx(1.0)
    # a corner pixel: the mean over the three neighbours inside the image, weights renormalised
    corner = np.zeros((9, 9), bool)
    corner[0, 0] = True
    expected = (image[:, 0, 1] / 6 + image[:, 1, 0] / 6 + image[:, 1, 1] / 12) / (1 / 6 + 1 / 6 + 1 / 12)
    assert torch.allclose(road.impute(image, corner, noise=0)[:, 0, 0], expected, atol=1e-6)


def test_known_pixels_never_change_and_a_seed_gives_the_same_image():
    image = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(1))
    removed = np.random.default_rng(0).random((20, 20)) < 0.6
    a = road.impute(image, removed, seed=[4, 2])
    assert torch.equal(a[:, ~torch.from_numpy(removed)], image[:, ~torch.from_numpy(removed)])
    assert torch.equal(a, road.impute(image, removed, seed=[4, 2]))
    b = road.impute(image, removed, seed=[4, 3])
    assert not torch.equal(a, b)
    # the noise is small and on the removed pixels only: the solved fill is the same for both seeds
    assert (a - b).abs().max() < 10 * road.NOISE
    everything = road.impute(image, np.ones((20, 20), bool), noise=0)
    assert torch.allclose(everything, image.mean(dim=(1, 2), keepdim=True).expand_as(image))


def test_road_curves_rank_a_map_of_the_used_pixels_above_both_baselines_and_summarise():
    region = torch.zeros(24, 24, dtype=torch.bool)
    region[2:8, 14:21] = True  # off-centre, so the centred blob does not cover it
    model, target = RegionModel(region), torch.tensor([1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(5):
        image = torch.rand(3, 24, 24, generator=generator) * 0.2
        image[:, region] += 0.8  # bright where the model looks: imputing from outside darkens it
        truth = region.float() + 0.01 * torch.rand(24, 24, generator=generator)
        baselines = {"smooth_random": faithfulness.smooth_random_map((24, 24), seed=[0, index]),
                     "image_independent": faithfulness.centred_blob((24, 24))}
        curves = road.curves(model, image, target, truth, baselines, steps=6, seed=index)
        assert len(curves["road_morf_curve"]) == 7 and curves["road_morf_curve"][0] == pytest.approx(
            curves["road_lerf_curve"][0])  # nothing removed yet: the image itself
        assert curves["road_morf_auc"] < curves["road_lerf_auc"]
        records.append({"faithfulness": {**faithfulness.curves(model, image, target, truth, baselines, steps=6),
                                         **curves, "image_independent_map": "centred_gaussian"}})
    again = road.curves(model, image, target, truth, baselines, steps=6, seed=4)
    assert again == curves  # deterministic for a seed
    summary = faithfulness.summary(records)["road"]
    assert summary["num_images"] == 5 and summary["beats_both"] and summary["beats_both_beyond_ci"]
    for base in ("smooth_random", "image_independent"):
        assert summary[base]["road_morf_advantage"]["mean"] == pytest.approx(
            summary[base]["road_morf_auc"] - summary["map"]["road_morf_auc"])
        assert summary[base]["road_lerf_advantage"]["mean"] == pytest.approx(
            summary["map"]["road_lerf_auc"] - summary[base]["road_lerf_auc"])
    # the opposite map (everything but the region first) loses to the random one
    worse = road.curves(model, image, target, 1 - truth, baselines, steps=6)
    assert worse["road_morf_auc"] > worse["smooth_random_road_morf_auc"]
