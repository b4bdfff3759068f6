"""Retrieval and k-NN classification metrics for chest X-ray embeddings.

Definitions (DESIGN.md section 5):

* Similarity is the dot product of the embeddings. Inputs are expected to be
  L2-normalised already (then it is the cosine similarity); nothing here
  normalises them. Similarities are computed in float32 (bf16/fp16/fp64
  inputs are converted).
* Protocols: leave-one-out (no gallery given: every query is ranked against
  all the other queries, never against itself) and query-gallery.
* Groups (patients): with query_groups (and gallery_groups for
  query-gallery), gallery items of the query's own group are left out of its
  ranking exactly as the query itself is in leave-one-out: they are neither
  retrieved nor counted as relevant. Several films of one patient are near
  copies, and finding them inflates R@K and mAP.
* A gallery item is relevant to a query when their labels are equal.
* Ties in similarity rank by gallery index (lower index first), as a stable
  sort would, so every number is deterministic.
* R@K: percentage of queries with at least one relevant item in their top K.
* AP of one query: (1/R) * sum_k P(k) * rel(k) over the whole ranking, R the
  number of relevant gallery items; queries with R = 0 are left out of mAP.
* mP@K: mean over queries of (relevant items in the top K) / K.
* R-precision and MAP@R (Musgrave et al., 2020, "A Metric Learning Reality
  Check"), R the query's number of relevant items: R-precision is the share
  of relevant items in its top R; MAP@R = (1/R) * sum over ranks k <= R of
  P(k) * rel(k). Means over the queries with R > 0, as mAP.
* Majority vote at k: the most frequent label among the top k, a tie going
  to the tied label that appears first in the ranking; scored with
  scikit-learn's accuracy, macro and support-weighted precision / recall / F1
  (zero_division=0) and the confusion matrix (rows true, columns predicted).
  Macro averages count only the classes present among the queries (a class
  without queries has no recall to average); the confusion matrix has them all.
* All percentages are 0-100.

How it is computed (tests/test_metrics.py checks it against a slow, obvious
reference). Queries go in chunks, one float32 matrix multiply each, so memory
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
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from cxr.metric_inputs import (
    as_embeddings,
    as_gallery,
    as_labels,
    check_chunk_size,
    check_ks,
    exclusion_codes,
    group_name,
)

__all__ = ["evaluate_retrieval", "rank_topk", "majority_vote"]

if sys.byteorder != "little":  # _rank_rows writes the two int32 words of each key
    raise ImportError("retrieval_metrics.py assumes a little-endian machine")

# Query chunks are chosen so that chunk x gallery stays near this many
# similarities (128 MiB of float32): a 10^5 gallery still gets ~330 rows per
# matrix multiply, enough for it to run near full speed.
_ELEMENTS_PER_CHUNK = 2**25
# On CPU each thread ranks blocks of about this many elements (~5 MiB of
# buffers), so the passes over them stay in cache.
_ELEMENTS_PER_BLOCK = 2**18
# majority_vote works on this many (query, class) counts at a time.
_VOTE_TABLE_ELEMENTS = 2**22
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
_AP_FIXED_POINT = 2.0**32


def evaluate_retrieval(query_emb, query_labels, gallery_emb=None, gallery_labels=None,
                       ks=(1, 5, 10), vote_ks=(1, 5, 10, 15, 20), num_classes=None,
                       chunk_size=None, query_groups=None, gallery_groups=None,
                       return_per_query=False):
    """Retrieval (R@K, mAP, mP@K) and majority-vote classification metrics.

    Args:
        query_emb: (Q, D) float tensor or array, L2-normalised.
        query_labels: (Q,) integer labels.
        gallery_emb, gallery_labels: (G, D) and (G,), or both None for
            leave-one-out over the queries.
        ks: K values for R@K and mP@K.
        vote_ks: k values for the majority-vote classification.
        num_classes: labels are then 0..num_classes-1 and the classification
            numbers are over all of them; default: the sorted unique values of
            query and gallery labels together.
        chunk_size: queries per matrix multiply; default from a memory budget.
        query_groups: (Q,) group (patient) ids of any hashable type, or None.
            Gallery items of a query's own group are left out of its ranking.
            For leave-one-out they are the gallery's groups too.
        gallery_groups: (G,) group ids for query-gallery (with query_groups).
        return_per_query: also return the per-query values (see below).

    Computation runs on the device of query_emb (CPU for numpy input).

    Returns:
        {"recall_at_k": {"K": %}, "map": %, "precision_at_k": {"K": %},
         "map_at_r": %, "r_precision": %, "queries_without_relevant": int,
         "classification": {"k": {"accuracy", "precision_macro",
         "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
         "f1_weighted": %, "confusion_matrix": [[int]]}}}, keys are str(k),
        all values plain Python numbers. With return_per_query, a pair
        (that dict, per-query numpy arrays): "hits" (Q, len(ks)) relevant items
        in the top K; "ap" (Q,) AP as a fraction, NaN where the query has no
        relevant item; "n_relevant" (Q,); "y_true" (Q,) labels; "votes" and
        "vote_share" {k: (Q,)}: majority-vote label and the share of the top k
        that voted for it; "top_indices" (Q, max k) gallery indices in
        ranking order; "classes" (C,) the label values; "ks", "vote_ks".
    """
    query = as_embeddings(query_emb, "query_emb")
    device = query.device
    query_labels = as_labels(query_labels, "query_labels", len(query), device)
    leave_one_out = gallery_emb is None and gallery_labels is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    elif gallery_emb is None or gallery_labels is None:
        raise ValueError("give both gallery_emb and gallery_labels, or neither for leave-one-out")
    else:
        gallery = as_gallery(gallery_emb, query)
        gallery_labels = as_labels(gallery_labels, "gallery_labels", len(gallery), device)
    ks = check_ks(ks, "ks", len(gallery), leave_one_out)
    vote_ks = check_ks(vote_ks, "vote_ks", len(gallery), leave_one_out)
    check_chunk_size(chunk_size)
    query_codes, gallery_codes = exclusion_codes(query_groups, gallery_groups, len(query), len(gallery),
                                              leave_one_out, device)

    classes = _classes(query_labels, gallery_labels, num_classes)
    query_ids = torch.searchsorted(classes, query_labels)  # (Q,) labels as 0..C-1
    gallery_ids = torch.searchsorted(classes, gallery_labels)  # (G,)
    n_relevant = torch.bincount(gallery_ids, minlength=len(classes))[query_ids] - int(leave_one_out)
    max_k = max(ks + vote_ks, default=0)
    if query_codes is not None:
        # Items of the query's own group leave the ranking: the relevant ones among them no
        # longer count in R, and each query must keep at least max_k items to rank.
        n_classes = len(classes)
        same_group_relevant = _count_matches(gallery_codes * n_classes + gallery_ids,
                                             query_codes * n_classes + query_ids)
        same_group = _count_matches(gallery_codes, query_codes)
        if leave_one_out:  # the query itself is already left out above
            same_group_relevant, same_group = same_group_relevant - 1, same_group - 1
        n_relevant = n_relevant - same_group_relevant
        available = len(gallery) - int(leave_one_out) - same_group  # (Q,)
        worst = int(available.argmin())
        if max_k > int(available[worst]):
            raise ValueError(f"query {worst} (group {group_name(query_groups, worst)!r}) has only "
                             f"{int(available[worst])} gallery items outside its own group, fewer "
                             f"than the {max_k} neighbours asked for; use smaller k, a larger "
                             "gallery, or keep same-group items in the ranking")
    if not bool((n_relevant > 0).any()):
        raise ValueError("no query has a relevant gallery item (same label), so mAP is undefined; "
                         "check that queries and gallery share labels")

    top_keys, ap_sums, extra = _rank(query, gallery, max_k, chunk_size, leave_one_out,
                                     query_ids, gallery_ids, query_codes=query_codes, gallery_codes=gallery_codes)
    top_relevant = (top_keys & 1).cumsum(1)  # (Q, max_k) relevant items within the top k
    top_ids = gallery_ids[(top_keys & 0xFFFFFFFF) >> 1]  # (Q, max_k) neighbour label ids
    at_k = torch.tensor([k - 1 for k in ks], dtype=torch.int64, device=device)
    hits_at_k = top_relevant[:, at_k].double()  # (Q, len(ks)) relevant items in the top K
    recall = 100.0 * (hits_at_k > 0).double().mean(0)
    precision = 100.0 * (hits_at_k / torch.tensor(ks, dtype=torch.float64, device=device)).mean(0)
    with_relevant = n_relevant > 0
    ap = ap_sums[with_relevant].double() / _AP_FIXED_POINT / n_relevant[with_relevant]
    map_at_r = extra[with_relevant, 2].double() / _AP_FIXED_POINT / n_relevant[with_relevant]
    r_precision = extra[with_relevant, 1].double() / n_relevant[with_relevant]

    classes_cpu = classes.cpu().numpy()
    y_true = query_labels.cpu().numpy()
    classification, votes, vote_share = {}, {}, {}
    for k in vote_ks:
        vote_ids = majority_vote(top_ids[:, :k], len(classes))  # (Q,)
        y_pred = classes_cpu[vote_ids.cpu().numpy()]
        classification[str(k)] = _classification_scores(y_true, y_pred, classes_cpu.tolist())
        votes[k] = y_pred
        vote_share[k] = ((top_ids[:, :k] == vote_ids[:, None]).sum(1).double() / k).cpu().numpy()
    result = {
        "recall_at_k": {str(k): float(v) for k, v in zip(ks, recall.tolist())},
        "map": 100.0 * float(ap.mean()),
        "precision_at_k": {str(k): float(v) for k, v in zip(ks, precision.tolist())},
        "map_at_r": 100.0 * float(map_at_r.mean()),
        "r_precision": 100.0 * float(r_precision.mean()),
        "queries_without_relevant": int((~with_relevant).sum()),
        "classification": classification,
    }
    if not return_per_query:
        return result

    def per_query_values(values):  # NaN where the query has no relevant item
        full = torch.full((len(query),), float("nan"), dtype=torch.float64, device=device)
        full[with_relevant] = values
        return full.cpu().numpy()

    per_query = {"hits": hits_at_k.long().cpu().numpy(), "ap": per_query_values(ap),
                 "map_at_r": per_query_values(map_at_r), "r_precision": per_query_values(r_precision),
                 "n_relevant": n_relevant.cpu().numpy(), "y_true": y_true, "votes": votes,
                 "vote_share": vote_share, "top_indices": ((top_keys & 0xFFFFFFFF) >> 1).cpu().numpy(),
                 "classes": classes_cpu, "ks": ks, "vote_ks": vote_ks}
    return result, per_query


def rank_topk(query_emb, gallery_emb, k, exclude_self=False, chunk_size=None):
    """Top-k gallery items of each query by dot-product similarity.

    Ties rank by gallery index (lower first), as in evaluate_retrieval. With
    exclude_self, query i is gallery item i (same set) and is left out of its
    own ranking. Runs on the device of query_emb.

    Returns:
        scores (Q, k) float32, descending per row, and indices (Q, k) int64.
    """
    query = as_embeddings(query_emb, "query_emb")
    gallery = as_gallery(gallery_emb, query)
    if exclude_self and len(query) != len(gallery):
        raise ValueError(f"exclude_self needs the queries to be the gallery, but there are "
                         f"{len(query)} queries and {len(gallery)} gallery items")
    (k,) = check_ks((k,), "k", len(gallery), exclude_self)
    check_chunk_size(chunk_size)

    scores = torch.empty(len(query), k, device=query.device)
    indices = torch.empty(len(query), k, dtype=torch.int64, device=query.device)

    def gather_scores(start, sims, top_keys):  # (c, G) similarities, (c, k) keys of the chunk
        chunk = slice(start, start + len(sims))
        indices[chunk] = (top_keys & 0xFFFFFFFF) >> 1
        scores[chunk] = sims.gather(1, indices[chunk])

    _rank(query, gallery, k, chunk_size, exclude_self, on_chunk=gather_scores)
    return scores, indices


def majority_vote(neighbour_labels, num_classes):
    """Most frequent label in each row of (Q, k) neighbour labels (0..num_classes-1).

    A tie goes to the tied label that appears first in the row (the better
    ranked neighbour). Returns a (Q,) int64 tensor on the input's device.
    """
    labels = torch.as_tensor(neighbour_labels)
    if labels.dim() != 2 or labels.shape[1] == 0:
        raise ValueError(f"neighbour_labels must be (Q, k) with k >= 1, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"neighbour_labels must be integers, got {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"neighbour_labels must lie in 0..{num_classes - 1} (num_classes={num_classes})")
    rows = max(1, _VOTE_TABLE_ELEMENTS // num_classes)
    chunks = [labels[i:i + rows] for i in range(0, len(labels), rows)] or [labels]
    return torch.cat([_vote(chunk, num_classes) for chunk in chunks])


def _vote(labels, num_classes):
    n_rows, k = labels.shape
    counts = torch.zeros(n_rows, num_classes, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))  # (Q, C) votes per label
    positions = torch.arange(k, device=labels.device).expand(n_rows, k)
    first = torch.full((n_rows, num_classes), k, dtype=torch.int64, device=labels.device)
    first.scatter_reduce_(1, labels, positions, reduce="amin")  # (Q, C) first rank of each label
    # More votes win; among equal counts the earlier first appearance wins.
    # Present labels have distinct first ranks, so the maximum is unique.
    return (counts * (k + 1) - first).argmax(1)


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


def rank_with_relevance(query, gallery, query_ids, gallery_ids, k, share=False, exclude_self=False,
                        query_codes=None, gallery_codes=None, chunk_size=None):
    """Rank the gallery for every query with the relevance of each item: ids equal (share=False)
    or, ids being int64 bit sets, sharing a bit (share=True); gallery items of the query's own
    group (codes, see metric_inputs.exclusion_codes) leave the ranking. Returns Ranked; the
    fixed-point sums divide by AP_FIXED_POINT."""
    top_keys, ap_sums, extra = _rank(query, gallery, k, chunk_size, exclude_self, query_ids, gallery_ids,
                                     query_codes=query_codes, gallery_codes=gallery_codes, share=share)
    return Ranked(top_keys, extra[:, 0], extra[:, 1], ap_sums, extra[:, 2])


AP_FIXED_POINT = _AP_FIXED_POINT


def _rank(query, gallery, k, chunk_size, exclude_self, query_ids=None, gallery_ids=None, on_chunk=None,
          query_codes=None, gallery_codes=None, share=False):
    """Rank the gallery for every query, chunk by chunk.

    Returns the keys of each query's top k, (Q, k) int64 in ranking order,
    and, when label ids are given, the AP sums (Q,) int64 (sum of j / r over
    relevant items, in units of 2**-32) and (Q, 3) int64: R, the relevant
    items in the top R, and the sum of j / r over the top R (MAP@R, same
    units). on_chunk(start, sims, top_keys) sees each chunk's (c, G)
    similarities and (c, k) top keys. With group codes, gallery items of the
    query's group rank last, as irrelevant.
    """
    n_queries, n_gallery, device = len(query), len(gallery), query.device
    with_ap = query_ids is not None
    top_keys = torch.empty(n_queries, k, dtype=torch.int64, device=device)
    ap_sums = torch.empty(n_queries, dtype=torch.int64, device=device) if with_ap else None
    extra = torch.empty(n_queries, 3, dtype=torch.int64, device=device) if with_ap else None
    job = _Job(k, exclude_self, torch.arange(n_gallery, dtype=torch.int32, device=device) << 1,
               query_codes=query_codes, gallery_codes=gallery_codes, share=share)
    if with_ap:
        ranks = torch.arange(1, n_gallery + 1, dtype=torch.float64, device=device)
        job = job._replace(query_ids=query_ids, gallery_ids=gallery_ids,
                           ap_scale=(_AP_FIXED_POINT / ranks).float(),
                           rank_index=torch.arange(n_gallery, dtype=torch.int64, device=device))
    on_cpu = _on_cpu(device)
    if on_cpu:  # numpy views share the tensors' memory
        job = job._replace(**{name: value.numpy() for name, value in job._asdict().items()
                              if isinstance(value, torch.Tensor)})
        top_out, ap_out = top_keys.numpy(), (ap_sums.numpy(), extra.numpy()) if with_ap else None
    else:
        top_out, ap_out = top_keys, (ap_sums, extra) if with_ap else None

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
        chunk_sims = sims[:c].numpy() if on_cpu else sims[:c]
        # Contiguous row ranges, one per thread; each writes only its own rows.
        bounds = np.linspace(start, start + c, n_threads + 1).astype(int).tolist()

        def rank_range(a, b):
            rows = slice(a - start, b - start)
            _rank_rows(chunk_sims[rows], a, job, top_out[a:b],
                       None if ap_out is None else (ap_out[0][a:b], ap_out[1][a:b]))

        if n_threads > 1:
            list(_thread_pool(n_threads).map(rank_range, bounds[:-1], bounds[1:]))
        else:
            rank_range(start, start + c)
        if on_chunk is not None:
            on_chunk(start, sims[:c], top_keys[start:start + c])
    return top_keys, ap_sums, extra


def _rank_rows(sims, first, job, top_out, ap_out):
    """Rank the gallery for queries first..first+len(sims)-1 (see _rank).

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
        lo[...] = words[:, 0::2]
        lo &= 1  # relevance in ranking order
        ops.cumsum_rows(lo, h)  # relevant items up to each rank
        ap_sum, extra = ap_out[0][b0:b0 + n], ap_out[1][b0:b0 + n]
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


