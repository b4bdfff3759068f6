"""Explain a retrieval: which pixels make the query look like its finding (integrated gradients
from the mean normal image, and each branch's layer map), what the lung and heart masks say about
it, which radiological signs of cxr/ontology.json that supports, how much of the similarity each
branch carries, and how faithful the map is.

One image (overlays, a figure with the neighbours, explanation.json):

    python explain.py --resume CKPT --image IMG --gallery-image-list LIST --gallery-dataset-dir DIR \\
        [--lung-mask M --heart-mask M | --mask-dir DIR | --chexmask CSV] --out OUTDIR

A list (summary.json = {"images": [...], "aggregate": {...}}; with lesion masks under
<mask-dir>/lesion the aggregate holds the pointing game at --pointing-tolerance (and 10%), its
chance level, the mismatched-lesion baseline and the image-specific gain, zone agreement, and,
given a fitting list with lesion masks, the location-prior baseline; see cxr/localisation.py):

    python explain.py --resume CKPT --image-list LIST --dataset-dir DIR \\
        --gallery-image-list LIST --gallery-dataset-dir DIR --mask-dir DIR --out OUTDIR \\
        [--prior-image-list TRAIN_LIST --prior-dataset-dir TRAIN_DIR]

Lung and heart masks from CheXmask (one CSV per source collection, rows matched to the images
by id; rows whose Dice RCA (Mean) is below --min-mask-dice give null region statistics):

    python explain.py ... --chexmask MIMIC-CXR-JPG.csv.gz [--chexmask-id-column dicom_id]

The checkpoint's own validation or test images (choose settings on val, report on test; the
gallery and the location prior then come from the training list less validation):

    python explain.py --resume CKPT --split val --mask-dir DIR --out OUTDIR [--sanity all|cascade]

--sanity adds the model-parameter randomisation test (cxr/sanity_checks.py): the same list explained
by copies of the checkpoint with re-initialised weights, and the trained gain beyond them.

The gallery defaults to the checkpoint's training list. The map's target (--target) is by default
the predicted class's mean gallery embedding (the neighbours' majority vote) minus the reference
class's (--reference-class, "normal"), or that mean embedding alone, or the query's k-th
neighbour; the map (--method) is by default integrated gradients from the reference class's mean
gallery image (cxr/gradcam.py). saliency_selection.py chose these on validation phantoms.
"""
import argparse
import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cxr import (
    chexmask_csv,
    cli,
    explain_figures,
    explain_inputs,
    faithfulness,
    image_cache,
    localisation,
    progress,
    regions,
    run_data,
    sanity_checks,
)
from cxr import masks as mask_sources
from cxr import ontology as onto
from cxr.atomic_files import write_json
from cxr.checkpoints import data_bit_depth, load_checkpoint, load_trained_model
from cxr.embeddings import class_prototypes, extract_embeddings, has_branches
from cxr.errors import UserError
from cxr.gradcam import METHODS, RetrievalGradCAM, branch_attribution, branch_weights, default_layers, heatmaps
from cxr.images import load_image
from cxr.presets import LIST_FORMAT, split_folder
from cxr.retrieval_metrics import majority_vote
from cxr.runtime import Runtime, refuse_distributed, setup_runtime
from dataset import ImageListDataset, build_transform


# ---------------------------------------------------------------------- gallery
def embed_gallery(model, dataset, device, batch_size, workers):
    """Embeddings (N, D), labels (N,) and, for the hybrid, each branch's mean pooled features
    (the reference of the branch attribution), in one pass (embeddings.extract_embeddings)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    runtime = Runtime(device=device)
    if not has_branches(model):
        embeddings, labels = extract_embeddings(model, loader, runtime, progress=False)
        return embeddings, labels, {}
    embeddings, labels, features = extract_embeddings(model, loader, runtime, progress=False,
                                                            branch_features=True)
    return embeddings, labels, {b: f.mean(0) for b, f in features.items()}


# ---------------------------------------------------------------------- one batch of queries
def explanation_targets(ctx, votes, neighbours):
    """(B, D) embeddings the maps explain the similarity to (--target): the predicted class's
    prototype; or, for contrast, that prototype minus the reference class's (the evidence for
    the finding over a normal radiograph), the reference prototype itself for images predicted
    as the reference class; or the query's k-th neighbour."""
    if ctx["target"] == "prototype":
        return ctx["prototypes"][votes]
    if ctx["target"] == "contrast":
        reference = ctx["prototypes"][ctx["reference"]]
        return torch.where((votes == ctx["reference"])[:, None], reference, ctx["prototypes"][votes] - reference)
    return ctx["gallery"][neighbours[:, ctx["neighbour_rank"] - 1]]


