"""bench.py's search suite: search.search over a large float16 gallery, against the floor.

    python bench.py search [--search-n 1000000 --search-dim 256 --search-queries 100] [--steps 3]

In one run, each in its own fresh process (bench.isolated), on the same random gallery of unit
vectors: plain (the floor: one float32 matrix product and torch.topk per chunk of 65,536 rows, no
tie rule), search.search, the previous search.search (a full stable sort of every chunk's
similarities), faiss's exact IndexFlatIP when faiss is installed (CPU only), then plain again.
Each times the top-10 search --steps times and keeps the fastest; extra memory is the case's
peak RSS during the searches above its resident memory once the gallery and the queries exist
(on CUDA the peak allocated above the set-up's).

    python bench.py search --ivf NLIST [--ivf-nprobe 1,4,16,64,128,256] [--search-n 10000000]

With --ivf the suite measures the approximate faiss IVF path of retrieve.py (index --faiss-ivf
NLIST, query --search faiss --nprobe N) instead (run_ivf; CPU, needs faiss): on a clustered
float16 gallery (make_clustered_gallery: unit vectors around 5,000 Gaussian centres, not uniform
noise, on which IVF would mean nothing), one fresh process (ivf_case) times search.search's
exact top-10 and keeps its neighbours; builds a faiss IndexIVFFlat the way
gallery_index.build_faiss_index does, from the same rows made again in chunks after the gallery is
freed (the gallery, the training sample and the float32 index are never all resident); for each
--ivf-nprobe times the IVF search and its recall@10 against the exact neighbours; then times the
exact search again (a load change shows). Build time (training + adding), index bytes and peak
RSS go in a second table.
"""
import ctypes
import time
from pathlib import Path

import numpy as np
import torch

from cxr import bench_harness, search

