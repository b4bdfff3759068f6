"""Choose explain.py's saliency settings on validation images, then report them on test.

    python saliency_selection.py --resume CKPT --mask-dir data/demo/masks --out runs/saliency

Every candidate of CANDIDATES (a method, a target and their settings; explain.py's flags) is run
with `explain.py --split val --sanity all`: the validation images the checkpoint's training held
out, with the gallery and the location prior from the rest of its training list, explained by the
trained model and again by a copy with every weight re-initialised (the model-parameter
randomisation test, cxr/sanity_checks.py). The candidate with the highest gain beyond the
randomised copy wins: per image, the trained model's image-specific pointing gain (own lesion
minus other images' lesions of the same class, tolerance --pointing-tolerance) minus the
randomised copy's, averaged over the same validation images; so a map that finds the lesion
without the trained weights (from the image's contrast alone) does not win by it. Ties go to the
earlier, cheaper candidate. The raw gain, the randomised copy's gain and the rank correlation
of the trained and the randomised maps are reported beside it.

Only the winner is then run with `--split test`, so the test images report and choose nothing:
with `--sanity cascade` for the first checkpoint (the head re-initialised, then the stages from
the top down, to all layers), `--sanity all` for further checkpoints (`--also CKPT ...`, e.g.
other seeds: the spread). Writes <out>/selection.md (the tables) and selection.json (every
number), and the explain.py output of each run under <out>/<checkpoint stem>/<split>/<candidate>/.
"""
import argparse
from pathlib import Path

import numpy as np

import explain
from cxr import localisation
from cxr.atomic_files import write_json
from cxr.cli import add_debug_flag, add_device_flag, add_resume_flag, run_cli
from cxr.errors import UserError

GOAL_BEYOND_RANDOMISED = 0.25  # the target for the test gain beyond the randomised copy (reported, not tuned)

# name: explain.py flags, every setting spelled out (explain.py's defaults are this choice's
# outcome, so they must not decide a candidate). The first two are the earlier releases' layer maps;
# Grad-CAM, HiResCAM and the input gradient multiply nothing by the image's difference from a
# reference, through which integrated gradients point at a lesion even with random weights.
LAYER = ["--convnext-stage", "0"]
CANDIDATES = {
    "gradnorm, prototype": ["--method", "gradnorm", "--target", "prototype", *LAYER],
    "gradnorm, contrast": ["--method", "gradnorm", "--target", "contrast", *LAYER],
    "gradcam, contrast": ["--method", "gradcam", "--target", "contrast", *LAYER],
    "hirescam, contrast": ["--method", "hirescam", "--target", "contrast", *LAYER],
    "gradient, contrast, smooth 1": ["--method", "gradient", "--target", "contrast", "--smooth", "1"],
    "gradient, contrast, smooth 2": ["--method", "gradient", "--target", "contrast", "--smooth", "2"],
    "ig, prototype": ["--method", "ig", "--target", "prototype", "--smooth", "1", "--ig-steps", "8"],
    "ig, contrast, smooth 0": ["--method", "ig", "--target", "contrast", "--smooth", "0", "--ig-steps", "8"],
    "ig, contrast, smooth 1": ["--method", "ig", "--target", "contrast", "--smooth", "1", "--ig-steps", "8"],
    "ig, contrast, smooth 2": ["--method", "ig", "--target", "contrast", "--smooth", "2", "--ig-steps", "8"],
    "ig, contrast, smooth 1, 16 steps": ["--method", "ig", "--target", "contrast", "--smooth", "1",
                                         "--ig-steps", "16"],
}


def run(args, checkpoint, split, name, key=None, sanity="all"):
    """explain.py on one split with one candidate's flags and --sanity `sanity`; the numbers of
    its aggregate (row). Its output goes to <out>/<key, default the checkpoint's stem>/<split>/<candidate>/."""
    out = Path(args.out) / (key or Path(checkpoint).stem) / split / name.replace(", ", "_").replace(" ", "")
    argv = ["--resume", str(checkpoint), "--split", split, "--mask-dir", args.mask_dir, "--out", str(out),
            "--pointing-tolerance", str(args.pointing_tolerance), "--save-overlays", "0",
            "--device", args.device, "--sanity", sanity, "--road", *CANDIDATES[name]]
    print(f"== {Path(checkpoint).stem}, {split}: {name}", flush=True)
    aggregate = explain.main(explain.get_args_parser().parse_args(argv))["aggregate"]
    if (aggregate.get("image_specific_gain") or {}).get("overall") is None:
        raise UserError(f"the {split} images of {checkpoint} hold fewer than two lesion images of a class "
                              f"with masks under {Path(args.mask_dir) / 'lesion'}: the gain cannot be measured ("
                              + ("a larger validation split: train.py --val-fraction)" if split == "val" else
                                 "a test list with more lesion images)"))
    return row(aggregate)