def target_name(ctx, predicted):
    """What the map explains, in words: e.g. "prototype of Cardiomegaly|Effusion minus prototype of
    No Finding" for a film retrieved with two findings."""
    if ctx["target"] == "prototype":
        return f"prototype of {predicted}"
    if ctx["target"] == "contrast":
        reference = ctx["classes"][ctx["reference"]] if isinstance(ctx["reference"], int) else None
        if reference is None or predicted == reference:
            return f"prototype of {predicted}"
        return f"prototype of {predicted} minus prototype of {reference}"
    return f"neighbour {ctx['neighbour_rank']}"


def explain_batch(ctx, paths, labels=None, masks=None):
    """Records for images at `paths` (their original files); `masks` a list of dicts with
    lungs/heart/lesion bool arrays (and per-lung "sides"), None, or functions of the image's
    (H, W) giving such a dict (masks decoded at the image's size, see mask_sources.MaskReader)."""
    device, transform = ctx["device"], ctx["transform"]
    originals = [load_image(p, ctx["bit_depth"]) for p in paths]
    images = torch.stack([transform(img) for img in originals]).to(device)
    with torch.inference_mode():
        embeddings = ctx["model"](images).float()
    scores, neighbours = (embeddings @ ctx["gallery"].T).topk(ctx["topk"], dim=1)
    votes = majority_vote(ctx["gallery_labels"][neighbours], len(ctx["classes"]))
    targets = explanation_targets(ctx, votes, neighbours)
    attribution = branch_attribution(ctx["model"], images, targets, ctx["branch_means"])
    maps = ctx["cam"](images, targets, branch_weights=branch_weights(attribution))
    records = []
    for i, (path, original) in enumerate(zip(paths, originals)):
        size = (original.height, original.width)
        full = {b: F.interpolate(maps[b][i][None, None], size=size, mode="bilinear",
                                 align_corners=False)[0, 0].cpu().numpy() for b in ctx["branches"]}
        mask = (masks[i] if masks else None) or {}
        mask = mask(size) if callable(mask) else mask
        stats = regions.region_statistics(full["fused"], mask.get("lungs"), mask.get("heart"), ctx["salient"],
                                          sides=mask.get("sides"))
        predicted = ctx["classes"][int(votes[i])]
        reasoning = onto.reason(ctx["ontology"], stats, predicted)
        record = {
            "image": ctx["names"][i],
            "label": labels[i] if labels is not None else None,
            "predicted": predicted,
            "votes": {ctx["classes"][c]: int(n) for c, n in enumerate(torch.bincount(
                ctx["gallery_labels"][neighbours[i]], minlength=len(ctx["classes"])).tolist()) if n},
            "peak_xy": stats["peak_xy"], "top_zone": stats["top_zone"], "ctr": stats["ctr"],
            "rules_fired": reasoning["rules_fired"], "contradicting": reasoning["contradicting"],
            "rules_not_evaluated": sorted(reasoning["not_evaluated"]),
            "target": ctx["target"], "target_name": target_name(ctx, predicted),
            "target_similarity": float(maps["similarity"][i]),
            "neighbours": [{"path": ctx["gallery_paths"][j], "label": ctx["classes"][int(ctx["gallery_labels"][j])],
                            "similarity": float(s)} for s, j in zip(scores[i].tolist(), neighbours[i].tolist())],
            "branch_attribution": attribution[i] if attribution else None,
            "regions": {k: v for k, v in stats.items() if k not in ("peak_xy", "top_zone", "ctr")},
            "peaks": {b: list(np.unravel_index(int(full[b].argmax()), size))[::-1] for b in ctx["branches"]},
            "sentences": reasoning["sentences"],
        }
        if mask.get("info"):  # where the masks came from and whether they were good enough
            record["masks"] = mask["info"]
        record["peaks"] = {b: [int(v) for v in xy] for b, xy in record["peaks"].items()}
        fused = maps["fused"][i].detach().cpu()
        if ctx["keep_maps"]:  # at the model's resolution, for the sanity checks' rank correlation
            ctx["fused_maps"].append(fused.numpy())
        total, count = ctx["class_maps"].get(predicted, (0, 0))
        ctx["class_maps"][predicted] = (total + fused, count + 1)  # the image-independent baseline
        if ctx["faithfulness_steps"] and ctx["faithfulness_left"] > 0:
            ctx["faithfulness_left"] -= 1  # curves once the list is done (faithfulness.add_to_records)
            ctx["faithfulness_queue"].append((record, ctx["seen"] + i, images[i].cpu(), targets[i].cpu(), fused))
        if mask.get("lesion") is not None and mask["lesion"].any():
            record["lesion"] = localisation.lesion_check(full, mask, size, ctx["branches"], stats["top_zone"],
                                                         ctx["tolerances"], ctx["prior"], record["label"])
        records.append((record, full, original))
    return records


