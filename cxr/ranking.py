"""The ranking engine of the retrieval metrics (retrieval_metrics.py, multilabel_metrics.py):
every query's gallery ranked exactly, chunk by chunk, with the relevance of each item and the
sums AP, MAP@R and R-precision are made of.

How the ranking is computed (tests/test_metrics.py checks it against a slow,
obvious reference). Queries go in chunks, one float32 matrix multiply each, so memory
stays bounded. Each similarity row is packed into int64 sort keys

    key = (-similarity as an order-preserving int32) << 32 | index << 1 | rel

so ascending key order is exactly the ranking (descending similarity, then
ascending gallery index) and the keys of a row are all distinct: a plain,
unstable sort of the key values gives the ranking with the tie rule, and
bit 0 of the sorted keys is the relevance sequence, with no argsort and no
gather. The first keys give the top K; AP follows from one cumulative sum,
since the j-th relevant item at rank r contributes j / r. Gallery rows that
are exact duplicates are scored once and shared, so their similarities are
bit-identical and really tie whatever the matrix-multiply kernel does.
Gallery items of the query's own group get the largest high word (above
every finite similarity's) and relevance 0: they sort after every other item,
by index, and add nothing to AP; each query must keep at least max(K) others.

The per-row work (keys, sort, AP) is a dozen passes over memory plus a sort.
On CPU it runs on numpy views of the tensors, in cache-sized blocks spread
over threads: numpy's SIMD sort of int64 is 2-3x faster than torch.sort, and
torch's OpenMP elementwise kernels were measured up to 40x slower than one
thread on blocks of this size. On other devices the same code runs on torch
tensors, a whole chunk at a time.
"""
import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

if sys.byteorder != "little":  # _rank_rows writes the two int32 words of each key
    raise ImportError("ranking.py assumes a little-endian machine")

# Query chunks are chosen so that chunk x gallery stays near this many
# similarities (128 MiB of float32): a 10^5 gallery still gets ~330 rows per
# matrix multiply, enough for it to run near full speed.
_ELEMENTS_PER_CHUNK = 2**25
# On CPU each thread ranks blocks of about this many elements (~5 MiB of
# buffers), so the passes over them stay in cache.
_ELEMENTS_PER_BLOCK = 2**18
# Key of a leave-one-out query's own item: above every finite similarity's key
# so it ranks last, and even so its relevance bit is 0; K <= N - 1 keeps it out
# of every top K and, irrelevant and last, it adds nothing to AP.
_SELF_KEY = np.iinfo(np.int64).max - 1
# High word of a gallery item of the query's own group: above every finite
# similarity's (at most 0x7F7FFFFF), so those items rank after all others.
_EXCLUDED_HIGH = np.iinfo(np.int32).max
# AP terms j / r are summed as integers in units of 2**-32: an integer sum is
# exact whatever order the reduction runs in, so the result does not depend
# on chunk size, thread count or device.
AP_FIXED_POINT = 2.0**32


class _Job(NamedTuple):
    """What _rank_rows computes, as arrays of the backend it runs on."""
    k: int  # keys of the top k kept per query
    exclude_self: bool  # query i is gallery item i and is left out
    index_bits: object  # (G,) int32 gallery index << 1
    query_ids: object = None  # (Q,) label ids; with gallery_ids, adds relevance and AP
    gallery_ids: object = None  # (G,)
    ap_scale: object = None  # (G,) float32 2**32 / rank, ranks 1..G
    query_codes: object = None  # (Q,) int64 group codes; with gallery_codes, same-group items leave
    gallery_codes: object = None  # (G,)
    share: bool = False  # ids are bit sets of findings: relevant when they share a bit (else: equal)
    rank_index: object = None  # (G,) int64 ranks 0..G-1, for the MAP@R terms at ranks below R
    finding_bits: object = None  # (G,) int64 bit sets; with slot_findings, the AP of each finding
    slot_findings: object = None  # (Q, S) int64 the query's findings (NO_SLOT where it has fewer)
    tail: object = None  # (Q,) int64 gallery items that leave the query's ranking (rank last)


# slot_findings' value where a query has no more findings: bit 63 of a bit set is always 0.
NO_SLOT = 63


class Ranked(NamedTuple):
    """What rank_with_relevance returns, per query: (Q, k) int64 keys of the top k in ranking
    order (gallery index = (key & 0xFFFFFFFF) >> 1, relevance = key & 1), and (Q,) int64 the
    number R of relevant items, the relevant items in the top R, and the sums of j / r over
    the relevant items of the whole ranking (AP) and of the top R (MAP@R), in units of 2**-32."""
    top_keys: torch.Tensor
    n_relevant: torch.Tensor
    hits_at_r: torch.Tensor
    ap_sums: torch.Tensor
    map_at_r_sums: torch.Tensor
    slots: torch.Tensor | None = None  # (Q, S, 2): AP sum and R of each of the query's findings


