"""Benchmarks: retrieval metrics, embedding extraction, training steps and the data pipeline.

    python bench.py metrics [--sizes 5000,20000] [--big 100000]  # evaluate_retrieval vs the seed's
    python bench.py embed [--device cuda --full] [--compile]     # embedding extraction vs plain fp32
    python bench.py train [--device cuda --full] [--compile]     # training steps vs plain, ablation
    python bench.py data [--workers 0,2] [--dataset-dir DIR]     # loader vs the training step rate
    python bench.py search [--search-n 1000000]                  # retrieve.search vs matmul + topk, memory
    python bench.py search --ivf 8192 --search-n 10000000        # faiss IVF vs exact: recall@10, time, memory
    python bench.py all                                          # all five in turn

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
import datetime
import functools
import multiprocessing
import os
import platform
import resource
import shlex
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch.utils.flop_counter import FlopCounterMode

import metrics
import train
import utils
from model import build_model

SUITES = ("metrics", "embed", "train", "data", "search")
DEFAULT_STEPS = {"embed": 10, "train": 10, "data": 40, "search": 3}
# Imported once by the process server; each case then starts in about a second.
PRELOAD = ["numpy", "torch", "torchvision", "timm", "sklearn.metrics", "PIL.Image"]

OPTIMISATIONS = ("bf16", "channels_last", "fused", "checkpointing", "compile")
LABELS = {"bf16": "+bf16", "channels_last": "+channels-last", "fused": "+fused",
          "checkpointing": "+checkpointing", "compile": "+compile"}
# On CPU an optimisation joins the "optimised" combination when its own row beats plain by this
# factor; below it the difference is within the run-to-run noise of a shared machine.
HELPS = 1.05
# evaluate_retrieval sums AP terms in float32-rounded fixed point (~6e-8 relative, see metrics.py);
# every other number, confusion matrices included, matches to rounding.
EQUAL_TOL = 1e-6  # percentage points

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
    python bench.py search                        # retrieve.search: 1,000,000 x 256 float16, 100 queries
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
  Training steps are `train.train_step` itself (autocast forward, train.py's default loss: identity
  + triplet in fp32, backward, `build_optimizer`'s AdamW step, the scheduler step); the input is
  one random P x K batch already on the device. The model, loss and batch are train.py's demo or
  (`--full`) paper defaults.
- **loss**: mean training loss of the timed steps. Every variant starts from the same weights and
  batch: the first steps agree to bf16 precision, later ones may drift as the updates differ.
- **MFU** (CUDA): model FLOPs per image (FlopCounterMode over one forward + backward, not counting
  checkpointing's recompute) x img/s / the GPU's bf16 peak, measured with a large matmul in the same run.
- **min cos**: smallest per-image cosine similarity between that variant's embeddings and fp32's.
- **metrics**: seed = the seed's evaluation (one N x N similarity matrix, a full stable argsort, a
  Python loop per query with Counter majority votes, scikit-learn scores); fast =
  `metrics.evaluate_retrieval`. Leave-one-out on random unit vectors (D = 1024, 3 classes); **max
  diff**: the largest difference over every returned number (R@K, mAP, mP@K, every classification
  score, confusion matrices), equal when <= 1e-6 percentage points. **patients**: fast with
  test.py's same-patient exclusion (two images per patient), its seconds and memory.
- **data**: images/s of `ImageListDataset` + `build_transform` (decode, resize, flip) through a
  `DataLoader` with PK batches, measured alone, against the training step rate of train.py's default
  flags on the same device. The images are in the page cache (no disk reads). On a machine with few
  cores the loader and the training step share them, so there a ratio near 1 is already a bottleneck.
  **read**: decode = the full-size file every time; cache = `--cache-dir`'s pre-resized copy
  (image_cache.py), filled by one untimed pass first; **per worker**: img/s / workers (worker 0 =
  the main process); **vs decode**: cached / decoded at the same worker count (bench_data.py).
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
    if suite == "metrics":
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
    argv += ["--steps", str(steps_for(args, suite)), "--warmup", str(args.warmup)]
    for flag, value in (("--img-size", args.img_size), ("-p", args.labels_per_batch),
                        ("-k", args.samples_per_label), ("--batch-size", args.batch_size)):
        argv += [flag, str(value)] if value is not None else []
    if suite == "data":
        argv += ["--workers", ",".join(map(str, args.workers))] if args.workers else []
        argv += ["--dataset-dir", args.dataset_dir] if args.dataset_dir else []
        argv += ["--image-list", args.image_list] if args.image_list else []
        argv += ["--phantom-size", str(args.phantom_size)] if args.phantom_size else []
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


# --------------------------------------------------------------------------------------------
# metrics: evaluate_retrieval against the seed's algorithm
# --------------------------------------------------------------------------------------------
def seed_evaluate_retrieval(embeddings, labels, ks=(1, 5, 10), vote_ks=(1, 5, 10, 15, 20)):
    """The seed's leave-one-out evaluation, the reference evaluate_retrieval is timed against.

    Same definitions as metrics.evaluate_retrieval, computed the straightforward way: one full
    N x N similarity matrix, a full stable argsort of it (ties by gallery index), then a Python
    loop over the queries with the query's own image removed from its ranking.
    """
    embeddings = torch.as_tensor(embeddings).float()
    labels = torch.as_tensor(labels).cpu().numpy()
    similarities = embeddings @ embeddings.T  # (N, N)
    order = torch.argsort(similarities, dim=1, descending=True, stable=True).cpu().numpy()  # (N, N)
    del similarities
    counts = Counter(labels.tolist())
    average_precisions, hits = [], {k: [] for k in ks}
    predictions = {k: [] for k in vote_ks}
    for query, label in enumerate(labels):
        ranking = order[query][order[query] != query]  # (N - 1,) leave-one-out
        ranked_labels = labels[ranking]
        relevant = ranked_labels == label
        n_relevant = counts[label] - 1
        if n_relevant:  # queries without a relevant item are left out of mAP
            ranks = np.flatnonzero(relevant) + 1
            average_precisions.append(np.sum(np.arange(1, n_relevant + 1) / ranks) / n_relevant)
        for k in ks:
            hits[k].append(int(relevant[:k].sum()))
        for k in vote_ks:
            # most_common keeps first-seen order among equal counts: a tie goes to the label
            # ranked first.
            predictions[k].append(Counter(ranked_labels[:k].tolist()).most_common(1)[0][0])

    classes = sorted(counts)
    classification = {}
    for k in vote_ks:
        scores = {"accuracy": 100.0 * accuracy_score(labels, predictions[k])}
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(labels, predictions[k], labels=classes,
                                                         average=average, zero_division=0)
            scores.update({f"precision_{average}": 100.0 * float(p),
                           f"recall_{average}": 100.0 * float(r), f"f1_{average}": 100.0 * float(f)})
        scores["confusion_matrix"] = confusion_matrix(labels, predictions[k], labels=classes).tolist()
        classification[str(k)] = scores
    return {
        "recall_at_k": {str(k): 100.0 * float(np.mean([h > 0 for h in hits[k]])) for k in ks},
        "map": 100.0 * float(np.mean(average_precisions)),
        "precision_at_k": {str(k): 100.0 * float(np.mean(hits[k])) / k for k in ks},
        "classification": classification,
    }


def _flatten(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{path}/{i}")
    else:
        yield path, value


def max_difference(a, b):
    """Largest absolute difference between two metric dicts; inf when their entries differ."""
    a, b = dict(_flatten(a)), dict(_flatten(b))
    if a.keys() != b.keys():
        return float("inf")
    return max(abs(a[key] - b[key]) for key in a)


def random_embeddings(n, dim, classes, seed=0):
    """(N, D) random unit vectors and (N,) labels, the same for a given seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator)
    embeddings /= embeddings.norm(dim=1, keepdim=True)  # in place: no second (N, D) copy
    return embeddings, torch.randint(classes, (n,), generator=generator)