def aggregate(records, branches, tolerance_keys=None, prior=None, zones_from=None):
    """Means over the records: the pointing game, its baselines and zone agreement on images
    with a lesion mask (localisation.lesion_aggregate), rule firing rates per label,
    faithfulness against its baselines, branch shares, CTR."""
    out = {"num_images": len(records)}
    out.update(localisation.lesion_aggregate(records, branches, tolerance_keys or localisation.tolerances(),
                                             prior, zones_from))
    labels = sorted({r["label"] for r in records if r["label"] is not None})
    rules = sorted({rule for r in records for rule in r["rules_fired"]})
    # Rules that could not run for want of masks: a firing rate of 0 would otherwise read as "absent".
    out["images_with_rules_not_evaluated"] = sum(bool(r.get("rules_not_evaluated")) for r in records)
    out["rules_fired_rate_by_label"] = {
        label: {rule: float(np.mean([rule in r["rules_fired"] for r in records if r["label"] == label]))
                for rule in rules} for label in labels}
    if labels:
        out["vote_accuracy"] = float(np.mean([r["predicted"] == r["label"] for r in records]))
    faithful = faithfulness.summary(records)
    if faithful:
        out["faithfulness"] = faithful
    shares = [r["branch_attribution"]["convnext_share"] for r in records
              if r["branch_attribution"] and r["branch_attribution"]["convnext_share"] is not None]
    if shares:
        out["convnext_share_of_similarity"] = float(np.mean(shares))
    ctrs = [r["ctr"] for r in records if r["ctr"] is not None]
    if ctrs:
        measured = {label: [r["ctr"] for r in records if r["label"] == label and r["ctr"] is not None]
                    for label in labels}
        out["ctr_by_label"] = {label: float(np.mean(values)) for label, values in measured.items() if values}
    return out


