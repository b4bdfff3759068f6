"""The recipe ablation of HYBRID_MODEL_GUIDE.md: demo trainings with one change each, several seeds.

    python ablate.py                       # every variant x seeds 0, 1, 2 (about 5 minutes a run on 2 cores)
    python ablate.py --variants default paper_loss --seeds 0
    python ablate.py --summarise-only      # the table from the runs already in --out

Each run is `python train.py --dataset demo --seed S <variant flags>` in <out>/<variant>_seed_<S>;
the numbers are those of the checkpoint train.py kept as best, i.e. chosen on the validation split
(validation and test R@1 / mAP of that epoch, from metrics.jsonl). Runs already finished are not
repeated. Prints a markdown table of mean and standard deviation over the seeds.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": ([], "strong recipe: BN neck + identity loss + batch-all triplet, AdamW, cosine"),
    "no_id_loss": (["--id-loss-weight", "0"], "without the identity loss (batch-all triplet only)"),
    "no_bn_neck": (["--neck", "none"], "without the BN neck"),
    "paper_loss": (["--id-loss-weight", "0", "--mining", "batch_hard"],
                   "the paper's loss: batch-hard triplet only (BN neck, AdamW, cosine kept)"),
    "seed_recipe": (["--recipe", "seed"], "the seed's recipe: Adam 1e-4 constant, batch-hard, no neck"),
}
METRICS = ("val_R@1", "val_mAP", "test_R@1", "test_mAP")


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
    return {"best_epoch": best["epoch"], **{key: best[key] for key in METRICS},
            "epoch0_test_mAP": records[0]["test_mAP"], "last_test_mAP": records[-1]["test_mAP"],
            "minutes": sum(r.get("time_s", 0.0) for r in records) / 60}


def summarise(out, variants, seeds):
    header = ["variant", "seeds", *(f"{m} (best on val)" for m in METRICS), "epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        results = [r for r in (result_of(run_dir(out, variant, s)) for s in seeds) if r]
        if not results:
            continue
        cells = []
        for key in METRICS:
            values = [r[key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        epochs = ", ".join(str(r["best_epoch"]) for r in results)
        lines.append(f"| {VARIANTS[variant][1]} | {len(results)} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablation", help="one folder per run")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    if not args.summarise_only:
        for seed in args.seeds:  # seed-major: a stopped ablation still has every variant once
            for variant in args.variants:
                directory = run_dir(args.out, variant, seed)
                if result_of(directory):
                    continue
                command = [sys.executable, str(Path(__file__).with_name("train.py")), "--dataset", "demo",
                           "--seed", str(seed), "--save-dir", str(directory), "--overwrite",
                           *VARIANTS[variant][0]]
                print("running:", " ".join(command), flush=True)
                directory.mkdir(parents=True, exist_ok=True)
                with open(directory / "train.log", "w") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
                print(json.dumps({"variant": variant, "seed": seed, **result_of(directory)}), flush=True)
    print(summarise(args.out, args.variants, args.seeds))


if __name__ == "__main__":
    main()
