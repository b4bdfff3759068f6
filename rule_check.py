"""Does the ontology's cardiomegaly rule hold on borderline hearts and imperfect masks?

The demo phantoms draw normal hearts with a cardiothoracic ratio (CTR) in 0.38-0.48 and enlarged
ones in 0.58-0.70, on either side of the rule's threshold (ontology.json: ctr > 0.53), and the rule
reads the generator's own masks: it cannot fail there. This program measures it where it can:

* a borderline set: the same generator (phantom.make_phantom_with_info, opt-in ctr_ranges),
  normal and cardiomegaly only, with CTR ranges that straddle the threshold (BORDERLINE_RANGES);
  the standard demo ranges are measured alongside as the reference;
* masks that are not the generator's own: boundary noise, per-structure shifts, a heart scale
  error, at several severities (CONDITIONS; boundary and shift magnitudes are fractions of the
  image side, the scale error a fraction of the heart's size).

The rule runs as explain.py runs it: regions.region_statistics on the masks (with a blank map:
the CTR needs no saliency), then ontology.reason. Ground truth is the class the phantom was drawn
for, not its CTR. Per set and condition: TPR (cardiomegaly flagged by the rule), FPR (normal
flagged), each with a Wilson 95% interval, the CTR error against the generator's masks, the Dice
of the perturbed masks, and the share of images whose decision flips.

    python rule_check.py --out runs/rule_check --per-class 200 --size 128 --seed 0
    # writes DIR/rule_check.json and DIR/rule_check.md, prints the table
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from cxr import ontology as onto
from cxr import phantom, regions
from cxr.atomic_files import write_json
from cxr.cli import add_debug_flag, run_cli
from cxr.errors import UserError
from cxr.report_stats import wilson

CLASSES = ("normal", "cardiomegaly")
RULE_ID = "enlarged_cardiac_silhouette"  # ctr > threshold: supports cardiomegaly
NORMAL_RULE_ID = "normal_cardiac_silhouette"  # ctr <= 0.5: contradicts cardiomegaly
# Borderline hearts: both ranges 0.11 wide, centred 0.035 either side of the rule's 0.53 and
# overlapping on 0.51-0.55, so the usual clinical cut-off (CTR > 0.5 on a PA film) lies inside the
# normal range and the rule's threshold inside both: normal hearts around 0.5, enlarged around 0.55.
BORDERLINE_RANGES = {"normal": (0.44, 0.55), "cardiomegaly": (0.51, 0.62)}
STANDARD_RANGES = {"normal": phantom._CTR_NORMAL, "cardiomegaly": phantom._CTR_CARDIOMEGALY}
SETS = {"borderline": BORDERLINE_RANGES, "standard": STANDARD_RANGES}
# Mask perturbations; boundary and shift magnitudes are fractions of the image side (x size =
# pixels), the scale error a fraction of the heart's size:
#   boundary: each mask's contour moved in and out, smoothly along it, by at most that much (a
#             random field scaled to reach it on the contour, Gaussian-smoothed with a sigma of
#             BOUNDARY_CORRELATION of the side, added to the signed distance);
#   shift:    right lung, left lung and heart each moved by that much in a random direction;
#   shift_all: all masks moved together (a misregistered mask file: the CTR should not move);
#   scale:    the heart (the least contrasted border) scaled by 1 +- that about its centroid.
CONDITIONS = (
    ("generator masks", {}),
    ("boundary 1%", {"boundary": 0.01}),
    ("boundary 2%", {"boundary": 0.02}),
    ("boundary 3%", {"boundary": 0.03}),
    ("shift 1%", {"shift": 0.01}),
    ("shift 2%", {"shift": 0.02}),
    ("shift 4%", {"shift": 0.04}),
    ("shift all 4%", {"shift_all": 0.04}),
    ("heart scale 2%", {"scale": 0.02}),
    ("heart scale 5%", {"scale": 0.05}),
    ("heart scale 10%", {"scale": 0.10}),
    ("combined 2%/2%/5%", {"boundary": 0.02, "shift": 0.02, "scale": 0.05}),
)
KINDS = ("boundary", "shift", "shift_all", "scale")  # applied in this order
BOUNDARY_CORRELATION = 0.03


def rates(flagged, labels, positive="cardiomegaly"):
    """TPR (positives flagged) and FPR (negatives flagged) with Wilson 95% intervals."""
    flagged, positives = np.asarray(flagged, bool), np.asarray(labels) == positive
    tp, n_pos = int((flagged & positives).sum()), int(positives.sum())
    fp, n_neg = int((flagged & ~positives).sum()), int((~positives).sum())
    return {"tp": tp, "positives": n_pos, "fp": fp, "negatives": n_neg,
            "tpr": tp / n_pos if n_pos else float("nan"), "tpr_ci": wilson(tp, n_pos),
            "fpr": fp / n_neg if n_neg else float("nan"), "fpr_ci": wilson(fp, n_neg)}


def make_set(ranges, per_class, size, seed, set_code=0):
    """Phantoms of CLASSES with `ranges` ({label: (low, high)} CTR): a list of {label, index,
    lungs, heart, ctr} (ctr: the generator's, measured on its masks)."""
    cases = []
    for class_code, label in enumerate(CLASSES):
        for i in range(per_class):
            rng = np.random.default_rng([seed, 11, set_code, class_code, i])
            _, masks, info = phantom.make_phantom_with_info(rng, label, size, ctr_ranges=ranges)
            cases.append({"label": label, "index": i, "class_code": class_code,
                          "lungs": masks["lungs"], "heart": masks["heart"], "ctr": info["ctr"]})
    return cases


def boundary_noise(mask, amplitude_px, rng, correlation_px):
    """The mask with its contour moved in or out by up to `amplitude_px`, varying smoothly along it."""
    if amplitude_px <= 0 or not mask.any():
        return mask.copy()
    # Signed distance, 0 on the contour: +0.5 on the first pixel inside, -0.5 on the first outside.
    signed = np.where(mask, ndimage.distance_transform_edt(mask) - 0.5,
                      0.5 - ndimage.distance_transform_edt(~mask))
    field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), correlation_px)
    contour = np.abs(signed) < 1  # the pixels on either side of the contour
    field *= amplitude_px / max(np.abs(field[contour]).max(), 1e-12)  # reaches amplitude_px on it
    return signed + np.clip(field, -amplitude_px, amplitude_px) > 0  # and never goes beyond it