def finding_slots(query_table):
    """(Q, S) int64: the findings of each query ((Q, F) bool), in order, NO_SLOT-padded."""
    counts = query_table.sum(1)
    width = max(int(counts.max()) if len(counts) else 0, 1)
    order = torch.argsort((~query_table).to(torch.int8), dim=1, stable=True)[:, :width]  # carried first
    carried = torch.arange(width, device=query_table.device)[None] < counts[:, None]
    return torch.where(carried, order, torch.full_like(order, NO_SLOT))


def rank_with_relevance(query, gallery, query_ids, gallery_ids, k, share=False, exclude_self=False,
                        query_codes=None, gallery_codes=None, chunk_size=None, finding_bits=None,
                        slot_findings=None, tail=None, rescore=None):
    """Rank the gallery for every query with the relevance of each item: ids equal (share=False)
    or, ids being int64 bit sets, sharing a bit (share=True); gallery items of the query's own
    group (codes, see metric_inputs.exclusion_codes) leave the ranking. With finding_bits
    (the gallery's bit sets), slot_findings (finding_slots) and tail (how many items leave each
    query's ranking), also the AP of each finding of the query, relevant = carrying it, from the
    same ranking. rescore: as rank_chunks'. Returns Ranked; the fixed-point sums divide by
    AP_FIXED_POINT."""
    top_keys, ap_sums, extra, slots = rank_chunks(
        query, gallery, k, chunk_size, exclude_self, query_ids, gallery_ids, query_codes=query_codes,
        gallery_codes=gallery_codes, share=share, finding_bits=finding_bits, slot_findings=slot_findings, tail=tail,
        rescore=rescore)
    return Ranked(top_keys, extra[:, 0], extra[:, 1], ap_sums, extra[:, 2], slots)


def rank_chunks(query, gallery, k, chunk_size, exclude_self, query_ids=None, gallery_ids=None, on_chunk=None,
                query_codes=None, gallery_codes=None, share=False, finding_bits=None, slot_findings=None, tail=None,
                rescore=None):
    """Rank the gallery for every query, chunk by chunk.

    Returns the keys of each query's top k, (Q, k) int64 in ranking order,
    and, when label ids are given, the AP sums (Q,) int64 (sum of j / r over
    relevant items, in units of 2**-32) and (Q, 3) int64: R, the relevant
    items in the top R, and the sum of j / r over the top R (MAP@R, same
    units), and with slot_findings (Q, S, 2) int64: the AP sum and R of
    each of the query's findings (rank_with_relevance), else None.
    on_chunk(start, sims, top_keys) sees each chunk's (c, G) similarities and
    (c, k) top keys. With group codes, gallery items of the query's group
    rank last, as irrelevant. rescore(start, sims), when given, overwrites each
    chunk's (c, G) similarities in place before they are ranked (the re-ranking
    of cxr/reranking.py).
    """
    n_queries, n_gallery, device = len(query), len(gallery), query.device
    with_ap = query_ids is not None
    top_keys = torch.empty(n_queries, k, dtype=torch.int64, device=device)
    ap_sums = torch.empty(n_queries, dtype=torch.int64, device=device) if with_ap else None
    extra = torch.empty(n_queries, 3, dtype=torch.int64, device=device) if with_ap else None
    with_slots = with_ap and slot_findings is not None
    slots = torch.zeros(n_queries, slot_findings.shape[1], 2, dtype=torch.int64, device=device) if with_slots else None
    job = _Job(k, exclude_self, torch.arange(n_gallery, dtype=torch.int32, device=device) << 1,
               query_codes=query_codes, gallery_codes=gallery_codes, share=share)
    if with_ap:
        ranks = torch.arange(1, n_gallery + 1, dtype=torch.float64, device=device)
        job = job._replace(query_ids=query_ids, gallery_ids=gallery_ids,
                           ap_scale=(AP_FIXED_POINT / ranks).float(),
                           rank_index=torch.arange(n_gallery, dtype=torch.int64, device=device))
    if with_slots:  # int32 bit sets where the findings fit (NIH 15, CheXpert 13): half the memory traffic
        narrow = finding_bits.numel() == 0 or int(finding_bits.max()) < 2**31
        bits_type = torch.int32 if narrow else torch.int64
        job = job._replace(finding_bits=finding_bits.to(bits_type), slot_findings=slot_findings.to(bits_type),
                           tail=tail)
    on_cpu = _on_cpu(device)
    if on_cpu:  # numpy views share the tensors' memory
        job = job._replace(**{name: value.numpy() for name, value in job._asdict().items()
                              if isinstance(value, torch.Tensor)})
        top_out = top_keys.numpy()
        ap_out = (ap_sums.numpy(), extra.numpy(), slots.numpy() if with_slots else None) if with_ap else None
    else:
        top_out, ap_out = top_keys, (ap_sums, extra, slots) if with_ap else None

    if chunk_size is None:
        chunk_size = _ELEMENTS_PER_CHUNK // n_gallery
    chunk_rows = max(1, min(chunk_size, n_queries))
    unique, inverse = _unique_rows(gallery)
    sims = torch.empty(chunk_rows, n_gallery, device=device)
    unique_sims = None if inverse is None else torch.empty(chunk_rows, len(unique), device=device)
    n_threads = torch.get_num_threads() if on_cpu else 1
    for start in range(0, n_queries, chunk_rows):
        c = min(chunk_rows, n_queries - start)
        if inverse is None:
            torch.matmul(query[start:start + c], gallery.T, out=sims[:c])
        else:
            torch.matmul(query[start:start + c], unique.T, out=unique_sims[:c])
            torch.index_select(unique_sims[:c], 1, inverse, out=sims[:c])
        if rescore is not None:
            rescore(start, sims[:c])
        chunk_sims = sims[:c].numpy() if on_cpu else sims[:c]
        # Contiguous row ranges, one per thread; each writes only its own rows.
        bounds = np.linspace(start, start + c, n_threads + 1).astype(int).tolist()

        def rank_range(a, b):
            rows = slice(a - start, b - start)
            _rank_rows(chunk_sims[rows], a, job, top_out[a:b],
                       None if ap_out is None else tuple(None if out is None else out[a:b] for out in ap_out))

        if n_threads > 1:
            list(_thread_pool(n_threads).map(rank_range, bounds[:-1], bounds[1:]))
        else:
            rank_range(start, start + c)
        if on_chunk is not None:
            on_chunk(start, sims[:c], top_keys[start:start + c])
    return top_keys, ap_sums, extra, slots


