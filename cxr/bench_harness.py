"""bench.py's harness: every case in a fresh process (isolated), memory and machine readings,
the effective command line, and the markdown sections appended to BENCHMARKS.md."""
import datetime
import multiprocessing
import os
import platform
import resource
import shlex
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

DEFAULT_STEPS = {"embed": 10, "train": 10, "data": 40, "search": 3}


# Imported once by the process server; each case then starts in about a second.
PRELOAD = ["numpy", "torch", "torchvision", "timm", "sklearn.metrics", "PIL.Image"]


TARGETS = {
    "metrics_n": 20_000, "metrics_speedup": 5.0, "metrics_memory_ratio": 0.25,
    "metrics_big_n": 100_000, "metrics_big_seconds": 600.0, "metrics_big_bytes": 4e9,
    "train_cpu_speedup": 1.5,
    "train_gpu_speedup": 2.5, "train_gpu_batch": 48, "train_gpu_bytes": 16e9, "train_gpu_mfu": 0.40,
    "embed_gpu_speedup": 3.0,
}


MB = 1e6


HEADER = """# Benchmarks

Written by `bench.py`; each run appends one section per suite below, with the machine, torch version,
date and the effective command. Numbers from a shared or busy machine say so in their notes.

    python bench.py metrics                       # N = 5,000, 20,000 vs the seed algorithm; 100,000
    python bench.py train --device cpu            # demo model: plain, each optimisation, all, best
    python bench.py train --device cuda --full    # paper model, 384 px, P x K = 3 x 16, plus MFU
    python bench.py embed --device cuda --full    # embedding extraction
    python bench.py data --workers 0,2,8          # loader images/s vs the training step rate
    python bench.py search                        # search.search: 1,000,000 x 256 float16, 100 queries
    python bench.py search --ivf 8192 --search-n 10000000   # faiss IVF vs exact, recall@10 per nprobe
    python bench.py all --device cuda --full      # everything; add --compile for torch.compile rows

Columns

- **img/s**: images per second over the timed iterations (`--steps`), after `--warmup` untimed ones.
  Every case runs in its own fresh process. **vs plain**: ratio to the faster of the two plain runs
  of the same suite (plain is measured first and again after the other variants; when the two
  differ by more than 10% the notes say the machine's load changed and the ratios are unreliable).
- **peak MB** (MB = 10^6 bytes): on CPU the peak RSS of the case's own process minus that of a process
  that did only the set-up (created the embeddings / the input batch), so it includes weights,
  gradients, optimiser state and activations; on CUDA `torch.cuda.max_memory_allocated` (the same
  things, on the GPU).
- **train / embed variants**: plain = fp32, eager, contiguous memory, PyTorch's default AdamW, no
  gradient checkpointing (the seed's style); `+x` = plain plus that one optimisation; all = bf16
  autocast + channels-last + fused AdamW + gradient checkpointing (+ `torch.compile` with `--compile`);
  optimised = all on CUDA, and on CPU the optimisations whose own row beat plain by at least 5%.
  Training steps are `engine.train_step` itself (autocast forward, train.py's default loss: identity
  + triplet in fp32, backward, `build_optimizer`'s AdamW step, the scheduler step); the input is
  one random P x K batch already on the device. The model, loss and batch are train.py's demo or
  (`--full`) paper defaults.
- **loss**: mean training loss of the timed steps. Every variant starts from the same weights and
  batch: the first steps agree to bf16 precision, later ones may drift as the updates differ.
- **MFU** (CUDA): model FLOPs per training image by the usual convention, 3 x the forward pass
  (FlopCounterMode over one forward; no recompute for checkpointing; cxr/flops.py), x img/s / the
  GPU's bf16 peak, measured with a large matmul in the same run. Sections written before
  2026-12-03 counted the backward with FlopCounterMode too, which counts a depthwise
  convolution's backward as if it were dense: their MFU is about twice what it was (each says so).
- **min cos**: smallest per-image cosine similarity between that variant's embeddings and fp32's.
- **metrics**: seed = the seed's evaluation (one N x N similarity matrix, a full stable argsort, a
  Python loop per query with Counter majority votes, scikit-learn scores); fast =
  `retrieval_metrics.evaluate_retrieval`. Leave-one-out on random unit vectors (D = 1024, 3 classes); **max
  diff**: the largest difference over every returned number (R@K, mAP, mP@K, every classification
  score, confusion matrices), equal when <= 1e-6 percentage points. **patients**: fast with
  test.py's same-patient exclusion (two images per patient), its seconds and memory.
- **data**: images/s of `ImageListDataset` + `build_transform` (decode, resize, flip) through a
  `DataLoader` with PK batches, measured alone, against the training step rate of train.py's default
  flags on the same device. The images are in the page cache (no disk reads). On a machine with few
  cores the loader and the training step share them, so there a ratio near 1 is already a bottleneck.
  **read**: decode = the full-size file every time; cache = `--cache-dir`'s pre-resized copy
  (cxr/image_cache.py), filled by one untimed pass first; **per worker**: img/s / workers (worker 0 =
  the main process); **vs decode**: cached / decoded at the same worker count (cxr/bench_data.py).
- **search**: seconds of the fastest of `--steps` top-10 searches in the case's process, **cpu s** its
  process CPU time (all threads); plain = one float32 matmul + `torch.topk` per chunk (the floor, no
  tie rule); previous = the full-stable-sort search retrieve.py had before; extra = the case's peak
  memory during the searches above its own once the gallery and the queries exist.
- **target / status**: the goals set for this code; `MISSED` marks a finding, not a failure of the run.
"""