def shift_mask(mask, dy, dx):
    """The mask moved by (dy, dx) pixels (sub-pixel: linear interpolation, then > 0.5)."""
    return ndimage.shift(mask.astype(np.float32), (dy, dx), order=1, cval=0.0) > 0.5


def scale_mask(mask, factor):
    """The mask scaled by `factor` about its centroid."""
    if not mask.any():
        return mask.copy()
    centre = np.array(ndimage.center_of_mass(mask))
    # output pixel o samples the input at centre + (o - centre) / factor
    out = ndimage.affine_transform(mask.astype(np.float32), np.eye(2) / factor,
                                   offset=centre - centre / factor, order=1, cval=0.0)
    return out > 0.5


def split_lungs(lungs):
    """(image-left lung, image-right lung): the lung fields cut at their midline, as regions does."""
    cols = np.flatnonzero(lungs.any(axis=0))
    if cols.size == 0:
        return lungs.copy(), lungs.copy()
    left_half = np.arange(lungs.shape[1])[None, :] < (cols[0] + cols[-1]) / 2
    return lungs & left_half, lungs & ~left_half


def perturb(lungs, heart, spec, size, rngs):
    """(lungs, heart) after the perturbations of `spec` ({kind: fraction of the side}), each kind
    drawing from its own generator rngs[kind] (so severities of a kind share their draws)."""
    for kind in KINDS:
        if kind not in spec:
            continue
        px, rng = spec[kind] * size, rngs[kind]
        if kind == "boundary":
            correlation = BOUNDARY_CORRELATION * size
            lungs = boundary_noise(lungs, px, rng, correlation)
            heart = boundary_noise(heart, px, rng, correlation)
        elif kind == "shift":
            right, left = split_lungs(lungs)
            moved = []
            for part in (right, left, heart):
                angle = rng.uniform(0, 2 * math.pi)
                moved.append(shift_mask(part, px * math.sin(angle), px * math.cos(angle)))
            lungs, heart = moved[0] | moved[1], moved[2]
        elif kind == "shift_all":
            angle = rng.uniform(0, 2 * math.pi)
            dy, dx = px * math.sin(angle), px * math.cos(angle)
            lungs, heart = shift_mask(lungs, dy, dx), shift_mask(heart, dy, dx)
        elif kind == "scale":
            heart = scale_mask(heart, 1 + rng.choice([-1.0, 1.0]) * spec[kind])
    return lungs, heart


