"""bench.py's search suite: retrieve.search over a large float16 gallery, against the floor.

    python bench.py search [--search-n 1000000 --search-dim 256 --search-queries 100] [--steps 3]

In one run, each in its own fresh process (bench.isolated), on the same random gallery of unit
vectors: plain (the floor: one float32 matrix product and torch.topk per chunk of 65,536 rows, no
tie rule), retrieve.search, the previous retrieve.search (a full stable sort of every chunk's
similarities), faiss's exact IndexFlatIP when faiss is installed (CPU only), then plain again.
Each times the top-10 search --steps times and keeps the fastest; extra memory is the case's
peak RSS during the searches above its resident memory once the gallery and the queries exist
(on CUDA the peak allocated above the set-up's).
"""
import ctypes
import time
from pathlib import Path

import numpy as np
import torch

import bench
import retrieve

K = 10
CHUNK = 65536  # retrieve.search's default
TARGET_SIZE = (1_000_000, 256, 100)  # gallery rows, dimension, queries: the targets are for this size
TARGET_SECONDS, TARGET_VS_PLAIN, TARGET_MEMORY = 2.0, 1.5, 0.5
LABELS = {"plain": "plain: float32 matmul + topk per chunk", "new": "retrieve.search",
          "previous": "previous: full stable sort per chunk", "faiss": "faiss IndexFlatIP (float32 copy)"}


def make_gallery(n, dim, queries, device):
    """A random float16 gallery (n, dim) of unit rows and `queries` float32 unit queries."""
    generator = torch.Generator().manual_seed(0)
    gallery = torch.empty(n, dim, dtype=torch.float16)
    for start in range(0, n, CHUNK):  # in chunks: no full float32 copy during set-up
        block = torch.randn(min(CHUNK, n - start), dim, generator=generator)
        gallery[start:start + len(block)] = block / block.norm(dim=1, keepdim=True)
    query = torch.randn(queries, dim, generator=generator)
    query /= query.norm(dim=1, keepdim=True)
    return gallery.to(device), query.to(device)


def plain_search(queries, gallery, k, chunk_size=CHUNK):
    """The floor retrieve.search is held to: per chunk a float32 matrix product and torch.topk,
    then the top k of the chunks' top ks (ties in whatever order topk leaves them)."""
    scores, indices = [], []
    for start in range(0, len(gallery), chunk_size):
        sims = queries @ gallery[start:start + chunk_size].float().T
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        scores.append(top.values)
        indices.append(top.indices + start)
    scores, indices = torch.cat(scores, dim=1), torch.cat(indices, dim=1)
    top = scores.topk(k, dim=1)
    return top.values, indices.gather(1, top.indices)


def previous_search(queries, gallery, k, chunk_size=CHUNK):
    """retrieve.search before the top-k rewrite: a full stable sort of every chunk."""
    best_scores = queries.new_empty(len(queries), 0)
    best_indices = torch.empty(len(queries), 0, dtype=torch.int64, device=queries.device)
    for start in range(0, len(gallery), chunk_size):
        sims = queries @ gallery[start:start + chunk_size].to(queries.device, torch.float32).T
        top = min(k, sims.shape[1])
        scores, order = torch.sort(sims, dim=1, descending=True, stable=True)
        scores = torch.cat([best_scores, scores[:, :top]], dim=1)
        indices = torch.cat([best_indices, order[:, :top] + start], dim=1)
        keep = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_indices = scores.gather(1, keep), indices.gather(1, keep)
    return best_scores, best_indices


