"""Sanity checks for saliency maps (Adebayo et al., 2018): the model-parameter randomisation test.

A map that explains the model must change when the model's weights are destroyed. The same
explanation is therefore run again on copies of the checkpoint whose weights are re-initialised
by the model's own init code (model.build_model from the checkpoint's config, timm's init for
the backbones, a fixed seed), each copy with the whole pipeline of its own (gallery embeddings,
prototypes, votes, targets; the integrated-gradients reference image is the data's and stays):

- "all": every weight and buffer re-initialised;
- the cascade, as in the paper from the output down: the embedding head (fusion head, branch
  heads, branch norms and the BN neck) first, then with it the top stage (ConvNeXt stage 4, its
  MXA block, the top quarter of the ViT blocks and the ViT's final norm), then the next stage
  down ..., and last the stems (ConvNeXt stem, ViT patch or conv stem, position embedding and
  class token), which makes the last level "all".

Per copy: the pointing game, its image-specific gain and the faithfulness numbers beside the
trained model's on the same images; the Spearman rank correlation between the trained and the
randomised fused map of each image (high = the map did not notice the weights went); and the
gain beyond the randomised copy: the per-image image-specific gain of the trained model minus
the copy's, a paired t interval over the images (localisation.paired_difference).
"""
import re

import numpy as np
import torch
from scipy import stats

from cxr.localisation import paired_difference
from model import build_model

SEED = 0  # --sanity-seed: the re-initialisation's seed
HEAD_PREFIXES = ("head.", "branch_heads.", "branch_norms.")
ALL = "all"


STAGE_PATTERNS = (r"\.stages_(\d+)\.",  # ConvNeXt, numbered from 0
                  r"\.layer(\d+)\.", r"\.(?:denseblock|transition)(\d+)\.")  # ResNet, DenseNet: from 1
VIT_BLOCK = r"backbone\.blocks\.(\d+)\."
ABOVE_TOP_STAGE = r"\.mxa\.|backbone\.(?:norm|fc_norm|features\.norm5)\."  # MXA, the final norms


def stage_of(key, vit_depth, stages=4):
    """The group of a state-dict key: "head", "stage<k>" (k = 1 lowest .. `stages` top) or "stem".
    ViT blocks are split from the top into `stages` groups of (nearly) equal size, so the hybrid's
    two branches are randomised down to the same depth together."""
    if key.startswith(HEAD_PREFIXES):
        return "head"
    for number, pattern in enumerate(STAGE_PATTERNS):
        found = re.search(pattern, key)
        if found:
            return f"stage{int(found.group(1)) + (number == 0)}"
    block = re.search(VIT_BLOCK, key)
    if block:
        groups = np.array_split(np.arange(vit_depth), stages)
        return f"stage{next(g for g, members in enumerate(groups, 1) if int(block.group(1)) in members)}"
    if re.search(ABOVE_TOP_STAGE, key):
        return f"stage{stages}"
    return "stem"  # ConvNeXt and ResNet stems, ViT patch or conv stem, position embedding, class token


def parameter_groups(model):
    """{"head": [keys], "stage4": [...], ..., "stage1": [...], "stem": [...]}, top down, of the
    model's state dict (parameters and buffers); every key is in exactly one group."""
    keys = list(model.state_dict())
    blocks = [re.search(VIT_BLOCK, k) for k in keys if ".stages_" not in k]
    depth = max((int(b.group(1)) + 1 for b in blocks if b), default=0)
    found = [stage_of(k, depth) for k in keys]
    stages = sorted({g for g in found if g.startswith("stage")}, key=lambda g: -int(g[len("stage"):]))
    groups = {name: [k for k, g in zip(keys, found) if g == name] for name in ["head", *stages, "stem"]}
    return {name: members for name, members in groups.items() if members}


def cascade_levels(model):
    """[(name, keys re-initialised)], cumulative from the head down: "head", "head+stage4",
    "head+stages4-3", ..., and last "all" (the stems too: every key of the state dict)."""
    groups = list(parameter_groups(model).items())
    levels, keys = [], []
    for i, (group, members) in enumerate(groups):
        keys = keys + members
        numbers = [g[len("stage"):] for g, _ in groups[:i + 1] if g.startswith("stage")]
        name = ("head" if not numbers else f"head+stage{numbers[0]}" if len(numbers) == 1
                else f"head+stages{numbers[0]}-{numbers[-1]}")
        levels.append((ALL if i == len(groups) - 1 else name, keys))
    return levels