# ---------------------------------------------------------------------- command line
def build_context(args, model=None):
    """Everything explain_batch needs for the checkpoint --resume; `model`: another model of its
    config in place of its weights (a randomised copy, cxr/sanity_checks.py), explained with a
    gallery, prototypes and votes of its own."""
    refuse_distributed("explain.py")
    runtime = setup_runtime(args.device)
    device = runtime.device
    if model is None:
        model, checkpoint, _ = load_trained_model(args.resume, device)
    else:
        checkpoint = load_checkpoint(args.resume)
    run = run_data.recorded_run(checkpoint)
    list_format = LIST_FORMAT[args.dataset or run.get("dataset", "covid")]
    classes = checkpoint["classes"]
    img_size = checkpoint["model_config"]["img_size"]
    transform = build_transform(img_size, train=False)
    bit_depth = data_bit_depth(checkpoint)  # 16-bit files scaled as in training
    explained, fitting, gallery = explain_inputs.split_sets(args, run, runtime, classes, list_format, bit_depth)
    if gallery is None:
        gallery_list = args.gallery_image_list or run.get("train_image_list")
        recorded_dir = split_folder(run["dataset"], run["dataset_dir"], "train") if run.get("dataset_dir") else None
        gallery_dir = args.gallery_dataset_dir or recorded_dir
        if not gallery_list or not gallery_dir:
            raise UserError(f"{args.resume} does not record its training list; give "
                                  "--gallery-image-list and --gallery-dataset-dir")
        gallery = ImageListDataset(gallery_dir, gallery_list, list_format, classes, bit_depth=bit_depth or "auto",
                                   multilabel=checkpoint.get("findings") is not None,
                                   list_options={**run_data.given_list_options(args, run, "train"), "split": "train"})
        if explained is not None:
            explain_inputs.check_gallery(args, gallery, explained)
    gallery.transform = transform
    classes = gallery.classes  # a multi-label gallery may add finding combinations to the checkpoint's
    run_data.use_cache([gallery], args.cache_dir, img_size)
    embeddings, labels, means = embed_gallery(model, gallery, device, args.batch_size, args.workers)
    prototypes = class_prototypes(embeddings, labels, len(classes))
    reference = explain_inputs.reference_class(args, classes)
    method = METHODS[args.method]
    baseline = None
    if method.needs_reference:  # the image integrated gradients start from
        baseline = explain_inputs.reference_image(gallery, None if reference is None else classes.index(reference))
        baseline = baseline.to(device)
    layers = default_layers(model, convnext_stage=args.convnext_stage)
    cam = RetrievalGradCAM(model, layers, method=args.method, baseline=baseline, steps=args.ig_steps,
                           smooth=args.smooth)
    target = "prototype" if args.target == "contrast" and reference is None else args.target
    return {"model": model, "device": device, "transform": transform, "classes": classes,
            "gallery": embeddings, "gallery_labels": labels, "gallery_paths": [str(p) for p in gallery.paths],
            "prototypes": prototypes, "branch_means": means, "cam": cam, "branches": list(layers) + ["fused"],
            "topk": min(args.topk, len(gallery)), "target": target,
            "reference": None if reference is None else classes.index(reference),
            "saliency": {"method": args.method, "target": target, "reference_class": reference,
                         "ig_baseline": (f"mean image of the gallery's {reference} images" if reference
                                         else "mean image of the whole gallery (no reference class)")
                         if method.needs_reference else None,
                         "ig_steps": args.ig_steps if method.needs_reference else None,
                         "smooth_px": args.smooth if method.input_space else None},
            "neighbour_rank": min(args.neighbour_rank, len(gallery)),
            "ontology": onto.load_ontology(args.ontology), "faithfulness_steps": args.faithfulness_steps,
            "faithfulness_left": args.faithfulness_images,
            "list_format": list_format, "names": None, "layers": layers, "salient": args.salient,
            "bit_depth": bit_depth or gallery.bit_depth, "seen": 0,
            "tolerances": localisation.tolerances(args.pointing_tolerance), "prior": None,
            "class_maps": {}, "faithfulness_queue": [], "explained": explained, "fitting": fitting,
            "run": run, "multilabel": checkpoint.get("findings") is not None, "road": args.road,
            "model_config": checkpoint["model_config"], "keep_maps": args.sanity != "none", "fused_maps": []}


def main(args):
    """The checks of the flags, the context (model, gallery, targets, map), then one image's
    explanation and figure, or a list's records and aggregate."""
    progress.set_mode(args.progress)
    explain_inputs.check_flags(args)
    try:
        ctx = build_context(args)
    except onto.OntologyError as error:
        raise UserError(str(error)) from error
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return explain_one(args, ctx, out) if args.image else explain_many(args, ctx, out)


