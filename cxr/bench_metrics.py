"""bench.py metrics: evaluate_retrieval against the seed's algorithm (one N x N similarity
matrix, a full stable argsort, a Python loop per query), on random unit vectors."""
import functools
import time
from collections import Counter

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from cxr import multilabel_metrics, retrieval_metrics
from cxr.bench_harness import MB, TARGETS, fmt, isolated, markdown_table, peak_memory, report, status, sync, times
from cxr.reranking import METHODS as RERANK_METHODS
from cxr.reranking import Rerank

# evaluate_retrieval sums AP terms in float32-rounded fixed point (~6e-8 relative, see cxr/ranking.py);
# every other number, confusion matrices included, matches to rounding.
EQUAL_TOL = 1e-6  # percentage points


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
    """Largest absolute difference between two metric dicts over the entries of a (the seed's
    algorithm, which has no MAP@R or R-precision); inf when b lacks one of them."""
    a, b = dict(_flatten(a)), dict(_flatten(b))
    if not a.keys() <= b.keys():
        return float("inf")
    return max(abs(a[key] - b[key]) for key in a)


def random_embeddings(n, dim, classes, seed=0):
    """(N, D) random unit vectors and (N,) labels, the same for a given seed on every machine."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator)
    embeddings /= embeddings.norm(dim=1, keepdim=True)  # in place: no second (N, D) copy
    return embeddings, torch.randint(classes, (n,), generator=generator)


def random_findings(n, findings=14, seed=0):
    """(N, F) bool: each film 1 to 3 findings (about 1.3 on average, as NIH's films with findings)."""
    generator = torch.Generator().manual_seed(seed + 1)
    table = torch.zeros(n, findings, dtype=torch.bool)
    rows = torch.arange(n)
    table[rows, torch.randint(findings, (n,), generator=generator)] = True
    for share in (0.25, 0.05):
        extra = torch.rand(n, generator=generator) < share
        table[rows[extra], torch.randint(findings, (int(extra.sum()),), generator=generator)] = True
    return table


def metrics_case(algorithm, n, dim, classes, device):
    """Create the embeddings, then run `algorithm` ("seed", "fast", "patients", "multilabel",
    "multilabel_core" (without the per-finding AP) or None: set-up only)."""
    device = torch.device(device)
    embeddings, labels = (t.to(device) for t in random_embeddings(n, dim, classes))
    if algorithm is None:
        return {}
    evaluate = seed_evaluate_retrieval if algorithm == "seed" else retrieval_metrics.evaluate_retrieval
    groups = torch.arange(n, device=device) // 2  # test.py's same-patient exclusion: two films per patient
    if algorithm == "patients":
        evaluate = functools.partial(retrieval_metrics.evaluate_retrieval, query_groups=groups)
    if algorithm.startswith("rerank_"):  # test.py --rerank METHOD with its default parameters
        evaluate = functools.partial(retrieval_metrics.evaluate_retrieval, query_groups=groups,
                                     rerank=Rerank(algorithm.removeprefix("rerank_")))
    if algorithm.startswith("multilabel"):  # as test.py scores a multi-label list (vote ks as knn ks)
        labels = random_findings(n).to(device)
        evaluate = functools.partial(multilabel_metrics.evaluate_multilabel, query_groups=groups,
                                     per_finding=algorithm == "multilabel")
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


def run_multilabel(args):
    """evaluate_multilabel against the single-label path, both with the same-patient exclusion, in
    the same run at each N (the target: multi-label within 2x the single-label time and memory)."""
    device = torch.device(args.device)
    table, rows = [], []
    for n in [*args.sizes, *([args.big] if args.big else [])]:
        baseline = isolated(args.threads, metrics_case, None, n, args.dim, args.classes, args.device)
        cases = {name: isolated(args.threads, metrics_case, name, n, args.dim, args.classes, args.device)
                 for name in ("patients", "multilabel_core", "multilabel")}
        errors = "; ".join(case["error"] for case in (baseline, *cases.values()) if "error" in case)
        if errors:
            table.append([f"{n:,}", *[""] * 7, errors])
            continue
        memory = {name: peak_memory(case, baseline, device) for name, case in cases.items()}
        single = cases["patients"]
        row = {"n": n, **{f"{name}_seconds": case["seconds"] for name, case in cases.items()},
               **{f"{name}_bytes": value for name, value in memory.items()}}
        rows.append(row)
        ratios = [cases[name]["seconds"] / single["seconds"] for name in ("multilabel_core", "multilabel")]
        memory_ratios = [memory[name] / memory["patients"] if memory["patients"] > 0 else None
                         for name in ("multilabel_core", "multilabel")]
        verdict = status(ratios[0] <= 2 and (memory_ratios[0] is None or memory_ratios[0] <= 2))
        table.append([f"{n:,}", f"{single['seconds']:.2f}", f"{cases['multilabel_core']['seconds']:.2f}",
                      f"{cases['multilabel']['seconds']:.2f}", " / ".join(times(r) for r in ratios),
                      fmt(memory["patients"], ".0f", MB), " / ".join(fmt(memory[name], ".0f", MB) for name in
                                                                  ("multilabel_core", "multilabel")),
                      " / ".join(fmt(r, ".2f") for r in memory_ratios), verdict])
    header = ["N", "single-label s", "multi-label s", "+ per finding s", "time ratio", "single MB",
              "multi MB (core / + per finding)", "memory ratio", "core within 2x"]
    report(args, "multilabel", f"metrics: multi-label against single-label ({args.device})",
           markdown_table(header, table),
           [f"leave-one-out, random unit vectors, D = {args.dim}, two films per patient left out of each "
            "other's ranking; single-label: evaluate_retrieval with 3 classes; multi-label: evaluate_multilabel "
            "with 14 findings, 1.3 a film (R@K, mAP, mP@K, MAP@R, R-precision, nDCG@K, kNN AUROC at "
            "k = 1, 5, 10, 15, 20), then with the per-finding AP (one more ranking of each finding's "
            "carriers); memory: " + ("GPU max_memory_allocated" if device.type == "cuda" else
                                     "peak RSS above the set-up")])
    return rows


def run_rerank(args):
    """evaluate_retrieval with each re-ranking against the plain ranking, both with the
    same-patient exclusion, in the same run at each N."""
    device = torch.device(args.device)
    methods = [m for m in RERANK_METHODS if m != "none"]
    table, rows = [], []
    for n in [*args.sizes, *([args.big] if args.big else [])]:
        baseline = isolated(args.threads, metrics_case, None, n, args.dim, args.classes, args.device)
        cases = {name: isolated(args.threads, metrics_case, name, n, args.dim, args.classes, args.device)
                 for name in ("patients", *(f"rerank_{m}" for m in methods))}
        errors = "; ".join(case["error"] for case in (baseline, *cases.values()) if "error" in case)
        if errors:
            table.append([f"{n:,}", *[""] * (2 * len(methods) + 1), errors])
            continue
        memory = {name: peak_memory(case, baseline, device) for name, case in cases.items()}
        plain = cases["patients"]
        rows.append({"n": n, **{f"{name}_seconds": case["seconds"] for name, case in cases.items()},
                     **{f"{name}_bytes": value for name, value in memory.items()}})
        seconds = {m: cases[f"rerank_{m}"]["seconds"] for m in methods}
        table.append([f"{n:,}", f"{plain['seconds']:.2f}", fmt(memory["patients"], ".0f", MB),
                      *(f"{seconds[m]:.2f} ({times(seconds[m] / plain['seconds'])})" for m in methods),
                      *(fmt(memory[f"rerank_{m}"], ".0f", MB) for m in methods), ""])
    header = ["N", "plain s", "plain MB", *(f"{m} s (ratio)" for m in methods), *(f"{m} MB" for m in methods), "note"]
    defaults = Rerank()
    report(args, "rerank", f"metrics: re-ranking against the plain ranking ({args.device})",
           markdown_table(header, table),
           [f"leave-one-out, random unit vectors, D = {args.dim}, {args.classes} classes, two films per patient "
            f"left out of each other's ranking; evaluate_retrieval (R@K, mAP, mP@K, MAP@R, votes) with "
            f"--rerank's defaults: aqe and dba k = {defaults.k}, alpha = {defaults.alpha:g}; kreciprocal "
            f"k1 = {defaults.k1}, k2 = {defaults.k2}, Jaccard weight {defaults.jaccard_weight:g}; memory: "
            + ("GPU max_memory_allocated" if device.type == "cuda" else "peak RSS above the set-up")])
    return rows


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