def metrics_case(algorithm, n, dim, classes, device):
    """Create the embeddings, then run `algorithm` ("seed", "fast", "patients" or None: set-up only)."""
    device = torch.device(device)
    embeddings, labels = (t.to(device) for t in random_embeddings(n, dim, classes))
    if algorithm is None:
        return {}
    evaluate = seed_evaluate_retrieval if algorithm == "seed" else metrics.evaluate_retrieval
    if algorithm == "patients":  # the same-patient exclusion test.py applies: two films per patient
        groups = torch.arange(n, device=device) // 2
        evaluate = functools.partial(metrics.evaluate_retrieval, query_groups=groups)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    result = evaluate(embeddings, labels)
    sync(device)
    out = {"seconds": time.perf_counter() - start, "result": result}
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device) - before
    return out


def run_metrics(args):
    device = torch.device(args.device)

    def measure(algorithm, n):
        return isolated(args.threads, metrics_case, algorithm, n, args.dim, args.classes, args.device)

    rows, table = [], []
    for n in args.sizes:
        baseline, seed, fast = measure(None, n), measure("seed", n), measure("fast", n)
        patients = measure("patients", n)
        row = {"n": n, "seed": seed, "fast": fast, "patients": patients}
        rows.append(row)
        errors = "; ".join(case["error"] for case in (baseline, seed, fast, patients) if "error" in case)
        if errors:
            table.append([f"{n:,}", *[""] * 11, errors])
            continue
        row["patients_bytes"] = peak_memory(patients, baseline, device)
        seed_bytes, fast_bytes = peak_memory(seed, baseline, device), peak_memory(fast, baseline, device)
        row.update(speedup=seed["seconds"] / fast["seconds"], seed_bytes=seed_bytes, fast_bytes=fast_bytes,
                   memory_ratio=fast_bytes / seed_bytes if seed_bytes > 0 else None,
                   max_diff=max_difference(seed["result"], fast["result"]))
        target = verdict = ""
        if n == TARGETS["metrics_n"]:
            target = f">= {TARGETS['metrics_speedup']:g}x, memory ratio < {TARGETS['metrics_memory_ratio']:g}"
            verdict = status(row["speedup"] >= TARGETS["metrics_speedup"] and row["memory_ratio"] is not None
                             and row["memory_ratio"] < TARGETS["metrics_memory_ratio"])
        table.append([f"{n:,}", f"{seed['seconds']:.2f}", f"{fast['seconds']:.2f}", times(row["speedup"]),
                      fmt(seed_bytes, ".0f", MB), fmt(fast_bytes, ".0f", MB), fmt(row["memory_ratio"], ".3f"),
                      f"{row['max_diff']:.1e}", "yes" if row["max_diff"] <= EQUAL_TOL else "NO",
                      f"{patients['seconds']:.2f}", fmt(row["patients_bytes"], ".0f", MB), target, verdict])
    if args.big:
        n = args.big
        baseline, fast = measure(None, n), measure("fast", n)
        row = {"n": n, "fast": fast}
        rows.append(row)
        errors = "; ".join(case["error"] for case in (baseline, fast) if "error" in case)
        if errors:
            table.append([f"{n:,}", *[""] * 11, errors])
        else:
            row["fast_bytes"] = peak_memory(fast, baseline, device)
            target = verdict = ""
            if n == TARGETS["metrics_big_n"]:
                target = (f"<= {TARGETS['metrics_big_seconds']:.0f} s, "
                          f"< {TARGETS['metrics_big_bytes'] / MB:.0f} MB")
                verdict = status(fast["seconds"] <= TARGETS["metrics_big_seconds"]
                                 and row["fast_bytes"] < TARGETS["metrics_big_bytes"])
            table.append([f"{n:,}", "not run", f"{fast['seconds']:.2f}", "", "",
                          fmt(row["fast_bytes"], ".0f", MB), "", "", "", "", "", target, verdict])
    header = ["N", "seed s", "fast s", "speed-up", "seed MB", "fast MB", "memory ratio", "max diff",
              "equal", "patients s", "patients MB", "target", "status"]
    memory = "GPU max_memory_allocated" if device.type == "cuda" else "peak RSS above the set-up"
    report(args, "metrics", f"metrics: evaluate_retrieval vs the seed algorithm ({args.device})",
           markdown_table(header, table),
           [f"leave-one-out, random unit vectors, D = {args.dim}, {args.classes} classes; R@K, mP@K "
            f"at K = 1, 5, 10, majority votes at k = 1, 5, 10, 15, 20; memory: {memory}; patients: "
            "fast with test.py's same-patient exclusion, two images per patient"])
    return rows