def row(aggregate):
    """The numbers of one run that the tables show (fractions; gains in fractions too)."""
    game = aggregate["pointing_game"]
    by_label = game["by_label"]
    gain = aggregate["image_specific_gain"]
    faithful = aggregate.get("faithfulness") or {}
    road = faithful.get("road") or {}
    zones = aggregate["zone_agreement"]["overall"]
    sanity = aggregate["sanity"]
    randomised = sanity["copies"]["all"]
    beyond = sanity["gain_beyond_randomised"] or {}
    return {
        "gain_beyond": beyond.get("mean"), "gain_beyond_ci95": beyond.get("ci95"),
        "randomised_gain": (randomised["image_specific_gain"] or {}).get("mean"),
        "randomised_pointing": (randomised["pointing"] or {}).get("rate"),
        "spearman": randomised["spearman"]["mean"], "spearman_ci95": randomised["spearman"]["ci95"],
        "cascade": {level: {"pointing": (c["pointing"] or {}).get("rate"),
                            "gain": (c["image_specific_gain"] or {}).get("mean"),
                            "gain_beyond": (c["gain_beyond"] or {}).get("mean"),
                            "gain_beyond_ci95": (c["gain_beyond"] or {}).get("ci95"),
                            "spearman": c["spearman"]["mean"], "spearman_ci95": c["spearman"]["ci95"]}
                    for level, c in sanity["copies"].items()},
        "gain": gain["overall"]["mean"], "gain_ci95": gain["overall"]["ci95"],
        "pointing": game["overall"]["map"]["fused"]["rate"],
        "mismatched": game["overall"]["mismatched"]["fused"]["rate"],
        "prior_point": (game["overall"]["prior_point"] or {}).get("rate"),
        "chance": game["overall"]["chance"]["rate"],
        "by_label": {label: {"pointing": s["map"]["fused"]["rate"], "mismatched": s["mismatched"]["fused"]["rate"],
                             "prior_point": (s["prior_point"] or {}).get("rate")}
                     for label, s in by_label.items()},
        "zone": zones["map"]["rate"] if zones["map"] else None,
        "zone_prior": zones["prior_zone"]["rate"] if zones["prior_zone"] else None,
        "deletion": faithful.get("map", {}).get("deletion_auc"),
        "deletion_smooth_random": faithful.get("smooth_random", {}).get("deletion_auc"),
        "deletion_image_independent": faithful.get("image_independent", {}).get("deletion_auc"),
        "beats_both_beyond_ci": faithful.get("beats_both_beyond_ci"),
        "road_morf": road.get("map", {}).get("road_morf_auc"),
        "road_morf_smooth_random": road.get("smooth_random", {}).get("road_morf_auc"),
        "road_morf_image_independent": road.get("image_independent", {}).get("road_morf_auc"),
        "road_beats_both_beyond_ci": road.get("beats_both_beyond_ci"),
        "images": aggregate["num_with_lesion"],
    }


def choose(rows):
    """The name of the highest validation gain beyond the randomised copy; the first of equal
    ones (CANDIDATES order); a gain that could not be measured (None) ranks last."""
    def beyond(name):
        value = rows[name]["gain_beyond"]
        return -np.inf if value is None else value

    return max(rows, key=lambda name: (beyond(name), -list(rows).index(name)))


def points(value, ci=None):
    """A fraction as signed points, with its interval when there is one."""
    if value is None:
        return "—"
    return f"{100 * value:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def correlation(value, ci=None):
    return "—" if value is None else f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def table(title, rows, labels):
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    def per_label(r):  # a label without lesion images in this run: a dash
        return "—" if r is None else f"{pct(r['pointing'])} / {pct(r['mismatched'])} / {pct(r['prior_point'])}"

    def areas(r, key):
        if r[key] is None:
            return "—"
        beats = r["beats_both_beyond_ci" if key == "deletion" else "road_beats_both_beyond_ci"]
        return (f"{r[key]:.3f} ({r[f'{key}_smooth_random']:.3f}, {r[f'{key}_image_independent']:.3f})"
                + (" beats both" if beats else ""))

    lines = [f"### {title}", "",
             "| map | gain beyond randomised [95%] | gain (own - other lesions) | randomised gain | "
             "Spearman trained vs randomised | pointing | randomised pointing | other lesions | prior point | "
             + " | ".join(f"{label} pointing / other / prior" for label in labels)
             + " | zone / prior zone | deletion AUC (smooth random, image-independent) | "
             "ROAD MoRF AUC (smooth random, image-independent) |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {points(r['gain_beyond'], r['gain_beyond_ci95'])} | "
                     f"{points(r['gain'], r['gain_ci95'])} | {points(r['randomised_gain'])} | "
                     f"{correlation(r['spearman'], r['spearman_ci95'])} | {pct(r['pointing'])} | "
                     f"{pct(r['randomised_pointing'])} | {pct(r['mismatched'])} | {pct(r['prior_point'])} | "
                     + " | ".join(per_label(r["by_label"].get(label)) for label in labels)
                     + f" | {pct(r['zone'])} / {pct(r['zone_prior'])} | {areas(r, 'deletion')} | "
                     f"{areas(r, 'road_morf')} |")
    return lines + [""]