# --------------------------------------------------------------------------------------------
# Running and reporting cases
# --------------------------------------------------------------------------------------------
def isolated(threads, fn, *args):
    """fn(*args) in a fresh process with `threads` torch threads (None: torch's default).
    Returns fn's result dict plus "peak_rss" (bytes), or {"error": text}."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_measured, threads, fn, *args).result()
        except BrokenProcessPool:
            return {"error": "the process died (killed for memory?)"}


def _measured(threads, fn, *args):
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # a failed case becomes a row; the other cases still run
        traceback.print_exc()
        message = (str(error).splitlines() or [""])[0][:160].replace("|", "/")  # a table cell
        return {"error": f"{type(error).__name__}: {message}"}
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return result


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(case, baseline, device):
    """Bytes: the GPU peak on CUDA, else the case's peak RSS above the set-up-only process."""
    if device.type == "cuda":
        return case.get("gpu_peak")
    if "peak_rss" not in case or "peak_rss" not in baseline:
        return None
    return case["peak_rss"] - baseline["peak_rss"]


def machine(device):
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, torch threads: {torch.get_num_threads()}, "
            f"{torch.backends.cpu.get_cpu_capability()}")
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def command_line(args, suite):
    """The effective command, defaults included, so a section can be rerun as it was measured."""
    argv = ["python", "bench.py", suite, "--device", args.device]
    argv += ["--threads", str(args.threads)] if args.threads else []
    if suite in ("metrics", "multilabel", "rerank"):
        argv += ["--sizes", ",".join(map(str, args.sizes)), "--big", str(args.big),
                 "--dim", str(args.dim), "--classes", str(args.classes)]
        return shlex.join(argv)
    if suite == "search":
        argv += ["--search-n", str(args.search_n), "--search-dim", str(args.search_dim),
                 "--search-queries", str(args.search_queries), "--steps", str(steps_for(args, suite))]
        if args.ivf:
            argv += ["--ivf", str(args.ivf), "--ivf-nprobe", ",".join(map(str, args.ivf_nprobe))]
        return shlex.join(argv)
    argv += ["--full"] if args.full else []
    argv += ["--compile"] if args.compile and suite != "data" else []
    argv += ["--profile"] if getattr(args, "profile", False) and suite == "train" else []
    argv += ["--steps", str(steps_for(args, suite)), "--warmup", str(args.warmup)]
    for flag, value in (("--img-size", args.img_size), ("-p", args.labels_per_batch),
                        ("-k", args.samples_per_label), ("--batch-size", args.batch_size)):
        argv += [flag, str(value)] if value is not None else []
    if suite == "data":
        argv += ["--workers", ",".join(map(str, args.workers))] if args.workers else []
        argv += ["--dataset-dir", args.dataset_dir] if args.dataset_dir else []
        argv += ["--image-list", args.image_list] if args.image_list else []
        argv += ["--phantom-size", str(args.phantom_size)] if args.phantom_size else []
        argv += ["--data-seconds", f"{args.data_seconds:g}"]
    return shlex.join(argv)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(args, suite, title, table, notes=()):
    device = torch.device(args.device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = [*notes, *([args.note] if args.note else [])]
    lines = [f"## {title}", "", f"- machine: {machine(device)}",
             f"- torch {torch.__version__}, {date}", f"- command: `{command_line(args, suite)}`",
             *(f"- {note}" for note in notes), "", table, ""]
    text = "\n".join(lines)
    print(text, flush=True)
    if not args.no_write:
        output = Path(args.output)
        if not output.exists():
            output.write_text(HEADER, encoding="utf-8")
        with open(output, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def status(ok):
    return "met" if ok else "MISSED"


def fmt(value, spec=".1f", scale=1.0):
    return "n/a" if value is None else format(value / scale, spec)


def times(ratio):
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def steps_for(args, suite):
    return args.steps if args.steps is not None else DEFAULT_STEPS[suite]