# --------------------------------------------------------------------------------------------
# search: retrieve.py's exact search over a large float16 gallery (bench_search.py)
# --------------------------------------------------------------------------------------------
def run_search(args):
    import bench_search  # imports this module: loaded on use, not at start-up
    return bench_search.run_search(args)


# --------------------------------------------------------------------------------------------
# Model set-up and variants, shared by embed, train and data
# --------------------------------------------------------------------------------------------
def train_argv(args):
    """train.py flags for the benchmarked configuration: the demo one, or the paper's with --full."""
    argv = ["--dataset", "covid" if args.full else "demo", "--no-pretrained", "--device", args.device]
    for flag, value in (("--img-size", args.img_size), ("--labels-per-batch", args.labels_per_batch),
                        ("--samples-per-label", args.samples_per_label),
                        ("--eval-batch-size", args.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def variant_argv(variant):
    """train.py flags of a variant."""
    argv = ["--amp", "bf16" if "bf16" in variant else "none",
            "--channels-last" if "channels_last" in variant else "--no-channels-last",
            "--fused-optimizer" if "fused" in variant else "--no-fused-optimizer"]
    argv += ["--grad-checkpointing"] if "checkpointing" in variant else []
    argv += ["--compile"] if "compile" in variant else []
    return argv


def variant_label(variant):
    return " ".join(LABELS[name] for name in OPTIMISATIONS if name in variant) or "plain"


def config_note(config):
    return (f"model: {config.convnext_name} + {config.vit_name}, {config.img_size} px, "
            f"embedding {config.embedding_dim}")


def make_model(args, device):
    torch.manual_seed(0)  # the same weights in every process, so the variants are comparable
    model = build_model(args.model, args.embedding_dim, args.img_size, args.convnext_name,
                        args.vit_name, pretrained=False, grad_checkpointing=args.grad_checkpointing)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def synthetic_images(n, size, device):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=generator).to(device)  # contiguous, as loaded


def ablation(measure, names, device):
    """Measure plain, each optimisation alone, all of them, plain again, then the optimised set.

    Returns a dict: "results" {variant: result}, "optimised" (a variant), "plain_again" and
    "reference", the faster plain run, which every ratio is taken against: when the machine's
    load changes during the run, speed-ups are understated rather than invented. Optimised is
    everything on CUDA; on CPU the optimisations whose own row beat plain by HELPS, since several
    of them hurt there.
    """
    plain = frozenset()
    results = {plain: measure(plain)}
    for name in names:
        results[frozenset({name})] = measure(frozenset({name}))
    everything = frozenset(names)
    if everything not in results:
        results[everything] = measure(everything)
    again = measure(plain)
    reference = max(results[plain], again, key=lambda result: result.get("images_per_s", 0.0))
    optimised = everything
    if device.type == "cpu":
        base = reference.get("images_per_s")
        optimised = frozenset(name for name in names if base and
                              results[frozenset({name})].get("images_per_s", 0.0) >= HELPS * base)
    if optimised not in results:
        results[optimised] = measure(optimised)
    return {"results": results, "optimised": optimised, "plain_again": again, "reference": reference}


def ablation_rows(runs, names):
    """(label, result, is the optimised row) for every measured variant, then the optimised one."""
    rows = []
    for variant, result in runs["results"].items():
        label = variant_label(variant)
        rows.append((f"all: {label}" if len(variant) == len(names) > 1 else label, result, False))
    rows.append(("plain, again", runs["plain_again"], False))
    optimised = runs["optimised"]
    # When nothing helped, optimised is plain itself: its faster run.
    result = runs["results"][optimised] if optimised else runs["reference"]
    rows.append((f"optimised = {variant_label(optimised)}", result, True))
    return rows


def ablation_notes(runs, device):
    notes = []
    if device.type == "cpu":
        notes.append(f"optimised on this CPU: {variant_label(runs['optimised'])} (each optimisation "
                     f"whose own row beat plain by >= {HELPS - 1:.0%})")
    first = runs["results"][frozenset()].get("images_per_s")
    again = runs["plain_again"].get("images_per_s")
    if first and again and abs(first - again) > 0.1 * max(first, again):
        notes.append(f"plain ran at {first:.1f} and {again:.1f} img/s at the start and the end: the "
                     "machine's load changed during the run; ratios (against the faster) are unreliable")
    return notes


def speedup(result, reference):
    if "error" in result or "error" in reference:
        return None
    return result["images_per_s"] / reference["images_per_s"]


# --------------------------------------------------------------------------------------------
# embed: embedding extraction
# --------------------------------------------------------------------------------------------
def embed_case(argv, variant, steps, warmup):
    """Embed `steps` synthetic batches with utils.extract_embeddings, after `warmup` untimed ones."""
    args = train.parse_args(argv + variant_argv(variant))
    device = torch.device(args.device)
    model = make_model(args, device)
    if args.compile:
        model = torch.compile(model)
    images = synthetic_images(args.eval_batch_size, args.img_size, device)
    batch = (images, torch.zeros(len(images), dtype=torch.long))
    runtime = utils.Runtime(device)
    if warmup:
        utils.extract_embeddings(model, [batch] * warmup, runtime, args.amp, args.channels_last,
                                 progress=False)
    sync(device)
    start = time.perf_counter()
    embeddings, _ = utils.extract_embeddings(model, [batch] * steps, runtime, args.amp,
                                             args.channels_last, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    # numpy, not a tensor: torch would send a tensor back through shared memory owned by this
    # process, which exits right after.
    return {"images_per_s": steps * len(images) / seconds,
            "embeddings": embeddings[:len(images)].cpu().numpy()}


def run_embed(args):
    device = torch.device(args.device)
    argv, steps = train_argv(args), steps_for(args, "embed")
    config = train.parse_args(argv)
    names = ["bf16", "channels_last"] + (["compile"] if args.compile else [])
    runs = ablation(lambda variant: isolated(args.threads, embed_case, argv, variant, steps, args.warmup),
                    names, device)
    plain = runs["results"][frozenset()]
    table = []
    for label, result, optimised in ablation_rows(runs, names):
        if "error" in result:
            table.append([label, config.eval_batch_size, "error", "", "", "", result["error"]])
            continue
        ratio = speedup(result, runs["reference"])
        cosine = None
        if "error" not in plain:  # embeddings are unit vectors: the row-wise dot product
            cosine = float((result["embeddings"] * plain["embeddings"]).sum(1).min())
        target = verdict = ""
        if optimised and device.type == "cuda" and args.full:
            target = f">= {TARGETS['embed_gpu_speedup']:g}x plain"
            verdict = status(ratio is not None and ratio >= TARGETS["embed_gpu_speedup"])
        table.append([label, config.eval_batch_size, f"{result['images_per_s']:.1f}", times(ratio),
                      fmt(cosine, ".5f"), target, verdict])
    header = ["variant", "batch", "img/s", "vs plain", "min cos", "target", "status"]
    notes = [f"{config_note(config)}; utils.extract_embeddings (inference mode) over {steps} "
             f"batches of random images already on the device, after {args.warmup} warm-up",
             *ablation_notes(runs, device)]
    model = "paper" if args.full else "demo"
    report(args, "embed", f"embed: embedding extraction ({args.device}, {model} model)",
           markdown_table(header, table), notes)
    return [{"variant": variant_label(v), "optimised": v == runs["optimised"],
             **{key: value for key, value in r.items() if key != "embeddings"}}
            for v, r in runs["results"].items()]


# --------------------------------------------------------------------------------------------
# train: training steps
# --------------------------------------------------------------------------------------------
def pk_batch(args, device):
    p, k = args.labels_per_batch, args.samples_per_label
    images = synthetic_images(p * k, args.img_size, device)
    labels = torch.arange(p, device=device).repeat_interleave(k)  # P labels x K images
    return images, labels


def training_setup(args, device):
    """train.py's model, loss, optimiser, scheduler and scaler for the configuration `args`."""
    model = make_model(args, device)
    criterion = train.build_criterion(args, args.labels_per_batch).to(device)
    objective = train.ModelWithLoss(torch.compile(model) if args.compile else model, criterion,
                                    device, args.amp)
    optimizer = train.build_optimizer(objective, args, device)
    scheduler = train.build_scheduler(optimizer, args, steps_per_epoch=100)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return objective, optimizer, scheduler, scaler


def train_case(argv, variant, steps, warmup):
    """`warmup` untimed, then `steps` timed training steps (train.train_step) of one variant on
    one fixed PK batch. variant None: only create the batch (the baseline of the host memory)."""
    args = train.parse_args(argv + variant_argv(variant or ()))
    device = torch.device(args.device)
    images, labels = pk_batch(args, device)
    if variant is None:
        return {}
    objective, optimizer, scheduler, scaler = training_setup(args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.to(memory_format=memory_format)
    objective.train()

    def step():
        return train.train_step(objective, optimizer, scheduler, scaler, images, labels, args)[0]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - start
    result = {"images_per_s": steps * len(images) / seconds, "losses": torch.stack(losses).tolist()}
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return result


def flops_case(argv):
    """Model FLOPs per training image and the GPU's measured bf16 matmul peak (FLOP/s)."""
    args = train.parse_args(argv + variant_argv(()))
    device = torch.device(args.device)
    objective = training_setup(args, device)[0]
    images = synthetic_images(4, args.img_size, device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    with FlopCounterMode(display=False) as counter:
        objective(images, labels)[0].backward()
    flops_per_image = counter.get_total_flops() / len(images)
    del objective, images

    n, repeats = 8192, 100
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(10):  # clocks up, kernel chosen
        torch.mm(a, b, out=c)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=c)
    sync(device)
    peak = 2 * n**3 * repeats / (time.perf_counter() - start)
    return {"flops_per_image": flops_per_image, "peak_flops": peak}


def run_train(args):
    device = torch.device(args.device)
    argv, steps = train_argv(args), steps_for(args, "train")
    config = train.parse_args(argv)
    batch = config.labels_per_batch * config.samples_per_label
    names = ["bf16", "channels_last", "fused", "checkpointing"] + (["compile"] if args.compile else [])
    baseline = {}
    if device.type == "cpu":
        baseline = isolated(args.threads, train_case, argv, None, steps, args.warmup)
    runs = ablation(lambda variant: isolated(args.threads, train_case, argv, variant, steps, args.warmup),
                    names, device)
    flops = isolated(args.threads, flops_case, argv) if device.type == "cuda" else {}
    with_mfu = "flops_per_image" in flops

    table = []
    for label, result, optimised in ablation_rows(runs, names):
        if "error" in result:
            table.append([label, "error", "", "", "", "", *([""] if with_mfu else []), "", result["error"]])
            continue
        ratio = speedup(result, runs["reference"])
        memory = peak_memory(result, baseline, device)
        mfu = result["images_per_s"] * flops["flops_per_image"] / flops["peak_flops"] if with_mfu else None
        target = verdict = ""
        if optimised and device.type == "cpu":
            target = f">= {TARGETS['train_cpu_speedup']:g}x plain"
            verdict = status(ratio is not None and ratio >= TARGETS["train_cpu_speedup"])
        elif optimised and args.full:
            goals = [f">= {TARGETS['train_gpu_speedup']:g}x plain", f"MFU >= {TARGETS['train_gpu_mfu']:.0%}"]
            met = (ratio is not None and ratio >= TARGETS["train_gpu_speedup"]
                   and mfu is not None and mfu >= TARGETS["train_gpu_mfu"])
            if batch == TARGETS["train_gpu_batch"]:
                goals.append(f"<= {TARGETS['train_gpu_bytes'] / MB:.0f} MB")
                met = met and memory is not None and memory <= TARGETS["train_gpu_bytes"]
            target, verdict = ", ".join(goals), status(met)
        losses = result["losses"]
        table.append([label, f"{result['images_per_s']:.1f}", f"{1000 * batch / result['images_per_s']:.0f}",
                      times(ratio), fmt(memory, ".0f", MB), f"{sum(losses) / len(losses):.4f}",
                      *([fmt(mfu, ".1%")] if with_mfu else []), target, verdict])
    header = ["variant", "img/s", "ms/step", "vs plain", "peak MB", "loss", *(["MFU"] if with_mfu else []),
              "target", "status"]
    notes = [f"{config_note(config)}, P x K = {config.labels_per_batch} x {config.samples_per_label} "
             f"= {batch}, recipe {config.recipe} ({config.mining} triplet, identity loss x {config.id_loss_weight:g}, neck {config.neck}); {steps} timed steps after {args.warmup} warm-up; "
             "random weights and images", *ablation_notes(runs, device)]
    if with_mfu:
        notes.append(f"model FLOPs per training image: {flops['flops_per_image'] / 1e9:.1f} G; "
                     f"measured bf16 matmul peak: {flops['peak_flops'] / 1e12:.0f} TFLOP/s")
    elif device.type == "cuda":
        notes.append(f"FLOP count / matmul peak failed: {flops['error']}")
    model = "paper" if args.full else "demo"
    report(args, "train", f"train: training steps ({args.device}, {model} model)",
           markdown_table(header, table), notes)
    return [{"variant": variant_label(v), "optimised": v == runs["optimised"], **r}
            for v, r in runs["results"].items()]


# --------------------------------------------------------------------------------------------
# data: the input pipeline against the training step rate
# --------------------------------------------------------------------------------------------
def run_data(args):
    import bench_data  # imports this module: loaded on use, not at start-up
    return bench_data.run_data(args)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def steps_for(args, suite):
    return args.steps if args.steps is not None else DEFAULT_STEPS[suite]


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
    if args.img_size is not None and args.img_size % 32:
        raise SystemExit(f"error: --img-size {args.img_size} must be a multiple of 32")
    if args.threads:
        torch.set_num_threads(args.threads)  # this process: the data suite's loader, the report
    runners = {"metrics": run_metrics, "embed": run_embed, "train": run_train, "data": run_data,
               "search": run_search}
    suites = SUITES if args.suite == "all" else (args.suite,)
    return {suite: runners[suite](args) for suite in suites}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