def apply_rules(ontology, lungs, heart, label):
    """CTR and the verdicts, as explain.py gets them: region_statistics, then ontology.reason with
    the true class as the retrieved one (an oracle retrieval: the model is not involved)."""
    stats = regions.region_statistics(np.zeros(lungs.shape), lungs, heart)
    reasoning = onto.reason(ontology, stats, label)
    return {"ctr": stats["ctr"], "flagged": RULE_ID in reasoning["rules_fired"],
            "normal_size": NORMAL_RULE_ID in reasoning["rules_fired"],
            "contradicted": bool(reasoning["contradicting"])}


def describe(spec, size):
    """The perturbation in pixels at this image size (the heart scale as a factor)."""
    words = {"boundary": "contour ±{:.2g} px", "shift": "{:.2g} px each", "shift_all": "{:.2g} px all"}
    parts = [words[k].format(v * size) for k, v in spec.items() if k in words]
    if "scale" in spec:
        parts.append(f"heart ×(1±{spec['scale']:g})")
    return ", ".join(parts) or "-"


def dice(a, b):
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def rule_threshold(ontology, rule_id=RULE_ID):
    rule = next(r for r in ontology["rules"] if r["id"] == rule_id)
    return {c["stat"]: f"{c['op']} {c['value']}" for c in rule["when"]}


def evaluate(cases, ontology, size, seed, set_code=0, conditions=CONDITIONS):
    """One result per condition (see the module docstring) on the phantoms `cases`."""
    labels = [case["label"] for case in cases]
    true_ctr = np.array([case["ctr"] for case in cases])
    base_flags, results = None, []
    for name, spec in conditions:
        out = []
        for case in cases:
            rngs = {kind: np.random.default_rng([seed, 13, set_code, k, case["class_code"], case["index"]])
                    for k, kind in enumerate(KINDS)}
            lungs, heart = perturb(case["lungs"], case["heart"], spec, size, rngs)
            verdict = apply_rules(ontology, lungs, heart, case["label"])
            verdict["dice_lungs"], verdict["dice_heart"] = dice(lungs, case["lungs"]), dice(heart, case["heart"])
            out.append(verdict)
        flags = np.array([v["flagged"] for v in out])
        ctr = np.array([np.nan if v["ctr"] is None else v["ctr"] for v in out])
        is_cardio = np.array(labels) == "cardiomegaly"
        base_flags = flags if base_flags is None else base_flags
        results.append({
            "condition": name, "spec": spec, "magnitude": describe(spec, size),
            **rates(flags, labels),
            "ctr_mae": float(np.nanmean(np.abs(ctr - true_ctr))),
            "ctr_bias": float(np.nanmean(ctr - true_ctr)),
            "ctr_missing": int(np.isnan(ctr).sum()),
            "dice_heart": float(np.mean([v["dice_heart"] for v in out])),
            "dice_lungs": float(np.mean([v["dice_lungs"] for v in out])),
            "flips": float(np.mean(flags != base_flags)),
            # what explain.py would tell a reader whose retrieval was right:
            "normal_contradicted": float(np.mean([v["contradicted"] for v, c in zip(out, is_cardio) if not c])),
            "cardiomegaly_called_normal_size": float(np.mean([v["normal_size"] for v, c in zip(out, is_cardio) if c])),
        })
    return results


