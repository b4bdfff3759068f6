"""Choose explain.py's saliency settings on validation images, then report them on test.

    python saliency_selection.py --resume CKPT --mask-dir data/demo/masks --out runs/saliency

Every candidate of CANDIDATES (a method, a target and their settings; explain.py's flags) is run
with `explain.py --split val`: the validation images the checkpoint's training held out, with the
gallery and the location prior from the rest of its training list. The candidate with the highest
image-specific pointing gain (explain.py's headline: own lesion minus other images' lesions of
the same class, tolerance --pointing-tolerance) wins; ties go to the earlier, cheaper candidate.
Only the winner is then run with `--split test`, so the test images report and choose nothing.
Further checkpoints (`--also CKPT ...`, e.g. other seeds) get the winner on their test split too,
for the spread. Writes <out>/selection.md (the tables) and selection.json (every number), and the
explain.py output of each run under <out>/<checkpoint stem>/<split>/<candidate>/.
"""
import argparse
from pathlib import Path

import numpy as np

import explain
from cxr import localisation
from cxr.atomic_files import write_json
from cxr.cli import add_debug_flag, add_device_flag, add_resume_flag, run_cli
from cxr.errors import UserError

# name: explain.py flags, every setting spelled out (explain.py's defaults are this choice's
# outcome, so they must not decide a candidate). The first two are the earlier releases' layer maps.
CANDIDATES = {
    "gradnorm, prototype": ["--method", "gradnorm", "--target", "prototype"],
    "gradnorm, contrast": ["--method", "gradnorm", "--target", "contrast"],
    "ig, prototype": ["--method", "ig", "--target", "prototype", "--smooth", "1", "--ig-steps", "8"],
    "ig, contrast, smooth 0": ["--method", "ig", "--target", "contrast", "--smooth", "0", "--ig-steps", "8"],
    "ig, contrast, smooth 1": ["--method", "ig", "--target", "contrast", "--smooth", "1", "--ig-steps", "8"],
    "ig, contrast, smooth 2": ["--method", "ig", "--target", "contrast", "--smooth", "2", "--ig-steps", "8"],
    "ig, contrast, smooth 1, 16 steps": ["--method", "ig", "--target", "contrast", "--smooth", "1",
                                         "--ig-steps", "16"],
}


def run(args, checkpoint, split, name, key=None):
    """explain.py on one split with one candidate's flags; the numbers of its aggregate (row).
    Its output goes to <out>/<key, default the checkpoint's file stem>/<split>/<candidate>/."""
    out = Path(args.out) / (key or Path(checkpoint).stem) / split / name.replace(", ", "_").replace(" ", "")
    argv = ["--resume", str(checkpoint), "--split", split, "--mask-dir", args.mask_dir, "--out", str(out),
            "--pointing-tolerance", str(args.pointing_tolerance), "--save-overlays", "0",
            "--device", args.device, *CANDIDATES[name]]
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
    zones = aggregate["zone_agreement"]["overall"]
    return {
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
        "images": aggregate["num_with_lesion"],
    }


def choose(rows):
    """The name of the highest validation gain; the first of equal ones (CANDIDATES order)."""
    return max(rows, key=lambda name: (rows[name]["gain"], -list(rows).index(name)))


def table(title, rows, labels):
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    def per_label(r):  # a label without lesion images in this run: a dash
        return "—" if r is None else f"{pct(r['pointing'])} / {pct(r['mismatched'])} / {pct(r['prior_point'])}"

    lines = [f"### {title}", "",
             "| map | gain (own - other lesions) | pointing | other lesions | prior point | "
             + " | ".join(f"{label} pointing / other / prior" for label in labels)
             + " | zone / prior zone | deletion AUC (smooth random, image-independent) |",
             "|---|---|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for name, r in rows.items():
        ci = f" [{100 * r['gain_ci95'][0]:+.1f}, {100 * r['gain_ci95'][1]:+.1f}]" if r["gain_ci95"] else ""
        deletion = ("—" if r["deletion"] is None else
                    f"{r['deletion']:.3f} ({r['deletion_smooth_random']:.3f}, {r['deletion_image_independent']:.3f})"
                    + (" beats both" if r["beats_both_beyond_ci"] else ""))
        lines.append(f"| {name} | {100 * r['gain']:+.1f}{ci} | {pct(r['pointing'])} | {pct(r['mismatched'])} | "
                     f"{pct(r['prior_point'])} | "
                     + " | ".join(per_label(r["by_label"].get(label)) for label in labels)
                     + f" | {pct(r['zone'])} / {pct(r['zone_prior'])} | {deletion} |")
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
        test[key] = run(args, checkpoint, "test", chosen, key)
        write_json(out / "selection.json", {"chosen": chosen, "validation": validation, "test": test})
    labels = sorted({label for r in [*validation.values(), *test.values()] for label in r["by_label"]})
    gains = [r["gain"] for r in test.values()]
    lines = ["## Saliency chosen on validation, reported on test", "",
             f"Chosen on the validation split of `{args.resume}` by the image-specific gain at "
             f"{100 * args.pointing_tolerance:g}% of the width: **{chosen}** "
             f"(`{' '.join(CANDIDATES[chosen])}`). Percentages; gains in points [95% paired t interval].", ""]
    lines += table(f"validation ({validation[chosen]['images']} lesion images): every candidate", validation, labels)
    lines += table(f"test: {chosen}, one row per checkpoint", test, labels)
    if len(gains) > 1:
        lines += [f"Test gain over {len(gains)} checkpoints: mean {100 * np.mean(gains):+.1f}, "
                  f"range {100 * min(gains):+.1f} to {100 * max(gains):+.1f} points.", ""]
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
