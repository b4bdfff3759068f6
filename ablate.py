"""Ablations of HYBRID_MODEL_GUIDE.md: demo trainings with one change each, several seeds.

    python ablate.py                          # the recipe suite (make ablation)
    python ablate.py --suite models           # the model suite (make ablation-models)
    python ablate.py --suite models --variants hybrid convnext --seeds 0
    python ablate.py --suite models --summarise-only   # the table from the runs already in --out
                                                       # (evaluating finished runs not yet evaluated)

Each run is `python train.py --dataset demo --seed S <variant flags>` in <out>/<variant>_seed_<S>;
the numbers are those of the checkpoint train.py kept as best, i.e. chosen on the validation split
(validation and test R@1 / mAP of that epoch, from metrics.jsonl). Runs already finished are not
repeated. Prints a markdown table of mean and standard deviation over the seeds.

The model suite also evaluates each best checkpoint with test.py (whose report gives each
branch's share of the similarity) and compares it with ConvNeXtV2 alone of the same seed on the
same test images: the paired test mAP difference with its patient-bootstrap 95% interval
(test.py --compare). It writes <out>/models.md (the table) and <out>/models.png (test mAP per
variant, one point per seed).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE_VARIANTS = {
    "default": ([], "strong recipe: BN neck + identity loss + batch-all triplet, AdamW, cosine"),
    "no_id_loss": (["--id-loss-weight", "0"], "without the identity loss (batch-all triplet only)"),
    "no_bn_neck": (["--neck", "none"], "without the BN neck"),
    "paper_loss": (["--id-loss-weight", "0", "--mining", "batch_hard"],
                   "the paper's loss: batch-hard triplet only (BN neck, AdamW, cosine kept)"),
    "seed_recipe": (["--recipe", "seed"], "the seed's recipe: Adam 1e-4 constant, batch-hard, no neck"),
}
# Every variant trains with the demo's recipe and budget; only the model differs.
MODEL_VARIANTS = {
    "convnext": (["--model", "convnextv2"], "ConvNeXtV2 + MXA alone"),
    "vit": (["--model", "vit"], "ViT alone (conv stem)"),
    "vit_patchify": (["--model", "vit", "--vit-stem", "patch"], "ViT alone, patchify stem (the timm model)"),
    "hybrid_paper": (["--fusion", "seed", "--vit-stem", "patch", "--branch-loss-weight", "0"],
                     "hybrid as in the paper: raw concatenation, patchify ViT"),
    "hybrid": ([], "hybrid, the default (per-branch LayerNorm, conv-stem ViT, branch losses)"),
    "hybrid_no_branch_loss": (["--branch-loss-weight", "0"], "hybrid default without the branch losses"),
    "hybrid_patchify": (["--vit-stem", "patch"], "hybrid default with the patchify ViT"),
    "hybrid_no_mxa": (["--mxa", "none"], "hybrid default without MXA"),
}
SUITES = {"recipe": RECIPE_VARIANTS, "models": MODEL_VARIANTS}
# What `--suite models` runs without --variants: the comparison of HYBRID_MODEL_GUIDE.md (the
# patchify variants are there for a closer look at the stem).
DEFAULT_VARIANTS = {"recipe": list(RECIPE_VARIANTS),
                    "models": ["convnext", "vit", "hybrid_paper", "hybrid", "hybrid_no_branch_loss",
                               "hybrid_no_mxa"]}
METRICS = ("val_R@1", "val_mAP", "test_R@1", "test_mAP")
REFERENCE = "convnext"  # the model suite's paired comparisons are against this variant


def run_dir(out, variant, seed):
    return Path(out) / f"{variant}_seed_{seed}"


def result_of(directory):
    """Metrics of the epoch train.py kept as best, or None if the run has not finished."""
    log = directory / "metrics.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    args = json.loads((directory / "args.json").read_text())
    if not records or records[-1]["epoch"] != args["epochs"] or records[-1].get("best_epoch") is None:
        return None
    best = next(r for r in records if r["epoch"] == records[-1]["best_epoch"])
    trained = [r for r in records if r["epoch"] > 0]
    return {"best_epoch": best["epoch"], **{key: best[key] for key in METRICS},
            "epoch0_test_mAP": records[0]["test_mAP"], "last_test_mAP": records[-1]["test_mAP"],
            "minutes": sum(r.get("time_s", 0.0) for r in records) / 60,
            "seconds_per_epoch": statistics.mean(r["train_time_s"] for r in trained)}


def best_checkpoint(directory):
    found = sorted(directory.glob("*_best_ckpt.pth"))
    return found[0] if found else None


def evaluate_run(directory):
    """test.py on the run's best checkpoint (report with branch shares, embeddings file)."""
    report = directory / "test_report.json"
    if not report.is_file():
        command = [sys.executable, str(HERE / "test.py"), "--dataset", "demo",
                   "--resume", str(best_checkpoint(directory)), "--report", str(report)]
        with open(directory / "test.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    data = json.loads(report.read_text())
    return data, Path(data["files"]["embeddings"])


def compare_runs(directory, reference):
    """Paired test mAP difference (this run - reference run) with its patient-bootstrap interval."""
    out = directory / f"compare_vs_{reference.name}.json"
    if not out.is_file():
        (_, mine), (_, theirs) = evaluate_run(directory), evaluate_run(reference)
        command = [sys.executable, str(HERE / "test.py"), "--compare", str(mine), str(theirs),
                   "--report", str(out)]
        with open(directory / "compare.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    entry = json.loads(out.read_text())["comparison"]["map"]
    return entry["difference"], entry["low"], entry["high"]


def forget_evaluations(out, variant, seed):
    """Delete the reports and comparisons a run is about to make stale: its own, and when it
    is the reference, every comparison against it."""
    stale = list(run_dir(out, variant, seed).glob("test_report*.json"))
    stale += run_dir(out, variant, seed).glob("compare_vs_*.json")
    if variant == REFERENCE:
        stale += Path(out).glob(f"*/compare_vs_{run_dir(out, variant, seed).name}.json")
    for path in stale:
        path.unlink()


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def summarise(out, suite, variants, seeds):
    table = SUITES[suite]
    header = ["variant", "seeds", *(f"{m} (best on val)" for m in METRICS), "epoch"]
    if suite == "models":
        header += ["ViT share %", "s / epoch", f"test mAP - {REFERENCE} [95%] per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    points = {}
    for variant in variants:
        runs = [(s, r) for s, r in ((s, result_of(run_dir(out, variant, s))) for s in seeds) if r]
        if not runs:
            continue
        cells = [_mean_sd([r[key] for _, r in runs]) for key in METRICS]
        cells.append(", ".join(str(r["best_epoch"]) for _, r in runs))
        if suite == "models":
            shares, paired = [], []
            for seed, _ in runs:
                directory = run_dir(out, variant, seed)
                report, _ = evaluate_run(directory)
                shares.append((report.get("branch_attribution") or {}).get("vit"))
                reference = run_dir(out, REFERENCE, seed)
                if variant != REFERENCE and result_of(reference):
                    difference, low, high = compare_runs(directory, reference)
                    paired.append(f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]")
            cells += [_mean_sd(shares), f"{statistics.mean(r['seconds_per_epoch'] for _, r in runs):.0f}",
                      "; ".join(paired) or "—"]
        points[table[variant][1]] = [r["test_mAP"] for _, r in runs]
        lines.append(f"| {table[variant][1]} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), points


def plot_points(points, path, title):
    from cxr import plots

    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(points) + 1.2))
    for row, (name, values) in enumerate(points.items()):
        ax.scatter(values, [row] * len(values), color="tab:blue", zorder=3)
        ax.plot([statistics.mean(values)] * 2, [row - 0.3, row + 0.3], color="black")
    ax.set_yticks(range(len(points)), list(points))
    ax.invert_yaxis()
    ax.set_xlabel("test mAP (%), checkpoint chosen on validation; points: seeds, bar: mean")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return plots._save(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=tuple(SUITES), default="recipe",
                        help="recipe: the training recipe's parts; models: backbones, fusion, MXA")
    parser.add_argument("--variants", nargs="+", help="default: every variant of the suite")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", help="one folder per run (default runs/ablation or runs/ablation_models)")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    table = SUITES[args.suite]
    variants = args.variants or DEFAULT_VARIANTS[args.suite]
    unknown = [v for v in variants if v not in table]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} for --suite {args.suite}; "
                     f"choose from {', '.join(table)}")
    out = Path(args.out or ("runs/ablation" if args.suite == "recipe" else "runs/ablation_models"))
    if not args.summarise_only:
        for seed in args.seeds:  # seed-major: a stopped ablation still has every variant once
            for variant in variants:
                directory = run_dir(out, variant, seed)
                if result_of(directory):
                    continue
                forget_evaluations(out, variant, seed)
                command = [sys.executable, str(HERE / "train.py"), "--dataset", "demo",
                           "--seed", str(seed), "--save-dir", str(directory), "--overwrite",
                           *table[variant][0]]
                print("running:", " ".join(command), flush=True)
                directory.mkdir(parents=True, exist_ok=True)
                with open(directory / "train.log", "w") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
                print(json.dumps({"variant": variant, "seed": seed, **result_of(directory)}), flush=True)
    text, points = summarise(out, args.suite, variants, args.seeds)
    print(text)
    if args.suite == "models" and points:
        (out / "models.md").write_text(text + "\n")
        print(f"figure: {plot_points(points, out / 'models.png', 'Demo: which part of the hybrid gives what')}")


if __name__ == "__main__":
    main()