def explain_one(args, ctx, out):
    """--image: its explanation.json, overlays and figure.png (with its neighbours' maps)."""
    ctx["prior"] = explain_inputs.fit_location_prior(args, ctx, [args.image])
    reader = mask_sources.MaskReader(args, [args.image])
    ctx["names"] = [args.image]
    source = reader.source(args.image)
    if callable(source):  # CheXmask: decoded once, for the statistics and the figure's outlines
        source = functools.lru_cache(maxsize=None)(source)
    record, full, original = explain_batch(ctx, [args.image], masks=[source])[0]
    record["saliency"] = ctx["saliency"]
    faithfulness.add_to_records(ctx)
    localisation.zone_prior_agreement([record], ctx["prior"])
    if record.get("masks") and not record["masks"]["used"]:
        print(f"note: no lung or heart masks for {args.image}: {record['masks']['reason']}")
    neighbour_maps = neighbour_heatmaps(ctx, record, args.figure_neighbours)
    explain_figures.write_overlays(out, original, full)
    masks = (source((original.height, original.width)) if callable(source) else source) or {}
    if not (masks.get("info") or {}).get("used", True):  # a rejected CheXmask row: no outlines
        masks = {}
    record["figure"] = explain_figures.write_figure(out / "figure.png", original, full, record,
                                                   neighbour_maps, masks)
    record["files"] = sorted(p.name for p in out.glob("*.png"))
    write_json(out / "explanation.json", record)
    for sentence in record["sentences"]:
        print(sentence)
    print(f"wrote {out / 'explanation.json'} and the figures in {out}")
    return record


def explain_many(args, ctx, out):
    """--image-list or --split: every image's record, the aggregate against its baselines and
    the randomised copies (--sanity), in summary.json."""
    dataset = ctx["explained"] or ImageListDataset(args.dataset_dir, args.image_list, ctx["list_format"],
                                                   ctx["classes"], bit_depth=ctx["bit_depth"],
                                                   multilabel=ctx["multilabel"],
                                                   list_options=run_data.given_list_options(args, ctx["run"], "test"))
    ctx["prior"] = explain_inputs.fit_location_prior(args, ctx, dataset.paths)
    records, zones_from = explain_list(ctx, args, dataset, out, args.save_overlays)
    summary = {"images": records,
               "aggregate": aggregate(records, ctx["branches"], ctx["tolerances"], ctx["prior"], zones_from),
               "layers": ctx["layers"], "target": ctx["target"], "saliency": ctx["saliency"],
               "split": args.split, "checkpoint": str(args.resume)}
    if args.sanity != "none":
        summary["aggregate"]["sanity"] = randomisation_checks(args, ctx, dataset, records, out)
    m = ctx["mask_reader"].summary()  # CheXmask: how many images had usable masks
    if m:
        summary["aggregate"]["masks"] = m
    write_json(out / "summary.json", summary)
    explain_figures.print_aggregate(summary["aggregate"])
    print(f"wrote {out / 'summary.json'}")
    return summary


def explain_list(ctx, args, dataset, out, save_overlays=0):
    """(records, where the zone prior came from) of every image of `dataset`, in batches, with
    the baselines that need the whole list: other images' lesions, the class mean maps."""
    records, names = [], [str(p.relative_to(dataset.image_root)) for p in dataset.paths]
    ctx["mask_reader"] = reader = mask_sources.MaskReader(args, names)
    for start in range(0, len(dataset), args.batch_size):
        part = list(range(start, min(start + args.batch_size, len(dataset))))
        paths, ctx["names"] = [dataset.paths[i] for i in part], [names[i] for i in part]
        labels = [dataset.classes[int(dataset.targets[i])] for i in part]
        sources = [reader.source(name) for name in ctx["names"]]
        ctx["seen"] = start  # the list position of the batch's first image (seeds its random map)
        for record, full, original in explain_batch(ctx, paths, labels, sources):
            records.append(record)
            if len(records) <= save_overlays:
                explain_figures.write_overlays(out / "overlays" / Path(record["image"]).stem, original, full)
        print(f"  {len(records)}/{len(dataset)} explained", flush=True)
    localisation.mismatched_hits(records, lambda name, size: explain_inputs.read_lesion(args.mask_dir, name, size),
                                 ctx["tolerances"], ctx["branches"])
    zones_from = localisation.zone_prior_agreement(records, ctx["prior"])
    faithfulness.add_to_records(ctx)
    return records, zones_from


