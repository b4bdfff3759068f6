"""Ablations of HYBRID_MODEL_GUIDE.md: demo trainings with one change each, several seeds.

    python ablate.py                          # the recipe suite (make ablation)
    python ablate.py --suite models           # the model suite (make ablation-models)
    python ablate.py --suite models --variants hybrid convnext --seeds 0
    python ablate.py --suite models --summarise-only   # the table from the runs already in --out
                                                       # (evaluating finished runs not yet evaluated)
    python ablate.py --suite multilabel        # make ablation-multilabel: on the multi-label phantoms
    python ablate.py --suite defaults --data digits   # make ablation-defaults: phantoms and digits
    python ablate.py --suite rerank --data digits     # make ablation-rerank: test.py --rerank on those runs

Each run is `python train.py --dataset demo --seed S <variant flags>` in <out>/<variant>_seed_<S>;
the numbers are those of the checkpoint train.py kept as best, i.e. chosen on the validation split
(validation and test R@1 / mAP of that epoch, from metrics.jsonl). Runs already finished are not
repeated. Prints a markdown table of mean and standard deviation over the seeds.

The model suite also evaluates each best checkpoint with test.py (whose report gives each
branch's share of the similarity) and compares it with ConvNeXtV2 alone of the same seed on the
same test images: the paired test mAP difference with its patient-bootstrap 95% interval
(test.py --compare). It writes <out>/models.md (the table) and <out>/models.png (test mAP per
variant, one point per seed).

The multilabel suite trains on the NIH-layout multi-label phantoms (demo_data.py --multilabel
nih, written to data/demo_nih when absent) with the small setup and P = 5: training on the
findings against each finding combination as one class (what flattening the labels gives), and
the hybrid against ConvNeXtV2 alone, all scored with shared-finding relevance; the paired
comparisons are against the combination classes ("combinations"), and the hybrid's against
ConvNeXtV2 alone is added.

The defaults suite asks whether the hybrid's fusion and branch losses, chosen on the phantoms,
hold on real images: the same three variants on the phantoms (--data demo) and on scikit-learn's
digits (--data digits, small setup, P = 5), paired against the default; its table is
<out>/defaults.md.

The rerank suite trains nothing: it runs test.py --rerank aqe, dba and kreciprocal (their default
parameters, the papers' usual values, not tuned here) on the best checkpoints of the defaults
suite's default runs (--data demo or digits) or of the multilabel suite's findings runs
(--data multilabel), each paired with the plain ranking of the same embeddings by the patient
bootstrap, and writes <folder>/rerank.md.
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
MULTILABEL_VARIANTS = {
    "combinations": (["--label-mode", "combinations"], "hybrid, each finding combination one class"),
    "findings": (["--label-mode", "findings"], "hybrid, trained on the findings (multi-label)"),
    "convnext_findings": (["--model", "convnextv2", "--label-mode", "findings"],
                          "ConvNeXtV2 alone, trained on the findings"),
}
# The hybrid's two choices that were made on the phantoms alone (issue: do they hold on real
# images?), against what the paper and the previous release did, on both data sets of --data.
DEFAULTS_VARIANTS = {
    "default": ([], "hybrid default (per-branch LayerNorm fusion, branch losses 0.5)"),
    "no_branch_loss": (["--branch-loss-weight", "0"], "hybrid default without the branch losses"),
    "seed_fusion": (["--fusion", "seed", "--branch-loss-weight", "0"],
                    "raw concatenation, no branch losses (the previous release's hybrid)"),
}
SUITES = {"recipe": RECIPE_VARIANTS, "models": MODEL_VARIANTS, "multilabel": MULTILABEL_VARIANTS,
          "defaults": DEFAULTS_VARIANTS}
# The data sets of the defaults suite: the phantoms of the demo, and scikit-learn's digits (real
# scans shipped inside its wheel, written by demo_data.py --real digits), both with the small setup.
DIGITS_FOLDER = "data/digits"
DATA_FLAGS = {
    "demo": ["--dataset", "demo"],
    "digits": ["--dataset", "covid", "--dataset-dir", DIGITS_FOLDER, "--setup", "small", "-p", "5",
               "--train-image-list", f"{DIGITS_FOLDER}/train_split.txt",
               "--test-image-list", f"{DIGITS_FOLDER}/test_split.txt"],
}
# The multi-label phantoms of the multilabel suite, and how every run of it reads and trains on them.
MULTILABEL_DATA = dict(folder="data/demo_nih", train_films=1000, test_films=400)
MULTILABEL_TRAIN = ["--dataset", "nih", "--dataset-dir", MULTILABEL_DATA["folder"], "--setup", "small", "-p", "5"]
# What `--suite models` runs without --variants: the comparison of HYBRID_MODEL_GUIDE.md (the
# patchify variants are there for a closer look at the stem).
DEFAULT_VARIANTS = {"recipe": list(RECIPE_VARIANTS),
                    "models": ["convnext", "vit", "hybrid_paper", "hybrid", "hybrid_no_branch_loss",
                               "hybrid_no_mxa"],
                    "multilabel": list(MULTILABEL_VARIANTS), "defaults": list(DEFAULTS_VARIANTS)}
METRICS = ("val_R@1", "val_mAP", "test_R@1", "test_mAP")
# The variant the paired comparisons of a suite are against, and further (variant, against) pairs.
REFERENCES = {"models": "convnext", "multilabel": "combinations", "defaults": "default"}
EXTRA_PAIRS = {"multilabel": [("findings", "convnext_findings")]}


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
    """test.py on the run's best checkpoint (report with branch shares, embeddings file), on the
    checkpoint's own test list."""
    report = directory / "test_report.json"
    if not report.is_file():
        command = [sys.executable, str(HERE / "test.py"), "--resume", str(best_checkpoint(directory)),
                   "--report", str(report)]
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
    """Delete the reports and comparisons a run is about to make stale: its own, and every
    comparison against it."""
    stale = list(run_dir(out, variant, seed).glob("test_report*.json"))
    stale += run_dir(out, variant, seed).glob("compare_vs_*.json")
    stale += run_dir(out, variant, seed).glob("rerank_*.json")
    stale += Path(out).glob(f"*/compare_vs_{run_dir(out, variant, seed).name}.json")
    for path in stale:
        path.unlink()


