"""Is the map faithful to the model: deletion and insertion curves (Petsiuk et al., 2018) of
the similarity to the explained target, each beside the same curves for two maps that know
nothing of the image at hand, over the same images:

- a smooth random map (Gaussian-blurred noise: it removes contiguous regions as a saliency map
  does, unlike a per-pixel random order, which every smooth map beats);
- an image-independent map: the mean map of the image's predicted class over the *other*
  explained images (or a centred Gaussian blob when the class has no other image). A map that
  only knows where the class usually looks scores this.

A faithful map has a smaller deletion and a larger insertion area than both (summary: paired
per-image advantages with t intervals, localisation.paired_difference).

Beside them the ROAD curves (cxr/road.py: removed pixels imputed from their neighbours, most
and least relevant first), against the same two baselines: a fill that leaks nothing of the
removed pixels' shape, where grey patches and blurs are out of the training distribution.
"""
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cxr import road
from cxr.localisation import paired_difference

SMOOTH_RANDOM_SIGMA = 0.05  # of the map's width: blobs about the size of a lesion
BLOB_SIGMA = 0.25  # of the map's width: the centred Gaussian, when no class mean exists


@torch.inference_mode()
def curves(model, image, target, saliency, baselines, steps=16):
    """Deletion and insertion curves (Petsiuk et al., 2018) of one image (3, H, W): the
    similarity to `target` as the most salient pixels are removed (deletion) or restored
    (insertion), in `steps` equal parts. Areas are taken over 0..1 on the x axis: a faithful map
    has a smaller deletion and a larger insertion area than `baselines` ({name: (H, W) map},
    scored the same way on the same image; see the module's docstring)."""
    # Deletion fills with the image's mean (removes the content), insertion starts from a
    # blurred copy (a constant start would be out of distribution for every step).
    grey = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    blurred = F.avg_pool2d(image[None], 9, stride=1, padding=4, count_include_pad=False)[0]
    target = F.normalize(target.float(), dim=0)
    pixels = saliency.numel()
    counts = torch.linspace(0, pixels, steps + 1).round().long()

    def curve(ranking, start, end):
        batch = []
        for n in counts.tolist():
            mask = torch.zeros(pixels, dtype=torch.bool)
            mask[ranking[:n]] = True
            mask = mask.view(1, *image.shape[-2:]).to(image.device)
            batch.append(torch.where(mask, end, start))
        return (model(torch.stack(batch)).float() @ target).tolist()

    result = {}
    for name, ranked in (("", saliency), *((f"{k}_", m) for k, m in baselines.items())):
        # stable: flat regions of a map (a blob's tail) are taken in the same order every run
        order = torch.argsort(torch.as_tensor(ranked, dtype=torch.float32).flatten().cpu(),
                              descending=True, stable=True)
        deletion, insertion = curve(order, image, grey), curve(order, blurred, image)
        result[f"{name}deletion_auc"] = float(np.trapezoid(deletion, dx=1 / steps))
        result[f"{name}insertion_auc"] = float(np.trapezoid(insertion, dx=1 / steps))
        if not name:
            result["deletion_curve"], result["insertion_curve"] = deletion, insertion
    return result


def add_to_records(ctx):
    """Curves of the queued images (the first --faithfulness-images), once the whole list is
    explained: the image-independent baseline is the mean map of the image's predicted class
    over the *other* explained images (its own map would leak into it), or a centred Gaussian
    when the class has no other image; the smooth random map, and the noise of the ROAD
    imputation, are seeded by the image's position in the list. ctx["road"] False: no ROAD."""
    for record, index, image, target, saliency in ctx["faithfulness_queue"]:
        total, count = ctx["class_maps"][record["predicted"]]
        if count > 1:
            independent, kind = (total - saliency) / (count - 1), "class_mean_map"
        else:
            independent, kind = centred_blob(tuple(saliency.shape)), "centred_gaussian"
        baselines = {"smooth_random": smooth_random_map(tuple(saliency.shape), seed=[0, index]),
                     "image_independent": independent}
        image, target = image.to(ctx["device"]), target.to(ctx["device"])
        record["faithfulness"] = curves(ctx["model"], image, target, saliency, baselines, ctx["faithfulness_steps"])
        if ctx.get("road", False):
            record["faithfulness"].update(road.curves(ctx["model"], image, target, saliency, baselines,
                                                      ctx["faithfulness_steps"], seed=index))
        record["faithfulness"]["image_independent_map"] = kind
    ctx["faithfulness_queue"] = []


def smooth_random_map(shape, seed, sigma=SMOOTH_RANDOM_SIGMA):
    """Gaussian-blurred white noise of `shape` (H, W), blur sigma a fraction of the width:
    a map as smooth as a saliency map that knows nothing."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    return ndimage.gaussian_filter(noise, sigma * shape[1], mode="reflect")


def centred_blob(shape, sigma=BLOB_SIGMA):
    """A Gaussian centred on the image: the image-independent map when no class mean exists."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    s = sigma * shape[1]
    return np.exp(-(((rows - (shape[0] - 1) / 2) ** 2 + (cols - (shape[1] - 1) / 2) ** 2) / (2 * s * s)))


def summary(records):
    """Mean deletion/insertion areas of the maps and of both baselines over the same images,
    each baseline's paired advantage (deletion: baseline - map; insertion: map - baseline;
    positive = the map is more faithful), and whether the map beats each and both; the same
    for the ROAD areas (MoRF as deletion, LeRF as insertion) under "road" where they were run."""
    curves = [r["faithfulness"] for r in records if "faithfulness" in r]
    if not curves:
        return None
    out = {"num_images": len(curves),
           "image_independent_maps": dict(Counter(c["image_independent_map"] for c in curves)),
           **compare(curves, "deletion", "insertion")}
    with_road = [c for c in curves if "road_morf_auc" in c]
    if with_road:
        out["road"] = {"num_images": len(with_road), "noise": road.NOISE,
                       **compare(with_road, "road_morf", "road_lerf")}
    return out


def compare(curves, lower, higher):
    """The map's mean `lower`_auc (more faithful when lower) and `higher`_auc (more faithful when
    higher) beside each baseline's, with the paired advantages and whether the map beats them."""
    def mean(key):
        return float(np.mean([c[key] for c in curves]))

    out = {"map": {f"{lower}_auc": mean(f"{lower}_auc"), f"{higher}_auc": mean(f"{higher}_auc")}}
    for base in ("smooth_random", "image_independent"):
        removal = paired_difference([c[f"{base}_{lower}_auc"] for c in curves], [c[f"{lower}_auc"] for c in curves])
        keeping = paired_difference([c[f"{higher}_auc"] for c in curves], [c[f"{base}_{higher}_auc"] for c in curves])
        out[base] = {f"{lower}_auc": mean(f"{base}_{lower}_auc"), f"{higher}_auc": mean(f"{base}_{higher}_auc"),
                     f"{lower}_advantage": removal, f"{higher}_advantage": keeping,
                     "beaten": removal["mean"] > 0 and keeping["mean"] > 0,
                     "beaten_beyond_ci": all(d["ci95"] is not None and d["ci95"][0] > 0 for d in (removal, keeping))}
    out["beats_both"] = out["smooth_random"]["beaten"] and out["image_independent"]["beaten"]
    out["beats_both_beyond_ci"] = (out["smooth_random"]["beaten_beyond_ci"]
                                   and out["image_independent"]["beaten_beyond_ci"])
    return out