def randomisation_checks(args, ctx, dataset, records, out):
    """The aggregate's "sanity" entry (cxr/sanity_checks.py): the same list explained again by
    each randomised copy of --sanity, its summary.json under <out>/sanity/<level>/."""
    def explain_copy(name, model):
        print(f"== sanity check: weights re-initialised at level {name}", flush=True)
        copy = build_context(args, model)
        copy["prior"] = ctx["prior"]  # fitted on lesion masks: the data's, as the reference image
        copy_records, zones_from = explain_list(copy, args, dataset, out)
        result = aggregate(copy_records, copy["branches"], copy["tolerances"], copy["prior"], zones_from)
        write_json(out / "sanity" / name / "summary.json", {"images": copy_records, "aggregate": result,
                                                            "randomised": name, "seed": args.sanity_seed})
        return copy_records, result, copy["fused_maps"]

    return sanity_checks.run(ctx["model"], ctx["model_config"], args.sanity, args.sanity_seed, records,
                             ctx["fused_maps"], explain_copy)


def neighbour_heatmaps(ctx, record, count):
    """Maps of the top neighbours towards the query: where each looks like the query."""
    count = min(count, len(record["neighbours"]))
    if count == 0:
        return []
    query = ctx["transform"](load_image(ctx["names"][0], ctx["bit_depth"]))[None].to(ctx["device"])
    with torch.inference_mode():
        target = ctx["model"](query).float()[0]
    paths = [n["path"] for n in record["neighbours"][:count]]
    return heatmaps(ctx["cam"], ctx["transform"], paths, target.expand(count, -1), ctx["device"],
                    ctx["branch_means"], ctx["bit_depth"])