# The trained runs the rerank suite re-ranks (3 seeds each): (folder, variant) per --data.
RERANK_RUNS = {"digits": ("runs/defaults_digits", "default"), "demo": ("runs/defaults_demo", "default"),
               "multilabel": ("runs/ablation_multilabel", "findings")}
RERANK_METHODS = ("aqe", "dba", "kreciprocal")


def rerank_run(directory, method):
    """test.py --rerank METHOD (its default parameters) on the run's best checkpoint and test list:
    the re-ranked numbers and their paired patient bootstrap against the plain ranking."""
    report = directory / f"rerank_{method}.json"
    if not report.is_file():
        command = [sys.executable, str(HERE / "test.py"), "--resume", str(best_checkpoint(directory)),
                   "--rerank", method, "--bootstrap", "1000", "--report", str(report), "--no-plots",
                   "--neighbours", "0", "--save-dir", str(directory / "rerank_embeddings")]
        with open(directory / f"rerank_{method}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(report.read_text())["rerank"]


def rerank_table(data, seeds):
    """Per method: the re-ranked minus the plain test mAP, R@1 and MAP@R of every seed [95%]."""
    folder, variant = RERANK_RUNS[data]
    runs = [(seed, run_dir(folder, variant, seed)) for seed in seeds if result_of(run_dir(folder, variant, seed))]
    if not runs:
        raise SystemExit(f"no finished {variant} runs under {folder}: train them first (ablate.py --suite "
                         + ("multilabel" if data == "multilabel" else f"defaults --data {data}") + ")")
    columns = " | ".join(f"{metric} - plain per seed [95%]" for metric in ("mAP", "R@1", "MAP@R"))
    lines = [f"| method | seeds | plain test mAP | {columns} |", "|---|---|---|---|---|---|"]
    for method in RERANK_METHODS:
        results = [rerank_run(directory, method) for _, directory in runs]
        settings = ", ".join(f"{k} {v:g}" for k, v in results[0].items() if k not in ("method", "vs_plain"))

        def paired(entry):
            return "; ".join(f"{e['difference']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]" if e["low"] is not None
                             else f"{e['difference']:+.1f}" for e in entry)

        comparisons = [r["vs_plain"] for r in results]
        lines.append(f"| {method} ({settings}) | {len(runs)} | "
                     f"{_mean_sd([c['map']['b'] for c in comparisons])} | {paired([c['map'] for c in comparisons])} | "
                     f"{paired([c['recall_at_k']['1'] for c in comparisons])} | "
                     f"{paired([c['map_at_r'] for c in comparisons])} |")
    return "\n".join(lines)


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def summarise(out, suite, variants, seeds):
    table = SUITES[suite]
    header = ["variant", "seeds", *(f"{m} (best on val)" for m in METRICS), "epoch"]
    reference_variant = REFERENCES.get(suite)
    if reference_variant:
        header += ["ViT share %", "s / epoch", f"test mAP - {reference_variant} [95%] per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    points = {}
    for variant in variants:
        runs = [(s, r) for s, r in ((s, result_of(run_dir(out, variant, s))) for s in seeds) if r]
        if not runs:
            continue
        cells = [_mean_sd([r[key] for _, r in runs]) for key in METRICS]
        cells.append(", ".join(str(r["best_epoch"]) for _, r in runs))
        if reference_variant:
            shares, paired = [], []
            for seed, _ in runs:
                directory = run_dir(out, variant, seed)
                report, _ = evaluate_run(directory)
                shares.append((report.get("branch_attribution") or {}).get("vit"))
                reference = run_dir(out, reference_variant, seed)
                if variant != reference_variant and result_of(reference):
                    difference, low, high = compare_runs(directory, reference)
                    paired.append(f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]")
            cells += [_mean_sd(shares), f"{statistics.mean(r['seconds_per_epoch'] for _, r in runs):.0f}",
                      "; ".join(paired) or "—"]
        points[table[variant][1]] = [r["test_mAP"] for _, r in runs]
        lines.append(f"| {table[variant][1]} | {len(runs)} | " + " | ".join(cells) + " |")
    for variant, against in EXTRA_PAIRS.get(suite, []):
        paired = [compare_runs(run_dir(out, variant, seed), run_dir(out, against, seed)) for seed in seeds
                  if result_of(run_dir(out, variant, seed)) and result_of(run_dir(out, against, seed))]
        if paired:
            lines.append(f"\npaired test mAP, {table[variant][1]} - {table[against][1]}, per seed: "
                         + "; ".join(f"{d:+.1f} [{low:+.1f}, {high:+.1f}]" for d, low, high in paired))
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
    parser.add_argument("--suite", choices=(*SUITES, "rerank"), default="recipe",
                        help="recipe: the training recipe's parts; models: backbones, fusion, MXA")
    parser.add_argument("--variants", nargs="+", help="default: every variant of the suite")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", help="one folder per run (default runs/ablation or runs/ablation_models)")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--data", choices=tuple(RERANK_RUNS),
                        help="the defaults suite's data set: the phantoms (demo) or scikit-learn's digits; "
                        "the rerank suite's runs: those of the defaults suite on demo or digits, or of the "
                        "multilabel suite")
    args = parser.parse_args()
    if args.data and args.suite not in ("defaults", "rerank"):
        parser.error(f"--data chooses the data set of --suite defaults or rerank; --suite {args.suite} "
                     "has its own (drop --data)")
    if args.suite == "rerank" and (args.out or args.variants or args.summarise_only):
        parser.error("--suite rerank re-ranks the default runs of --suite defaults (or the findings runs of "
                     "--suite multilabel) in their own folders: drop --out, --variants and --summarise-only")
    args.data = args.data or "demo"
    if args.suite == "rerank":  # evaluation only: re-ranks runs another suite trained
        text = rerank_table(args.data, args.seeds)
        folder = Path(RERANK_RUNS[args.data][0])
        (folder / "rerank.md").write_text(text + "\n")
        print(text)
        return
    if args.suite == "defaults" and args.data not in DATA_FLAGS:
        parser.error(f"--suite defaults trains on --data {' or '.join(DATA_FLAGS)}")
    table = SUITES.get(args.suite, {})
    variants = args.variants or DEFAULT_VARIANTS.get(args.suite, [])
    unknown = [v for v in variants if v not in table]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} for --suite {args.suite}; "
                     f"choose from {', '.join(table)}")
    out = Path(args.out or {"recipe": "runs/ablation", "models": "runs/ablation_models",
                            "multilabel": "runs/ablation_multilabel",
                            "defaults": f"runs/defaults_{args.data}"}[args.suite])
    data_flags = DATA_FLAGS[args.data] if args.suite == "defaults" else DATA_FLAGS["demo"]
    if args.suite == "defaults" and args.data == "digits" and not args.summarise_only \
            and not Path(DIGITS_FOLDER).exists():
        from cxr.digits_data import write_digits_dataset

        write_digits_dataset(DIGITS_FOLDER)
    if args.suite == "multilabel":
        data_flags = MULTILABEL_TRAIN
        if not args.summarise_only and not Path(MULTILABEL_DATA["folder"]).exists():
            from cxr.multilabel_demo import write_multilabel_demo

            write_multilabel_demo(MULTILABEL_DATA["folder"], "nih", MULTILABEL_DATA["train_films"],
                                  MULTILABEL_DATA["test_films"])
    if not args.summarise_only:
        for seed in args.seeds:  # seed-major: a stopped ablation still has every variant once
            for variant in variants:
                directory = run_dir(out, variant, seed)
                if result_of(directory):
                    continue
                forget_evaluations(out, variant, seed)
                command = [sys.executable, str(HERE / "train.py"), *data_flags,
                           "--seed", str(seed), "--save-dir", str(directory), "--overwrite",
                           *table[variant][0]]
                print("running:", " ".join(command), flush=True)
                directory.mkdir(parents=True, exist_ok=True)
                with open(directory / "train.log", "w") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
                print(json.dumps({"variant": variant, "seed": seed, **result_of(directory)}), flush=True)
    text, points = summarise(out, args.suite, variants, args.seeds)
    print(text)
    if args.suite in REFERENCES and points:
        (out / f"{args.suite}.md").write_text(text + "\n")
        title = {"models": "Demo: which part of the hybrid gives what",
                 "multilabel": "Multi-label phantoms: findings vs combination classes",
                 "defaults": f"The hybrid's defaults on {args.data}"}[args.suite]
        print(f"figure: {plot_points(points, out / f'{args.suite}.png', title)}")


if __name__ == "__main__":
    main()