def _rank_rows(sims, first, job, top_out, ap_out):
    """Rank the gallery for queries first..first+len(sims)-1 (see rank_chunks).

    Written once for numpy arrays (CPU, run in blocks that stay in cache) and
    torch tensors (GPU, all rows at once), with in-place operators and the
    few calls in _NumpyOps / _TorchOps. With AP, sims is overwritten.
    """
    ops = _NUMPY_OPS if isinstance(sims, np.ndarray) else _TORCH_OPS
    n_rows, n_gallery = sims.shape
    block_rows = n_rows if ops is _TORCH_OPS else min(n_rows, _ELEMENTS_PER_BLOCK // n_gallery)
    block_rows = max(1, block_rows)
    with_ap = job.query_ids is not None
    with_groups = job.query_codes is not None
    keys = ops.empty((block_rows, n_gallery), ops.int64, sims)
    high = ops.empty((block_rows, n_gallery), ops.int32, sims)
    low = ops.empty((block_rows, n_gallery), ops.int32, sims)
    relevant = ops.empty((block_rows, n_gallery), ops.bool, sims) if with_ap else None
    same = ops.empty((block_rows, n_gallery), ops.bool, sims) if with_groups else None
    with_slots = with_ap and job.slot_findings is not None
    if with_slots:  # the gallery's bit sets in ranking order, and a copy of the rows with a k-th finding
        ranked = ops.empty((block_rows, n_gallery), job.finding_bits.dtype, sims)
        some = ops.empty((block_rows, n_gallery), job.finding_bits.dtype, sims)

    for b0 in range(0, n_rows, block_rows):
        n = min(block_rows, n_rows - b0)
        q0 = first + b0  # first query of the block
        key, h, lo, s = keys[:n], high[:n], low[:n], sims[b0:b0 + n]  # (n, G) each
        if with_ap:  # relevance first: the key buffer is scratch space until the keys are written
            if job.share:
                ops.bitand(job.query_ids[q0:q0 + n, None], job.gallery_ids[None, :], key)
                ops.nonzero(key, relevant[:n])
            else:
                ops.equal(job.query_ids[q0:q0 + n, None], job.gallery_ids[None, :], relevant[:n])
        # High words: -similarity as an int32 of the same order. Float32 is
        # sign-magnitude: m = |bits|, t = -1 where the sign bit is clear, and
        # (m ^ t) - t is -m there and m elsewhere; -0.0 and +0.0 both give 0.
        bits = s.view(ops.int32)
        h[...] = bits
        h &= 0x7FFFFFFF
        lo[...] = bits
        lo >>= 31
        lo ^= -1
        h ^= lo
        h -= lo
        if with_groups:  # the query's own group: above every finite similarity's word
            ops.equal(job.query_codes[q0:q0 + n, None], job.gallery_codes[None, :], same[:n])
            ops.fill_where(h, same[:n], _EXCLUDED_HIGH)
        words = key.view(ops.int32)  # (n, 2G): low word, high word of each key
        words[:, 1::2] = h
        # Low words: gallery index << 1 | relevance.
        if with_ap:
            if with_groups:  # relevant and not of the query's group
                ops.greater(relevant[:n], same[:n], relevant[:n])
            lo[...] = relevant[:n]
            lo |= job.index_bits
        else:
            lo[...] = job.index_bits
        words[:, 0::2] = lo
        if job.exclude_self:
            rows = ops.arange(n, sims)
            key[rows, q0 + rows] = _SELF_KEY

        if not with_ap:
            top_out[b0:b0 + n] = ops.smallest_sorted(key, job.k)
            continue
        ops.sort_rows_(key)
        top_out[b0:b0 + n] = key[:, :job.k]
        if with_slots:  # the gallery's findings in ranking order, for each finding's AP below
            lo[...] = words[:, 0::2]
            lo >>= 1
            ops.take(job.finding_bits, lo, ranked[:n])
        lo[...] = words[:, 0::2]
        lo &= 1  # relevance in ranking order
        ops.cumsum_rows(lo, h)  # relevant items up to each rank
        ap_sum, extra, slot_out = (None if out is None else out[b0:b0 + n] for out in ap_out)
        extra[:, 0] = h[:, -1]  # R
        extra[:, 1] = ops.take_column(h, ops.clip_below(extra[:, 0] - 1, 0))  # relevant in the top R
        extra[:, 1] *= extra[:, 0] > 0
        h *= lo  # j at the rank of the j-th relevant item, 0 elsewhere
        # j / r in units of 2**-32: float32 rounding is ~1e-7 relative, far
        # below the 1e-4 % the metrics are quoted to; truncation adds < 2**-32.
        s[...] = h
        s *= job.ap_scale
        key[...] = s
        ap_sum[...] = key.sum(1)
        # MAP@R (Musgrave et al., 2020): the same terms, only at ranks 1..R.
        ops.greater_equal(job.rank_index[None, :], extra[:, 0:1], relevant[:n])
        ops.fill_where(key, relevant[:n], 0)
        extra[:, 2] = key.sum(1)
        if with_slots:
            _finding_aps(ops, job, q0, ranked[:n], some, keys, high, low, sims[b0:b0 + n], relevant, slot_out)


def _finding_aps(ops, job, q0, ranked, some, key, h, lo, s, mask, out):
    """The AP sum and R of each of the rows' findings (job.slot_findings), relevant = carrying it,
    over the ranking already sorted: `ranked` holds the gallery's bit sets in ranking order; the
    last job.tail items of a row left its ranking. A query's k-th finding is scored on the rows
    that have one only (most films have one or two). Overwrites some, key, h, lo, s and mask."""
    n, n_gallery = ranked.shape
    for slot in range(job.slot_findings.shape[1]):
        finding = job.slot_findings[q0:q0 + n, slot]
        rows = ops.flatnonzero(finding != NO_SLOT)
        m = len(rows)
        if m == 0:
            continue
        source = ranked if m == n else ops.take_rows(ranked, rows, some[:m])
        shift, left = (finding, job.tail[q0:q0 + n]) if m == n else (finding[rows], job.tail[q0:q0 + n][rows])
        k, hh, ll, ss, mm = key[:m], h[:m], lo[:m], s[:m], mask[:m]
        ops.greater_equal(job.rank_index[None, :], n_gallery - left[:, None], mm)
        ops.right_shift(source, shift[:, None], some[:m])  # never in place on `ranked`: the next slot reads it
        ll[...] = some[:m]
        ll &= 1
        ops.fill_where(ll, mm, 0)
        ops.cumsum_rows(ll, hh)
        # R of each row, as an int64 copy (hh changes below)
        counts = hh[:, -1].astype(np.int64) if isinstance(hh, np.ndarray) else hh[:, -1].to(torch.int64)
        hh *= ll
        ss[...] = hh
        ss *= job.ap_scale
        k[...] = ss
        sums = k.sum(1)
        if m == n:
            out[:, slot, 1], out[:, slot, 0] = counts, sums
        else:
            out[rows, slot, 1], out[rows, slot, 0] = counts, sums


class _NumpyOps:
    int32, int64, bool = np.int32, np.int64, np.bool_

    @staticmethod
    def empty(shape, dtype, like):
        return np.empty(shape, dtype)

    @staticmethod
    def arange(n, like):
        return np.arange(n)

    @staticmethod
    def equal(a, b, out):
        np.equal(a, b, out=out)

    @staticmethod
    def greater(a, b, out):
        np.greater(a, b, out=out)

    @staticmethod
    def greater_equal(a, b, out):
        np.greater_equal(a, b, out=out)

    @staticmethod
    def bitand(a, b, out):
        np.bitwise_and(a, b, out=out)

    @staticmethod
    def nonzero(x, out):
        np.not_equal(x, 0, out=out)

    @staticmethod
    def take_column(x, index):  # x[i, index[i]] of each row
        return np.take_along_axis(x, index[:, None], axis=1)[:, 0]

    @staticmethod
    def clip_below(x, low):
        return np.maximum(x, low)

    @staticmethod
    def take(values, index, out):
        np.take(values, index, out=out)

    @staticmethod
    def take_rows(x, rows, out):
        return np.take(x, rows, axis=0, out=out)

    @staticmethod
    def flatnonzero(mask):
        return np.flatnonzero(mask)

    @staticmethod
    def right_shift(x, shift, out):
        np.right_shift(x, shift, out=out)

    @staticmethod
    def fill_where(x, mask, value):
        np.copyto(x, value, where=mask, casting="unsafe")

    @staticmethod
    def cumsum_rows(x, out):
        np.cumsum(x, axis=1, out=out)

    @staticmethod
    def sort_rows_(x):
        x.sort(axis=1)

    @staticmethod
    def smallest_sorted(x, k):  # the k smallest values of each row, ascending
        if k < x.shape[1]:
            x = np.partition(x, k - 1, axis=1)[:, :k]
        return np.sort(x, axis=1)


class _TorchOps:
    int32, int64, bool = torch.int32, torch.int64, torch.bool

    @staticmethod
    def empty(shape, dtype, like):
        return torch.empty(shape, dtype=dtype, device=like.device)

    @staticmethod
    def arange(n, like):
        return torch.arange(n, device=like.device)

    @staticmethod
    def equal(a, b, out):
        torch.eq(a, b, out=out)

    @staticmethod
    def greater(a, b, out):
        torch.gt(a, b, out=out)

    @staticmethod
    def greater_equal(a, b, out):
        torch.ge(a, b, out=out)

    @staticmethod
    def bitand(a, b, out):
        torch.bitwise_and(a, b, out=out)

    @staticmethod
    def nonzero(x, out):
        torch.ne(x, 0, out=out)

    @staticmethod
    def take_column(x, index):
        return x.gather(1, index[:, None].long())[:, 0]

    @staticmethod
    def clip_below(x, low):
        return x.clamp_min(low)

    @staticmethod
    def take(values, index, out):
        torch.take(values, index.long(), out=out)

    @staticmethod
    def take_rows(x, rows, out):
        return torch.index_select(x, 0, rows, out=out)

    @staticmethod
    def flatnonzero(mask):
        return torch.nonzero(mask)[:, 0]

    @staticmethod
    def right_shift(x, shift, out):
        torch.bitwise_right_shift(x, shift, out=out)

    @staticmethod
    def fill_where(x, mask, value):
        x.masked_fill_(mask, value)

    @staticmethod
    def cumsum_rows(x, out):
        torch.cumsum(x, dim=1, dtype=out.dtype, out=out)

    @staticmethod
    def sort_rows_(x):
        x.copy_(torch.sort(x, dim=1).values)

    @staticmethod
    def smallest_sorted(x, k):
        return torch.topk(x, k, dim=1, largest=False).values


_NUMPY_OPS, _TORCH_OPS = _NumpyOps(), _TorchOps()


def _on_cpu(device):
    """Whether to rank with numpy in threads (else torch ops on the device)."""
    return device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _thread_pool(n_threads):
    return ThreadPoolExecutor(n_threads, thread_name_prefix="metrics")


def _unique_rows(gallery):
    """(unique rows, (G,) index of each gallery row into them), or (gallery, None) without duplicates."""
    unique, inverse = torch.unique(gallery, dim=0, return_inverse=True)
    if len(unique) == len(gallery):
        return gallery, None
    return unique, inverse