def get_args_parser():
    parser = argparse.ArgumentParser(description="Explain retrievals: integrated gradients and branch maps, "
                                     "region statistics, ontology rules, branch attribution")
    cli.add_resume_flag(parser, "trained checkpoint (train.py)")
    parser.add_argument("--image", help="one radiograph to explain")
    parser.add_argument("--image-list", help="a list of radiographs to explain (batch mode)")
    cli.add_dataset_dir_flag(parser, "the folder --image-list's paths are relative to (not train.py's folder of "
                         "train/ and test/)")
    parser.add_argument("--split", choices=("val", "test"),
                        help="explain the checkpoint's own validation images (the run's held-out part of "
                        "its training list; gallery and location prior from the rest of it) or its test "
                        "list (prior from the training list less validation): choose settings on val, "
                        "report on test")
    cli.add_dataset_flag(parser, "list format, as in train.py (default: the checkpoint's)")
    cli.add_public_list_flags(parser, recorded=True, mimic_split="test")
    parser.add_argument("--gallery-image-list", help="labelled gallery (default: the run's training list)")
    parser.add_argument("--gallery-dataset-dir", help="its folder (default: <run's dataset-dir>/train)")
    parser.add_argument("--lung-mask", help="binary lung mask PNG of --image")
    parser.add_argument("--heart-mask", help="binary heart mask PNG of --image")
    parser.add_argument("--mask-dir", help="folder with lungs/, heart/ and optionally lesion/ masks "
                        "named like the images (as demo_data.py and chexmask.py to-png write them)")
    parser.add_argument("--chexmask", action="append", default=[], metavar="CSV",
                        help="CheXmask CSV (.csv or .csv.gz, OriginalResolution or Preprocessed) giving "
                        "the lung and heart masks, rows matched to the images by id; repeat for several "
                        "collections (--mask-dir then only gives lesion masks)")
    parser.add_argument("--chexmask-id-column", help="the CSVs' image-id column (default: the first of "
                        + ", ".join(chexmask_csv.ID_COLUMNS) + " they have)")
    parser.add_argument("--min-mask-dice", type=float, default=chexmask_csv.DEFAULT_MIN_DICE,
                        help=f"CheXmask rows whose {chexmask_csv.DICE_MEAN} is below this give no masks "
                        "(null region statistics, counted in the summary); 0 keeps all")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--topk", type=int, default=10, help="neighbours retrieved and voting")
    parser.add_argument("--target", choices=("contrast", "prototype", "neighbour"), default="contrast",
                        help="what the map explains the similarity to: contrast (default) = the predicted "
                        "class's mean gallery embedding minus the reference class's (the prototype for "
                        "images predicted as the reference), prototype = the predicted class's mean "
                        "gallery embedding, neighbour = a retrieved neighbour (--neighbour-rank)")
    parser.add_argument("--reference-class", help="the class of --target contrast and of the integrated-"
                        "gradients reference image (default: normal, when the checkpoint has it)")
    parser.add_argument("--neighbour-rank", type=int, default=1, help="which neighbour, with --target neighbour")
    parser.add_argument("--convnext-stage", type=int, default=0, choices=range(4),
                        help="ConvNeXt stage the map is read from (stride 4 * 2**stage)")
    parser.add_argument("--method", choices=METHODS, default="ig",
                        help="the fused map: ig (default) = integrated gradients on the pixels from the "
                        "mean image of the reference class; gradient = the input gradient's magnitude "
                        "(one pass, no reference); gradnorm, gradcam, hirescam = from the "
                        "branch layers' gradients (see cxr/gradcam.py); the branch maps are layer maps")
    parser.add_argument("--ig-steps", type=int, default=8, help="integration steps of --method ig")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="Gaussian smoothing of the --method ig or gradient map, sigma in input pixels (0: none)")
    parser.add_argument("--ontology", default=str(onto.DEFAULT_ONTOLOGY), help="ontology JSON")
    parser.add_argument("--salient", type=float, default=0.0,
                        help="region statistics over the pixels at or above this fraction of the map's "
                             "maximum only (0: the whole map)")
    parser.add_argument("--pointing-tolerance", type=float, default=localisation.DEFAULT_TOLERANCE,
                        help="pointing game: the peak hits when within this fraction of the image width "
                        "of the lesion mask (0.05: 5%%, 3.2 px at 64 px); the 10%% variant is reported too")
    parser.add_argument("--prior-image-list", help="images with lesion masks (under --mask-dir) to fit the "
                        "location-prior baseline on: per class, the fixed point that hits most of their "
                        "lesions, and the most frequent lesion zone; e.g. the run's training or validation "
                        "list, never the explained images (without it the prior point is null and the zone "
                        "prior comes from the other images of the class)")
    parser.add_argument("--prior-dataset-dir", help="folder of --prior-image-list's images")
    parser.add_argument("--faithfulness-steps", type=int, default=16,
                        help="steps of the deletion/insertion curves (0: skip them); the map is compared "
                        "with a smooth random map and the predicted class's mean map over the same images")
    parser.add_argument("--faithfulness-images", type=int, default=60,
                        help="batch mode: curves for the first N images (each costs 6 x (steps + 1) forward "
                        "passes, twice that with --road)")
    parser.add_argument("--road", action=argparse.BooleanOptionalAction, default=False,
                        help="ROAD curves beside deletion/insertion (removed pixels imputed from their "
                        "neighbours, cxr/road.py): 6 x (steps + 1) sparse solves of the image's size per "
                        "image, cheap at 64 px, minutes per image at 384 px, so off unless asked for")
    parser.add_argument("--sanity", choices=("none", "all", "cascade"), default="none",
                        help="batch mode: the model-parameter randomisation test (cxr/sanity_checks.py): "
                        "the list explained again with every weight re-initialised (all), or with each "
                        "cascade level from the head down as well (cascade); each level costs one more run")
    parser.add_argument("--sanity-seed", type=int, default=sanity_checks.SEED, help="seed of --sanity's weights")
    parser.add_argument("--figure-neighbours", type=int, default=5, help="neighbours shown in figure.png")
    parser.add_argument("--save-overlays", type=int, default=12, help="batch mode: overlays of the first N images")
    parser.add_argument("--batch-size", type=int, default=32)
    cli.add_workers_flag(parser, min(2, os.cpu_count() or 1))
    image_cache.add_argument(parser)
    cli.add_device_flag(parser)
    cli.add_progress_flag(parser)
    cli.add_debug_flag(parser)
    return parser


if __name__ == "__main__":
    cli.run_cli(lambda: main(get_args_parser().parse_args()))