def ctr_summary(cases, threshold):
    """Per class: the generator's CTR range and the share above the rule's threshold."""
    out = {}
    for label in CLASSES:
        ctr = np.array([c["ctr"] for c in cases if c["label"] == label])
        out[label] = {"n": int(ctr.size), "min": float(ctr.min()), "mean": float(ctr.mean()),
                      "max": float(ctr.max()), "above_threshold": float((ctr > threshold).mean()),
                      "above_0.5": float((ctr > 0.5).mean())}
    return out


def run(per_class=200, size=128, seed=0, ontology_path=onto.DEFAULT_ONTOLOGY, sets=tuple(SETS)):
    ontology = onto.load_ontology(ontology_path)
    threshold = float(rule_threshold(ontology)["ctr"].split()[1])
    report = {"params": {"per_class": per_class, "size": size, "seed": seed, "ontology": str(ontology_path)},
              "rule": {"id": RULE_ID, "when": rule_threshold(ontology)},
              "boundary_correlation": BOUNDARY_CORRELATION, "sets": {}}
    for set_code, name in enumerate(SETS):
        if name not in sets:
            continue
        cases = make_set(SETS[name], per_class, size, seed, set_code)
        report["sets"][name] = {"ctr_ranges": SETS[name], "generator_ctr": ctr_summary(cases, threshold),
                                "results": evaluate(cases, ontology, size, seed, set_code)}
    return report


def markdown(report):
    def pct(x):
        return f"{100 * x:.1f}"

    def ci(lo_hi):
        return "[n/a]" if lo_hi is None else f"[{pct(lo_hi[0])}, {pct(lo_hi[1])}]"

    size = report["params"]["size"]
    lines = [f"Rule `{report['rule']['id']}` (ctr {report['rule']['when']['ctr']}); {report['params']['per_class']} "
             f"phantoms per class, {size} px, seed {report['params']['seed']}. Rates in %, Wilson 95% intervals.", ""]
    for name, block in report["sets"].items():
        ranges = ", ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in block["ctr_ranges"].items())
        gen = ", ".join(f"{k} {v['min']:.3f}-{v['max']:.3f} ({pct(v['above_threshold'])}% above the threshold)"
                        for k, v in block["generator_ctr"].items())
        lines += [f"**{name}** set (CTR drawn: {ranges}; measured on the generator's masks: {gen})", "",
                  "| masks | at this size | heart Dice | lung Dice | CTR MAE | TPR % [95% CI] | FPR % [95% CI] "
                  "| flips % | enlarged called normal-size % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in block["results"]:
            lines.append(f"| {r['condition']} | {r['magnitude']} | {r['dice_heart']:.3f} | {r['dice_lungs']:.3f} | "
                         f"{r['ctr_mae']:.4f} | {pct(r['tpr'])} {ci(r['tpr_ci'])} | "
                         f"{pct(r['fpr'])} {ci(r['fpr_ci'])} | "
                         f"{pct(r['flips'])} | {pct(r['cardiomegaly_called_normal_size'])} |")
        lines.append("")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser(description="TPR/FPR of the ontology's cardiomegaly rule on borderline "
                                     "phantoms and on perturbed masks.")
    parser.add_argument("--out", type=Path, required=True, help="folder for rule_check.json and rule_check.md")
    parser.add_argument("--per-class", type=int, default=200, help="phantoms per class (normal, cardiomegaly)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ontology", type=Path, default=onto.DEFAULT_ONTOLOGY)
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    return add_debug_flag(parser)


def main(args):

    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")
    if args.size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {args.size}")
    try:
        report = run(args.per_class, args.size, args.seed, args.ontology, tuple(args.sets))
    except onto.OntologyError as error:
        raise UserError(str(error)) from error
    table = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "rule_check.json", report)
    (args.out / "rule_check.md").write_text(table + "\n")
    print(table)
    print(f"Wrote {args.out / 'rule_check.json'} and {args.out / 'rule_check.md'}")
    return report


if __name__ == "__main__":

    run_cli(lambda: main(get_args_parser().parse_args()))