def faiss_flat(gallery):
    """faiss's exact inner-product index over a float32 copy of the gallery (built untimed)."""
    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(gallery.shape[1])
    for start in range(0, len(gallery), CHUNK):
        index.add(gallery[start:start + CHUNK].float().numpy())

    def search(queries, _gallery, k):
        scores, indices = index.search(queries.numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(indices)
    return search


def reset_peak_rss():
    """Hand the allocator's free memory back to the system and restart the kernel's count of this
    process's peak RSS (Linux: /proc/self/clear_refs); the resident bytes now, None if unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status("VmRSS")
    except (OSError, AttributeError, ValueError):
        return None


def proc_status(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in /proc/self/status")


def search_case(variant, n, dim, queries, device, repeats):
    """Set up the gallery and queries; with a variant, time its top-K search `repeats` times."""
    device = torch.device(device)
    gallery, query = make_gallery(n, dim, queries, device)
    if variant is None:
        return {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # The set-up's own transient peak would hide the search's: measure from here on.
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else reset_peak_rss()
    run = {"plain": plain_search, "new": retrieve.search, "previous": previous_search}.get(variant)
    run = run or faiss_flat(gallery)  # its index, a float32 copy of the gallery, counts as extra
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        scores, indices = run(query, gallery, K)
        bench.sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best or (wall, cpu), (wall, cpu))
    result = {"seconds": best[0], "cpu_seconds": best[1], "gallery_bytes": gallery.numel() * gallery.element_size(),
              "scores": scores.cpu().numpy(), "indices": indices.cpu().numpy()}
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated(device) - before
    elif before is not None:
        result["extra_rss"] = proc_status("VmHWM") - before
    return result


def same_as(result, reference):
    if "indices" not in result or "indices" not in reference:
        return "n/a"
    if not np.array_equal(result["indices"], reference["indices"]):
        differ = int((result["indices"] != reference["indices"]).sum())
        return f"no: {differ} of {result['indices'].size} neighbours differ"
    diff = float(np.abs(result["scores"] - reference["scores"]).max())
    return "yes" if diff == 0 else f"neighbours yes, scores within {diff:.1e}"


def run_search(args):
    device = torch.device(args.device)
    n, dim, queries = args.search_n, args.search_dim, args.search_queries
    repeats = bench.steps_for(args, "search")

    def measure(variant):
        return bench.isolated(args.threads, search_case, variant, n, dim, queries, args.device, repeats)

    baseline = measure(None)
    variants = ["plain", "new", "previous"]
    try:
        import faiss  # noqa: F401
        variants += ["faiss"] if device.type == "cpu" else []
    except ImportError:
        pass
    results = {variant: measure(variant) for variant in variants}
    again = measure("plain")
    plain = min((results["plain"], again), key=lambda r: r.get("seconds", float("inf")))
    rows, table = [], []
    for variant, result in [*results.items(), ("plain, again", again)]:
        label = LABELS.get(variant, variant)
        if "error" in result or "error" in baseline:
            table.append([label, "", "", "", "", "", "", "", result.get("error", baseline.get("error"))])
            continue
        extra = result.get("extra_rss", bench.peak_memory(result, baseline, device))
        memory = extra / result["gallery_bytes"] if extra is not None else None
        vs_plain = result["seconds"] / plain["seconds"] if "seconds" in plain else None
        target = verdict = ""
        if variant == "new" and (n, dim, queries) == TARGET_SIZE:
            target = (f"<= {TARGET_SECONDS:g} s, <= {TARGET_VS_PLAIN:g}x plain, extra <= {TARGET_MEMORY:g}x "
                      "the gallery")
            checks = ((f"{result['seconds']:.2f} s", result["seconds"] <= TARGET_SECONDS),
                      (f"{vs_plain or 0:.2f}x plain", vs_plain is not None and vs_plain <= TARGET_VS_PLAIN),
                      (f"extra {memory or 0:.2f}x", memory is not None and memory <= TARGET_MEMORY))
            missed = [what for what, ok in checks if not ok]
            verdict = "met" if not missed else "MISSED: " + ", ".join(missed)
        table.append([label, f"{result['seconds']:.2f}", f"{result['cpu_seconds']:.2f}", bench.times(vs_plain),
                      bench.fmt(extra, ".0f", bench.MB), bench.fmt(memory, ".2f"),
                      same_as(result, results["previous"]), target, verdict])
        rows.append({"variant": variant, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                     "vs_plain": vs_plain, "extra_bytes": extra, "memory_ratio": memory})
    header = ["variant", "seconds", "cpu s", "time / plain", "extra MB", "extra / gallery",
              "same as previous", "target", "status"]
    notes = [f"gallery {n:,} x {dim} float16 ({n * dim * 2 / bench.MB:,.0f} MB) of random unit vectors, "
             f"{queries} float32 queries, top-{K}, chunks of {CHUNK:,} rows; seconds: the fastest of {repeats} "
             "searches in the case's process; cpu s: that search's process CPU time (all threads); "
             "extra: the case's peak memory above its resident memory after creating the gallery and "
             "the queries (on the host: peak RSS, after handing freed memory back to the system)",
             "time / plain: against the faster of the two plain runs; same as previous: the neighbours "
             "and scores against the previous retrieve.search's (the exact ranking, ties by index)"]
    if "faiss" in results:
        notes.append("faiss: search time only, the index (a float32 copy of the gallery) is built untimed "
                     "and counts in extra memory")
    first, last = results["plain"].get("seconds"), again.get("seconds")
    if first and last and abs(first - last) > 0.1 * max(first, last):
        notes.append(f"plain took {first:.2f} and {last:.2f} s at the start and the end: the machine's load "
                     "changed during the run; ratios (against the faster) are unreliable")
    bench.report(args, "search", f"search: retrieve.search, exact top-{K} ({args.device})",
                 bench.markdown_table(header, table), notes)
    return rows