def levels_for(model, mode):
    """The levels --sanity `mode` runs: "all" alone, or every cascade level (ending with "all")."""
    levels = cascade_levels(model)
    return levels[-1:] if mode == ALL else levels


def fresh_model(config, seed=SEED):
    """The model of `config` (a checkpoint's model_config) with its own initial weights, drawn
    under `seed` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(**config, pretrained=False)


def randomised_copy(model, config, keys, seed=SEED):
    """A copy of the trained `model` whose state-dict entries `keys` (parameters and buffers such
    as BatchNorm statistics) are those of a freshly initialised model of the same `config`; every
    other entry is the trained one, bit for bit. In eval mode, on the trained model's device."""
    copy = fresh_model(config, seed)
    fresh, keys = copy.state_dict(), set(keys)
    copy.load_state_dict({k: fresh[k] if k in keys else v.detach().clone() for k, v in model.state_dict().items()})
    device = next(model.parameters()).device
    return copy.to(device).eval()


def spearman(a, b):
    """Spearman's rank correlation of two maps over their pixels; None where one is constant."""
    a, b = (np.asarray(m, dtype=np.float64).ravel() for m in (a, b))
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # e.g. an integrated-gradients map with no positive part
        return None
    return float(stats.spearmanr(a, b).statistic)


def mean_interval(values):
    """{"mean", "ci95" (t interval over the values, None for fewer than two), "n", "undefined"}."""
    defined = [v for v in values if v is not None]
    out = paired_difference(defined, [0.0] * len(defined)) or {"mean": None, "ci95": None, "n": 0}
    return {**out, "undefined": len(values) - len(defined)}


def per_image_gains(records, key="pointing_game", branch="fused"):
    """{image: own hit - mean hit on the other images' lesions} of the records with a lesion
    (None where the class has a single lesion image): the per-image values whose mean is
    localisation's image-specific gain."""
    gains = {}
    for record in records:
        if "lesion" not in record:
            continue
        block = record["lesion"][key]
        mismatched = (block["mismatched"] or {}).get(branch)
        gains[record["image"]] = None if mismatched is None else float(block["hits"][branch]) - mismatched
    return gains


def gain_beyond(trained_records, copy_records, key="pointing_game"):
    """Paired difference of the per-image gains, trained minus randomised, over the same images."""
    trained, copy = per_image_gains(trained_records, key), per_image_gains(copy_records, key)
    shared = [name for name in trained if name in copy]
    return paired_difference([trained[n] for n in shared], [copy[n] for n in shared])


def copy_summary(keys, aggregate, trained_records, copy_records, trained_maps, copy_maps):
    """What the sanity entry holds for one randomised copy (see the module's docstring)."""
    game = (aggregate.get("pointing_game") or {}).get("overall") or {}
    wide = (aggregate.get("pointing_game_at_10pct") or {}).get("overall") or {}
    return {"randomised_keys": len(keys),
            "pointing": (game.get("map") or {}).get("fused"),
            "mismatched": (game.get("mismatched") or {}).get("fused"),
            "pointing_at_10pct": (wide.get("map") or {}).get("fused"),
            "image_specific_gain": (aggregate.get("image_specific_gain") or {}).get("overall"),
            "gain_beyond": gain_beyond(trained_records, copy_records),
            "vote_accuracy": aggregate.get("vote_accuracy"),
            "faithfulness": aggregate.get("faithfulness"),
            "spearman": mean_interval([spearman(a, b) for a, b in zip(trained_maps, copy_maps)])}


def run(model, config, mode, seed, trained_records, trained_maps, explain_copy):
    """The sanity entry of explain.py's aggregate: every level of --sanity `mode` explained by
    `explain_copy(name, randomised model)` -> (records, aggregate, fused maps at the model's
    resolution, in the order of `trained_maps`)."""
    copies = {}
    for name, keys in levels_for(model, mode):
        records, aggregate, maps = explain_copy(name, randomised_copy(model, config, keys, seed))
        copies[name] = copy_summary(keys, aggregate, trained_records, records, trained_maps, maps)
    return {"test": "model-parameter randomisation (Adebayo et al., 2018)", "mode": mode, "seed": seed,
            "levels": list(copies), "copies": copies, "gain_beyond_randomised": copies[ALL]["gain_beyond"]}