def cascade_table(title, r):
    """The cascading randomisation of one test run: a row per level, the trained model first."""
    lines = [f"### {title}", "", "| weights re-initialised | pointing | gain (own - other lesions) | "
             "trained gain beyond it [95%] | Spearman with the trained maps [95%] |", "|---|---|---|---|---|",
             f"| none (trained) | {100 * r['pointing']:.1f} | {points(r['gain'], r['gain_ci95'])} | — | — |"]
    for level, c in r["cascade"].items():
        pointing = "—" if c["pointing"] is None else f"{100 * c['pointing']:.1f}"
        lines.append(f"| {level} | {pointing} | {points(c['gain'])} | "
                     f"{points(c['gain_beyond'], c['gain_beyond_ci95'])} | "
                     f"{correlation(c['spearman'], c['spearman_ci95'])} |")
    return lines + [""]


def main(args):
    if not Path(args.mask_dir).is_dir():
        raise UserError(f"--mask-dir {args.mask_dir}: no such folder (its lesion/ masks score the maps)")
    for checkpoint in [args.resume, *args.also]:
        if not Path(checkpoint).is_file():
            raise UserError(f"{checkpoint}: no such checkpoint")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    validation, test = {}, {}
    for name in CANDIDATES:
        validation[name] = run(args, args.resume, "val", name)
        write_json(out / "selection.json", {"validation": validation})  # kept if a later run fails
    chosen = choose(validation)
    for checkpoint in [args.resume, *args.also]:
        key = Path(checkpoint).stem
        if key in test:  # two checkpoints of one name (runs in other folders): numbered
            key = f"{key}_{len(test)}"
        test[key] = run(args, checkpoint, "test", chosen, key, sanity="cascade" if not test else "all")
        write_json(out / "selection.json", {"chosen": chosen, "validation": validation, "test": test})
    labels = sorted({label for r in [*validation.values(), *test.values()] for label in r["by_label"]})
    gains = [r["gain"] for r in test.values()]
    lines = ["## Saliency chosen on validation, reported on test", "",
             f"Chosen on the validation split of `{args.resume}` by the image-specific gain at "
             f"{100 * args.pointing_tolerance:g}% of the width beyond a copy of the model with every weight "
             f"re-initialised (trained minus randomised gain over the same images): **{chosen}** "
             f"(`{' '.join(CANDIDATES[chosen])}`). Percentages; gains in points [95% paired t interval]; "
             "Spearman: rank correlation of the trained and the randomised fused maps, mean over images "
             "[95% t interval].", ""]
    lines += table(f"validation ({validation[chosen]['images']} lesion images): every candidate", validation, labels)
    lines += table(f"test: {chosen}, one row per checkpoint", test, labels)
    first = next(iter(test.values()))
    lines += cascade_table(f"test, {next(iter(test))}: cascading randomisation from the embedding head down", first)
    lines += [f"Test gain beyond the randomised copy: {points(first['gain_beyond'], first['gain_beyond_ci95'])} "
              f"points (the goal: at least {100 * GOAL_BEYOND_RANDOMISED:+.0f}; "
              + ("met" if first["gain_beyond"] is not None and first["gain_beyond"] >= GOAL_BEYOND_RANDOMISED
                 else "not met") + ", on test images that chose nothing).", ""]
    beyond = [r["gain_beyond"] for r in test.values() if r["gain_beyond"] is not None]
    if len(gains) > 1:
        lines += [f"Test gain over {len(gains)} checkpoints: mean {100 * np.mean(gains):+.1f}, "
                  f"range {100 * min(gains):+.1f} to {100 * max(gains):+.1f} points"
                  + (f"; beyond the randomised copy: mean {100 * np.mean(beyond):+.1f}, range "
                     f"{100 * min(beyond):+.1f} to {100 * max(beyond):+.1f}" if beyond else "") + ".", ""]
    (out / "selection.md").write_text("\n".join(lines), encoding="utf-8")
    write_json(out / "selection.json", {"chosen": chosen, "flags": CANDIDATES[chosen],
                                              "validation": validation, "test": test,
                                              "pointing_tolerance": args.pointing_tolerance})
    print("\n".join(lines))
    print(f"wrote {out / 'selection.md'} and {out / 'selection.json'}")
    return chosen, validation, test


def get_args_parser():
    parser = argparse.ArgumentParser(description="Choose explain.py's saliency settings on validation, "
                                     "report the choice on test")
    add_resume_flag(parser, "checkpoint whose validation split chooses")
    parser.add_argument("--also", nargs="*", default=[], metavar="CKPT",
                        help="further checkpoints (other seeds) the chosen settings are reported on")
    parser.add_argument("--mask-dir", required=True, help="folder with lesion/ (and lungs/, heart/) masks")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pointing-tolerance", type=float, default=localisation.DEFAULT_TOLERANCE,
                        help="as explain.py's: the gain that chooses is at this tolerance")
    add_device_flag(parser)
    add_debug_flag(parser)
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