def _count_matches(pool, values):
    """(Q,) for each value, how many entries of pool (G,) equal it."""
    unique, counts = torch.unique(pool, return_counts=True)
    position = torch.searchsorted(unique, values).clamp(max=len(unique) - 1)
    return torch.where(unique[position] == values, counts[position], torch.zeros_like(values))


def _classes(query_labels, gallery_labels, num_classes):
    """Sorted label values the classification is reported over."""
    both = torch.cat([query_labels, gallery_labels])
    if num_classes is None:
        return torch.unique(both)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    if int(both.min()) < 0 or int(both.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1} when num_classes={num_classes}; "
                         f"found {int(both.min())}..{int(both.max())}")
    return torch.arange(num_classes, device=query_labels.device)


def _classification_scores(y_true, y_pred, labels):
    # Standard classification metrics come from scikit-learn, the reference
    # everyone compares against; only the retrieval part is written here.
    # Averages run over the classes that have queries: a class absent from the
    # evaluated set would add a 0 (zero_division) to every macro average.
    present = [label for label in labels if label in set(np.unique(y_true).tolist())]
    scores = {"accuracy": 100.0 * accuracy_score(y_true, y_pred)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present,
                                                     average=average, zero_division=0)
        scores.update({f"precision_{average}": 100.0 * float(p),
                       f"recall_{average}": 100.0 * float(r),
                       f"f1_{average}": 100.0 * float(f)})
    scores["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return scores