K = 10
CHUNK = 65536  # search.search's default
TARGET_SIZE = (1_000_000, 256, 100)  # gallery rows, dimension, queries: the targets are for this size
TARGET_SECONDS, TARGET_VS_PLAIN, TARGET_MEMORY = 2.0, 1.5, 0.5
LABELS = {"plain": "plain: float32 matmul + topk per chunk", "new": "search.search",
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
    """The floor search.search is held to: per chunk a float32 matrix product and torch.topk,
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
    """search.search before the top-k rewrite: a full stable sort of every chunk."""
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
    run = {"plain": plain_search, "new": search.search, "previous": previous_search}.get(variant)
    run = run or faiss_flat(gallery)  # its index, a float32 copy of the gallery, counts as extra
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        scores, indices = run(query, gallery, K)
        bench_harness.sync(device)
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
    if getattr(args, "ivf", None):
        return run_ivf(args)
    device = torch.device(args.device)
    n, dim, queries = args.search_n, args.search_dim, args.search_queries
    repeats = bench_harness.steps_for(args, "search")

    def measure(variant):
        return bench_harness.isolated(args.threads, search_case, variant, n, dim, queries, args.device, repeats)

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
        extra = result.get("extra_rss", bench_harness.peak_memory(result, baseline, device))
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
        table.append([label, f"{result['seconds']:.2f}", f"{result['cpu_seconds']:.2f}", bench_harness.times(vs_plain),
                      bench_harness.fmt(extra, ".0f", bench_harness.MB), bench_harness.fmt(memory, ".2f"),
                      same_as(result, results["previous"]), target, verdict])
        rows.append({"variant": variant, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                     "vs_plain": vs_plain, "extra_bytes": extra, "memory_ratio": memory})
    header = ["variant", "seconds", "cpu s", "time / plain", "extra MB", "extra / gallery",
              "same as previous", "target", "status"]
    notes = [f"gallery {n:,} x {dim} float16 ({n * dim * 2 / bench_harness.MB:,.0f} MB) of random unit vectors, "
             f"{queries} float32 queries, top-{K}, chunks of {CHUNK:,} rows; seconds: the fastest of {repeats} "
             "searches in the case's process; cpu s: that search's process CPU time (all threads); "
             "extra: the case's peak memory above its resident memory after creating the gallery and "
             "the queries (on the host: peak RSS, after handing freed memory back to the system)",
             "time / plain: against the faster of the two plain runs; same as previous: the neighbours "
             "and scores against the previous search.search's (the exact ranking, ties by index)"]
    if "faiss" in results:
        notes.append("faiss: search time only, the index (a float32 copy of the gallery) is built untimed "
                     "and counts in extra memory")
    first, last = results["plain"].get("seconds"), again.get("seconds")
    if first and last and abs(first - last) > 0.1 * max(first, last):
        notes.append(f"plain took {first:.2f} and {last:.2f} s at the start and the end: the machine's load "
                     "changed during the run; ratios (against the faster) are unreliable")
    bench_harness.report(args, "search", f"search: search.search, exact top-{K} ({args.device})",
                 bench_harness.markdown_table(header, table), notes)
    return rows


# --------------------------------------------------------------------------------------------
# --ivf: the approximate faiss IVF path (retrieve.py index --faiss-ivf, query --search faiss)
# --------------------------------------------------------------------------------------------
IVF_CENTRES, IVF_SPREAD = 5000, 1.5  # the clustered gallery: see make_clustered_gallery
IVF_TARGET_SIZE = (10_000_000, 256)  # gallery rows, dimension: the target is for this size
IVF_TARGET_RECALL, IVF_TARGET_TIME = 0.95, 0.10  # recall@10 against exact, IVF time / exact time


def clustered_rows(n, dim, centres=IVF_CENTRES, spread=IVF_SPREAD):
    """The clustered gallery of make_clustered_gallery chunk by chunk, as it is stored (float16),
    without holding it: (start row, float16 rows (CHUNK, dim), their clusters int16) per chunk,
    the same rows on every call. Then the queries: ("queries", draw, None), draw(count)."""
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(centres, dim, generator=generator)
    centre /= centre.norm(dim=1, keepdim=True)

    def draw(rows, generator):
        cluster = torch.randint(centres, (rows,), generator=generator)
        block = centre[cluster] + torch.randn(rows, dim, generator=generator) * (spread / dim ** 0.5)
        return block / block.norm(dim=1, keepdim=True), cluster.to(torch.int16)

    for start in range(0, n, CHUNK):
        block, cluster = draw(min(CHUNK, n - start), generator)
        yield start, block.half(), cluster
    yield "queries", lambda count: draw(count, torch.Generator().manual_seed(1)), None


def make_clustered_gallery(n, dim, queries, centres=IVF_CENTRES, spread=IVF_SPREAD):
    """A float16 gallery (n, dim) and `queries` float32 queries with the cluster structure of
    real embeddings (IVF on isotropic random vectors measures nothing), and the cluster of each:
    (gallery, queries, gallery clusters int16, query clusters int16). `centres` unit centres
    drawn uniformly on the sphere; each row picks a centre uniformly at random and is
    normalize(centre + spread * g / sqrt(dim)), g standard normal, so its noise has about
    `spread` times the centre's norm (spread 1.5, D = 256: a row's cosine to its centre is about
    0.55, to another row of its cluster about 0.31, to a row of another cluster 0 +- 0.06). The
    queries are drawn the same way from another random stream (not gallery rows). Made in
    chunks (clustered_rows): no float32 copy of the gallery."""
    gallery = torch.empty(n, dim, dtype=torch.float16)
    clusters = torch.empty(n, dtype=torch.int16)
    for start, block, cluster in clustered_rows(n, dim, centres, spread):
        if start == "queries":
            query, query_clusters = block(queries)
            break
        gallery[start:start + len(block)], clusters[start:start + len(block)] = block, cluster
    return gallery, query, clusters, query_clusters


def recall_at_k(found, exact):
    """Mean over queries of |found row & exact row| / k: the share of each query's exact top k
    (Q, k) that the approximate search returned in its top k (faiss's -1 padding never matches)."""
    found, exact = np.asarray(found), np.asarray(exact)
    hits = [len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact)]
    return float(np.sum(hits)) / exact.size


def _fastest(repeats, run):
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best or (wall, cpu), (wall, cpu))
    return best, out


