"""The model-parameter randomisation test (cxr/sanity_checks.py): which weights each level
re-initialises, reproducibly, and the numbers it reports (rank correlation, gain beyond)."""
import numpy as np
import pytest
import torch

from conftest import SMALL_MODEL
from cxr import sanity_checks
from model import build_model

CONFIGS = {name: {"name": name, "embedding_dim": 16, "neck": "bn", **SMALL_MODEL}
           for name in ("hybrid_convnext_vit", "convnextv2", "vit")}
CONFIGS["hybrid_convnext_vit"].update(fusion="norm", vit_stem="conv", branch_heads=True)  # make demo's model


def trained_like(config):
    """A model of `config` whose every weight and buffer is moved off any initial value, as
    training would move them (constant inits such as LayerNorm's ones included)."""
    torch.manual_seed(123)
    model = build_model(**config, pretrained=False).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 + 0.01 * torch.rand_like(value))
    return model


@pytest.fixture(scope="module")
def hybrid():
    return trained_like(CONFIGS["hybrid_convnext_vit"])


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_all_layers_copy_is_a_fresh_model_and_differs_in_every_tensor(hybrid):
    config = CONFIGS["hybrid_convnext_vit"]
    levels = sanity_checks.cascade_levels(hybrid)
    name, keys = levels[-1]
    assert name == "all" and sorted(keys) == sorted(hybrid.state_dict())
    copy = sanity_checks.randomised_copy(hybrid, config, keys, seed=0)
    fresh = sanity_checks.fresh_model(config, seed=0).state_dict()
    trained = hybrid.state_dict()
    for key, value in copy.state_dict().items():
        assert torch.equal(value, fresh[key]), key
        if value.is_floating_point():
            assert not torch.equal(value, trained[key]), key
    for name, parameter in copy.named_parameters():
        assert not torch.equal(parameter, dict(hybrid.named_parameters())[name]), name
    assert not copy.training


def test_head_level_changes_only_the_head_and_levels_are_cumulative(hybrid):
    config = CONFIGS["hybrid_convnext_vit"]
    levels = sanity_checks.cascade_levels(hybrid)
    assert [name for name, _ in levels] == ["head", "head+stage4", "head+stages4-3", "head+stages4-2",
                                            "head+stages4-1", "all"]
    trained = state(hybrid)
    head_keys = levels[0][1]
    assert head_keys and all(k.startswith(("head.", "branch_heads.", "branch_norms.")) for k in head_keys)
    copy = sanity_checks.randomised_copy(hybrid, config, head_keys).state_dict()
    for key, value in copy.items():
        if key in head_keys:
            assert not value.is_floating_point() or not torch.equal(value, trained[key]), key
        else:
            assert torch.equal(value, trained[key]), key  # bit-identical below the head
    assert torch.equal(state(hybrid)["head.proj.weight"], trained["head.proj.weight"])  # the original untouched
    for (_, fewer), (_, more) in zip(levels, levels[1:]):
        assert set(fewer) < set(more)
    groups = sanity_checks.parameter_groups(hybrid)
    assert list(groups) == ["head", "stage4", "stage3", "stage2", "stage1", "stem"]
    assert "convnext.backbone.stages_3.blocks.0.conv_dw.weight" in groups["stage4"]
    assert "vit.backbone.blocks.11.attn.qkv.weight" in groups["stage4"]
    assert "vit.backbone.blocks.0.attn.qkv.weight" in groups["stage1"]
    assert "convnext.backbone.stages_0.blocks.0.conv_dw.weight" in groups["stage1"]
    assert "vit.backbone.pos_embed" in groups["stem"] and "convnext.backbone.stem_0.weight" in groups["stem"]
    # the top stage's copy keeps the stages below it trained, and re-initialises the head as well
    top = sanity_checks.randomised_copy(hybrid, config, levels[1][1]).state_dict()
    upper, lower = "vit.backbone.blocks.10.mlp.fc1.weight", "vit.backbone.blocks.8.mlp.fc1.weight"
    assert not torch.equal(top[upper], trained[upper]) and torch.equal(top[lower], trained[lower])
    assert torch.equal(top["head.proj.weight"], copy["head.proj.weight"])  # the same fresh weights at every level


def test_randomisation_is_reproducible_for_a_seed_and_leaves_the_random_state(hybrid):
    config = CONFIGS["hybrid_convnext_vit"]
    keys = sanity_checks.cascade_levels(hybrid)[-1][1]
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a = sanity_checks.randomised_copy(hybrid, config, keys, seed=0).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random numbers are not consumed
    b = sanity_checks.randomised_copy(hybrid, config, keys, seed=0).state_dict()
    c = sanity_checks.randomised_copy(hybrid, config, keys, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.proj.weight"], c["head.proj.weight"])


@pytest.mark.parametrize("name", ["convnextv2", "vit"])
def test_cascade_of_the_single_backbone_models(name):
    model = trained_like(CONFIGS[name])
    levels = sanity_checks.cascade_levels(model)
    assert [n for n, _ in levels] == ["head", "head+stage4", "head+stages4-3", "head+stages4-2",
                                      "head+stages4-1", "all"]
    assert sorted(levels[-1][1]) == sorted(model.state_dict())
    groups = sanity_checks.parameter_groups(model)
    assert sum(len(g) for g in groups.values()) == len(model.state_dict())  # each key in one group
    top = "branch.mxa.channel.mlp.0.weight" if name == "convnextv2" else "branch.backbone.norm.weight"
    assert top in groups["stage4"]
    copy = sanity_checks.randomised_copy(model, CONFIGS[name], levels[2][1])
    assert copy(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_spearman_and_its_interval():
    a = np.random.default_rng(0).random((8, 8))
    assert sanity_checks.spearman(a, a) == pytest.approx(1.0)
    assert sanity_checks.spearman(a, 1 - a) == pytest.approx(-1.0)
    assert sanity_checks.spearman(a, a ** 3) == pytest.approx(1.0)  # ranks only
    assert sanity_checks.spearman(a, np.zeros((8, 8))) is None  # a constant map has no ranks
    summary = sanity_checks.mean_interval([0.2, 0.4, None, 0.6])
    assert summary["mean"] == pytest.approx(0.4) and summary["n"] == 3 and summary["undefined"] == 1
    assert summary["ci95"][0] < 0.4 < summary["ci95"][1]
    assert sanity_checks.mean_interval([None])["mean"] is None


def lesion_record(name, hit, mismatched):
    return {"image": name, "lesion": {"pointing_game": {"hits": {"fused": hit},
                                                        "mismatched": None if mismatched is None else
                                                        {"fused": mismatched}}}}


def test_gain_beyond_the_randomised_copy_is_paired_over_the_same_images():
    trained = [lesion_record("a", True, 0.25), lesion_record("b", True, 0.5), lesion_record("c", False, 0.0),
               lesion_record("d", True, None), {"image": "e"}]
    copy = [lesion_record("a", False, 0.25), lesion_record("b", True, 0.5), lesion_record("c", True, 0.5),
            lesion_record("d", False, None)]
    assert sanity_checks.per_image_gains(trained) == {"a": 0.75, "b": 0.5, "c": 0.0, "d": None}
    beyond = sanity_checks.gain_beyond(trained, copy)
    # per image: a 0.75 - (-0.25) = 1, b 0, c 0 - 0.5 = -0.5; d has no mismatched value
    assert beyond["n"] == 3 and beyond["mean"] == pytest.approx(0.5 / 3)
