"""Benchmarks: retrieval metrics, embedding extraction, training steps and the data pipeline.

    python bench.py metrics [--sizes 5000,20000] [--big 100000]  # evaluate_retrieval vs the seed's
    python bench.py multilabel [--sizes 5000,20000] [--big 100000]  # multi-label vs single-label metrics
    python bench.py rerank [--sizes 2000,10000] [--big 0]        # --rerank aqe, dba, kreciprocal vs plain
    python bench.py embed [--device cuda --full] [--compile]     # embedding extraction vs plain fp32
    python bench.py train [--device cuda --full] [--compile]     # training steps vs plain, ablation
    python bench.py data [--workers 0,2] [--dataset-dir DIR]     # loader vs the training step rate
    python bench.py search [--search-n 1000000]                  # search.search vs matmul + topk, memory
    python bench.py search --ivf 8192 --search-n 10000000        # faiss IVF vs exact: recall@10, time, memory
    python bench.py all                                          # all of them in turn

    quick look:  python bench.py metrics --sizes 2000 --big 0 --no-write
                 python bench.py train --steps 2 --warmup 1 --img-size 32 --no-write

Without --full the model and batch are train.py's demo configuration (presets.DEMO_DEFAULTS: convnextv2_atto +
vit_tiny_patch16_224 at a small size); --full is the paper's (presets.PAPER_DEFAULTS: ConvNeXtV2-Base +
ViT-B/16, 384 px, P x K = 3 x 16) with random weights, so nothing is downloaded. --img-size, -p, -k
and --batch-size override them. --steps / --warmup: timed / untimed iterations; --threads: torch
threads per case; --no-write: print only; --output: the file the tables are appended to (default:
BENCHMARKS.md next to this file); --note: a line added to each section (e.g. "shared machine").

Each suite prints a markdown table and appends it, with the machine, torch version, date and the
effective command, to BENCHMARKS.md, whose header explains the columns. Every measured case runs in a
fresh process forked from a server that has only imported the libraries, so cases share no warm caches
or allocator state and each memory number is the case's own: on the host its peak RSS minus that of a
process that did only the set-up (created the embeddings or the input batch), on CUDA
torch.cuda.max_memory_allocated. A case that fails (out of memory, a compile error) becomes a row
saying so; the other cases still run.
"""
import argparse
from pathlib import Path

import torch

from cxr import bench_data, bench_metrics, bench_search, bench_train

SUITES = ("metrics", "multilabel", "rerank", "embed", "train", "data", "search")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Benchmark metrics, embedding, training, data loading",
                                     add_help=add_help)
    parser.add_argument("suite", choices=(*SUITES, "all"), help="what to measure")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--full", action="store_true",
                        help="the paper's model (ConvNeXtV2-Base + ViT-B/16, 384 px, P x K = 3 x 16) "
                        "instead of the demo one")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--profile", action="store_true",
                        help="train suite: also profile one step of the optimised variant (torch.profiler: "
                        "the operators, or on a GPU the kernels, that take the time)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not append them")
    parser.add_argument("--output", default=str(Path(__file__).with_name("BENCHMARKS.md")),
                        help="markdown file the tables are appended to")
    parser.add_argument("--note", help="a line added to every section, e.g. 'shared machine, busy'")
    parser.add_argument("--steps", type=int,
                        help="timed iterations: training steps (default 10), embedding batches (10), "
                        "loader batches (40), searches (3, the fastest counts)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's)")
    # Model and batch (default: train.py's demo or, with --full, paper configuration)
    parser.add_argument("--img-size", type=int, help="input size, multiple of 32")
    parser.add_argument("-p", "--labels-per-batch", type=int, help="P of the training batch")
    parser.add_argument("-k", "--samples-per-label", type=int, help="K of the training batch")
    parser.add_argument("--batch-size", type=int, help="embedding batch (default: train.py's eval batch)")
    # metrics
    parser.add_argument("--sizes", type=int_list, default=[5000, 20000],
                        help="N compared against the seed algorithm, comma separated")
    parser.add_argument("--big", type=int, default=100_000,
                        help="N run with the fast metrics alone (0: skip)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=3, help="number of labels")
    # data
    parser.add_argument("--workers", type=int_list, help="loader worker counts, comma separated "
                        "(default: train.py's)")
    parser.add_argument("--dataset-dir", help="images under DIR/train (default: generated phantoms)")
    parser.add_argument("--image-list", help="COVIDx list of DIR/train (default: DIR/train_split.txt)")
    parser.add_argument("--data-seconds", type=float, default=300,
                        help="the data suite's timing budget: the loader cases share it, each stopping "
                        "early (with fewer batches) when its part is spent")
    parser.add_argument("--phantom-size", type=int,
                        help="side of the generated phantoms (default: train.py's demo size, "
                        "1024 with --full)")
    # search
    parser.add_argument("--search-n", type=int, default=1_000_000, help="gallery size of the search suite")
    parser.add_argument("--search-dim", type=int, default=256, help="embedding dimension of the search suite")
    parser.add_argument("--search-queries", type=int, default=100, help="queries of the search suite")
    parser.add_argument("--ivf", type=int, metavar="NLIST",
                        help="search suite: measure the approximate faiss IVF index with NLIST lists "
                        "against the exact search instead (CPU, needs faiss; bench_search.run_ivf)")
    parser.add_argument("--ivf-nprobe", type=int_list, default=[1, 4, 16, 64, 128, 256],
                        help="with --ivf: the nprobe values measured, comma separated")
    return parser


def main(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    if args.data_seconds <= 0:
        raise SystemExit(f"error: --data-seconds {args.data_seconds:g}: give a positive budget in seconds")
    if args.img_size is not None and args.img_size % 32:
        raise SystemExit(f"error: --img-size {args.img_size} must be a multiple of 32")
    if args.threads:
        torch.set_num_threads(args.threads)  # this process: the data suite's loader, the report
    runners = {"metrics": bench_metrics.run_metrics, "multilabel": bench_metrics.run_multilabel,
               "rerank": bench_metrics.run_rerank, "embed": bench_train.run_embed, "train": bench_train.run_train,
               "data": bench_data.run_data, "search": bench_search.run_search}
    suites = SUITES if args.suite == "all" else (args.suite,)
    return {suite: runners[suite](args) for suite in suites}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