def ivf_case(n, dim, queries, nlist, nprobes, repeats):
    """In one process, so that the times compare under the same load: search.search's exact
    top-K over the clustered gallery (the reference neighbours and time); a faiss IndexIVFFlat
    built as gallery_index.build_faiss_index builds it (inner-product quantizer, trained on the same
    sample of 256 * nlist rows); for each nprobe the IVF top-K time and recall@K; then the exact
    search again (a change of the machine's load between shows as a difference).

    Memory: the float16 gallery is freed after the exact search and the index is fed the same
    rows regenerated chunk by chunk (clustered_rows), so the gallery, the training sample and
    the index (a float32 copy) are never all resident: at 10^7 x 256, 5.1 + 4.3 + 10.3 GB would
    not fit beside anything else on a 24 GB machine. The index is freed before the gallery is
    made again for the second exact search."""
    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())
    gallery, query, clusters, query_clusters = make_clustered_gallery(n, dim, queries)
    (exact_seconds, exact_cpu), (_, exact) = _fastest(repeats, lambda: search.search(query, gallery, K))
    # how local the exact neighbours are: the share of them in the query's own cluster
    in_cluster = float((clusters[exact] == query_clusters[:, None]).double().mean())
    del gallery, clusters
    setup_peak = proc_status("VmHWM")  # reset_peak_rss restarts the count
    before = reset_peak_rss()  # from here: the build's and the index's memory
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # gallery_index.build_faiss_index's sample, gathered chunk by chunk, converted to float32 as it does
    sample = np.sort(np.random.default_rng(0).permutation(n)[:256 * nlist])
    train, taken = np.empty((len(sample), dim), dtype=np.float32), 0
    for start, block, _ in clustered_rows(n, dim):
        if start == "queries":
            break
        rows = sample[np.searchsorted(sample, start):np.searchsorted(sample, start + len(block))] - start
        train[taken:taken + len(rows)] = block[torch.from_numpy(rows)].float().numpy()
        taken += len(rows)
    del sample
    start_time = time.perf_counter()
    index.train(train)
    train_seconds = time.perf_counter() - start_time
    del train
    add_seconds = 0.0
    for start, block, _ in clustered_rows(n, dim):
        if start == "queries":
            break
        vectors = block.float().numpy()  # the float16 gallery's rows, as float32
        start_time = time.perf_counter()
        index.add(vectors)
        add_seconds += time.perf_counter() - start_time
    result = {"train_seconds": train_seconds, "add_seconds": add_seconds, "build_seconds": train_seconds + add_seconds,
              # the inverted lists (float32 vectors + int64 ids) and the quantizer's centroids
              "index_bytes": index.ntotal * (index.code_size + 8) + nlist * dim * 4,
              "build_extra_rss": proc_status("VmHWM") - before if before is not None else None,
              "exact": [{"seconds": exact_seconds, "cpu_seconds": exact_cpu}], "in_cluster": in_cluster}
    vectors = np.ascontiguousarray(query.numpy(), dtype=np.float32)
    exact = exact.numpy()
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        (seconds, cpu), (_, indices) = _fastest(repeats, lambda: index.search(vectors, K))
        rows.append({"nprobe": nprobe, "seconds": seconds, "cpu_seconds": cpu,
                     "recall": recall_at_k(indices, exact), "short": int((indices < 0).any(axis=1).sum())})
    result["rows"] = rows
    index = quantizer = None  # freed before the gallery is made again
    gallery, query, _, _ = make_clustered_gallery(n, dim, queries)
    (seconds, cpu), (_, again) = _fastest(repeats, lambda: search.search(query, gallery, K))
    result["exact"].append({"seconds": seconds, "cpu_seconds": cpu, "same": bool((again.numpy() == exact).all())})
    result["peak_rss_all"] = max(setup_peak, proc_status("VmHWM"))  # the whole case
    return result


def run_ivf(args):
    """`python bench.py search --ivf NLIST`: the faiss IVF path against the exact search."""
    try:
        import faiss
    except ImportError:
        raise SystemExit("error: --ivf needs faiss (pip install faiss-cpu)") from None
    if args.device != "cpu":
        raise SystemExit("error: --ivf measures faiss-cpu: use --device cpu")
    n, dim, queries, nlist = args.search_n, args.search_dim, args.search_queries, args.ivf
    if not 1 <= nlist <= n:
        raise SystemExit(f"error: --ivf {nlist}: need 1 <= NLIST <= --search-n {n}")
    nprobes = sorted({min(p, nlist) for p in args.ivf_nprobe})
    repeats = bench_harness.steps_for(args, "search")
    result = bench_harness.isolated(args.threads, ivf_case, n, dim, queries, nlist, nprobes, repeats)
    at_target = (n, dim) == IVF_TARGET_SIZE
    target = f"recall@{K} >= {IVF_TARGET_RECALL:g} at <= {IVF_TARGET_TIME:.0%} of the exact search's time"
    header = ["search", "lists visited", "seconds", "cpu s", "time / exact", "cpu / exact", f"recall@{K}",
              "queries short of k", "status"]
    table, met = [], []
    exact = min(result.get("exact", []), key=lambda r: r["seconds"], default=None)
    for run, label in zip(result.get("exact", []), ("exact: search.search", "exact, again")):
        table.append([label, "all", f"{run['seconds']:.3f}", f"{run['cpu_seconds']:.2f}",
                      f"{run['seconds'] / exact['seconds']:.3f}", f"{run['cpu_seconds'] / exact['cpu_seconds']:.3f}",
                      "1.000", "", ""])
    for row in result.get("rows", []):
        row["vs_exact"] = row["seconds"] / exact["seconds"]
        ok = row["recall"] >= IVF_TARGET_RECALL and row["vs_exact"] <= IVF_TARGET_TIME
        met += [row] if ok else []
        table.append([f"IVF nprobe {row['nprobe']}", f"{row['nprobe'] / nlist:.2%}", f"{row['seconds']:.3f}",
                      f"{row['cpu_seconds']:.2f}", f"{row['vs_exact']:.3f}",
                      f"{row['cpu_seconds'] / exact['cpu_seconds']:.3f}", f"{row['recall']:.3f}", row["short"],
                      ("met" if ok else "no") if at_target else ""])
    if "error" in result:
        table.append(["exact + IVF", *[""] * (len(header) - 2), result["error"]])
    text = bench_harness.markdown_table(header, table)
    if "build_seconds" in result:
        build = [[f"{nlist:,}", f"{min(256 * nlist, n):,}", f"{result['train_seconds']:.1f}",
                  f"{result['add_seconds']:.1f}", f"{result['build_seconds']:.1f}",
                  f"{result['index_bytes'] / bench_harness.MB:,.0f}",
                  bench_harness.fmt(result["build_extra_rss"], ",.0f", bench_harness.MB),
                  f"{result['peak_rss_all'] / bench_harness.MB:,.0f}"]]
        text += "\n\n" + bench_harness.markdown_table(
            ["nlist", "training rows", "train s", "add s", "build s", "index MB", "build extra MB",
             "peak RSS MB"], build)
    notes = [f"gallery {n:,} x {dim} float16 ({n * dim * 2 / bench_harness.MB:,.0f} MB), clustered: {IVF_CENTRES:,} "
             "unit centres uniform on the sphere, each row normalize(centre + "
             f"{IVF_SPREAD:g} * g / sqrt({dim})) around a centre picked uniformly, g standard normal "
             "(torch generator seed 0, made in chunks of 65,536 rows); "
             f"{queries} float32 queries drawn the same way from seed 1 (not gallery rows); top-{K}"
             + (f"; {result['in_cluster']:.1%} of the exact top-{K} neighbours are in their query's cluster"
                if "in_cluster" in result else ""),
             f"exact: search.search; IVF: faiss {faiss.__version__} IndexIVFFlat, inner product, built as "
             "gallery_index.build_faiss_index builds it (trained on 256 x nlist rows sampled with numpy seed 0), "
             f"rows added in float32 chunks of {CHUNK:,}; all in one process: the exact search timed, "
             "the gallery freed, the index built from the same rows made again chunk by chunk (never "
             "the gallery and the index resident together), the IVF searches timed, the index freed, "
             "the gallery made again and the exact search timed again"
             + ("" if result.get("exact", [{}])[-1].get("same", True)
                else " (its neighbours DIFFER from the first run's: the gallery was not made the same)"),
             f"seconds: the fastest of {repeats} searches of all {queries} queries at once, cpu s its process "
             "CPU time (all threads); time / exact, cpu / exact: against the faster exact run; "
             f"recall@{K}: the share of the exact top {K} the IVF search returned, over all queries; "
             f"queries short of k: queries whose visited lists held fewer than {K} rows",
             "build s: train s (index.train: k-means on the sample) + add s (the index.add calls: "
             "assigning and storing every row; making the rows is not counted); index MB: the inverted "
             "lists (float32 vectors + int64 ids) + the centroids; build extra MB: the case's peak RSS "
             "from the start of the build (gallery freed) to its end: the training sample, then the "
             "index; peak RSS MB: the whole case's (the largest of: gallery + exact search, training "
             "sample, index + IVF searches, gallery made again + exact search)"]
    runs = [run["seconds"] for run in result.get("exact", [])]
    if len(runs) == 2 and abs(runs[0] - runs[1]) > 0.1 * max(runs):
        notes.append(f"the exact search took {runs[0]:.2f} and {runs[1]:.2f} s before and after: the "
                     "machine's load changed during the run; the time ratios are unreliable (cpu / exact "
                     "less so)")
    if at_target and "rows" in result:
        notes.append(f"target ({target}): " + (
            f"met at nprobe {', '.join(str(r['nprobe']) for r in met)}" if met else
            "MISSED at every nprobe measured"))
    bench_harness.report(args, "search", f"search: faiss IVF (nlist {nlist:,}) vs exact top-{K} ({args.device})",
                 text, notes)
    return [{"nprobe": row["nprobe"], "seconds": row["seconds"], "recall": row["recall"],
             "vs_exact": row["vs_exact"]} for row in result.get("rows", [])]
