"""Retrieval metrics of multi-label films (NIH ChestX-ray14, CheXpert, MIMIC-CXR findings).

Each film has a set of findings, given as a (N, F) 0/1 table; "No Finding" is a finding of its
own, so two normal films are relevant to each other.

* Relevance: relevance="any" (the default, what the retrieval literature on these data sets
  measures): a gallery film is relevant when it shares at least one finding with the query;
  "exact": when it has the same set.
* R@K, mAP, mP@K, MAP@R and R-precision as in retrieval_metrics.py, with that relevance;
  queries without a relevant film are left out of every mean and counted.
* nDCG@K with graded gains: the Jaccard overlap |q & g| / |q | g| of the two sets, discounted by
  log2(rank + 1), over the ideal order of the query's own gallery (same-patient films and, in
  leave-one-out, the query left out).
* Per finding: the AP of the queries carrying it, a film being relevant when it carries it, with
  the number of those queries (its support).
* Multi-label kNN: the score of a finding for a query is the share of its top k neighbours
  carrying it; AUROC per finding over the queries (scikit-learn), and their mean over the
  findings that have both positive and negative queries.

Same-patient films leave the ranking as in retrieval_metrics.py (query_groups, gallery_groups).
The ranking pass is ranking.rank_with_relevance with the findings as int64 bit sets,
so it is exact, chunked and deterministic in the same way; tests/test_multilabel_metrics.py
checks every number against a slow reference.
"""
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cxr.metric_inputs import as_embeddings, as_gallery, check_chunk_size, check_ks, exclusion_codes, group_name
from cxr.ranking import AP_FIXED_POINT, finding_slots, rank_with_relevance

RELEVANCE = ("any", "exact")
MAX_FINDINGS = 62  # bits of an int64 bit set, less the sign bit
_NDCG_ROWS = 4096  # queries per chunk of the ideal-gain computation


def evaluate_multilabel(query_emb, query_findings, gallery_emb=None, gallery_findings=None, ks=(1, 5, 10),
                        knn_ks=(1, 5, 10, 15, 20), relevance="any", finding_names=None, query_groups=None,
                        gallery_groups=None, per_finding=True, chunk_size=None, return_per_query=False,
                        rerank=None):
    """The metrics above, percentages 0-100 (AUROC too). findings: (Q, F) and (G, F) 0/1 tables
    over the same F findings (named by finding_names); no gallery: leave-one-out. rerank: a
    reranking.Rerank, every number then of the re-ranked order.

    Returns {"relevance", "recall_at_k", "map", "precision_at_k", "map_at_r", "r_precision",
    "ndcg_at_k", "queries_without_relevant", "per_finding": {name: {"ap", "queries"}},
    "knn": {k: {"auroc": {name: value or None}, "auroc_mean"}}}; with return_per_query also
    (Q,) arrays "ap", "map_at_r", "r_precision", "n_relevant", "ndcg" {k}, (Q, len(ks)) "hits",
    (Q, max k) "top_indices", (Q,) bool "scored" (has a relevant film: the queries every mean is
    over) and "ks" (the keys report_stats.bootstrap reads).
    """
    if relevance not in RELEVANCE:
        raise ValueError(f"unknown relevance '{relevance}'; choose one of {', '.join(RELEVANCE)}")
    query = as_embeddings(query_emb, "query_emb")
    device = query.device
    leave_one_out = gallery_emb is None and gallery_findings is None
    if not leave_one_out and (gallery_emb is None or gallery_findings is None):
        raise ValueError("give both gallery_emb and gallery_findings, or neither for leave-one-out")
    gallery = query if leave_one_out else as_gallery(gallery_emb, query)
    query_table = as_finding_table(query_findings, "query_findings", len(query), device)
    gallery_table = query_table if leave_one_out else as_finding_table(gallery_findings, "gallery_findings",
                                                                       len(gallery), device)
    if query_table.shape[1] != gallery_table.shape[1]:
        raise ValueError(f"query and gallery findings have {query_table.shape[1]} and {gallery_table.shape[1]} "
                         "columns; give both over the same findings")
    names = list(finding_names) if finding_names is not None else [str(i) for i in range(query_table.shape[1])]
    ks = check_ks(ks, "ks", len(gallery), leave_one_out)
    knn_ks = check_ks(knn_ks, "knn_ks", len(gallery), leave_one_out)
    check_chunk_size(chunk_size)
    query_codes, gallery_codes = exclusion_codes(query_groups, gallery_groups, len(query), len(gallery),
                                              leave_one_out, device)
    max_k = max(ks + knn_ks)
    # The films that leave each query's ranking (own patient; itself in leave-one-out): their count
    # is the ranking's tail, and nDCG's ideal order leaves them out.
    pairs = same_group_pairs(query_codes, gallery_codes, len(query), leave_one_out, device)
    tail = torch.bincount(pairs[0], minlength=len(query))
    worst = int(tail.argmax()) if len(tail) else 0
    if len(tail) and max_k > len(gallery) - int(tail[worst]):
        raise ValueError(f"query {worst} (group {group_name(query_groups, worst)!r}) has only "
                         f"{len(gallery) - int(tail[worst])} gallery films outside its own group, fewer than the "
                         f"{max_k} neighbours asked for; use smaller k or a larger gallery")

    query_bits, gallery_bits = bit_sets(query_table), bit_sets(gallery_table)
    slots = finding_slots(query_table) if per_finding else None
    ranked = rank_with_relevance(query, gallery, query_bits, gallery_bits, max_k, share=relevance == "any",
                                 exclude_self=leave_one_out, query_codes=query_codes,
                                 gallery_codes=gallery_codes, chunk_size=chunk_size, finding_bits=gallery_bits,
                                 slot_findings=slots, tail=tail,
                                 rescore=rerank.bind(query, gallery, query_codes, gallery_codes, leave_one_out)
                                 if rerank else None)
    with_relevant = ranked.n_relevant > 0
    if not bool(with_relevant.any()):
        raise ValueError("no query has a relevant gallery film (a shared finding); check that queries and "
                         "gallery share findings")
    top_relevant = (ranked.top_keys & 1).cumsum(1)
    top_indices = (ranked.top_keys & 0xFFFFFFFF) >> 1
    at_k = torch.tensor([k - 1 for k in ks], device=device)
    hits = top_relevant[:, at_k][with_relevant].double()  # (Q', len(ks))
    n_relevant = ranked.n_relevant[with_relevant].double()
    ap = ranked.ap_sums[with_relevant].double() / AP_FIXED_POINT / n_relevant
    map_at_r = ranked.map_at_r_sums[with_relevant].double() / AP_FIXED_POINT / n_relevant
    r_precision = ranked.hits_at_r[with_relevant].double() / n_relevant
    ndcg = ndcg_at_k(query_table, gallery_table, top_indices, ks, pairs)
    without = (~with_relevant).cpu().numpy()
    for values in ndcg.values():  # the same queries as every other mean
        values[without] = np.nan
    result = {
        "relevance": relevance,
        "recall_at_k": {str(k): 100.0 * float((hits[:, i] > 0).double().mean()) for i, k in enumerate(ks)},
        "map": 100.0 * float(ap.mean()),
        "precision_at_k": {str(k): 100.0 * float((hits[:, i] / k).mean()) for i, k in enumerate(ks)},
        "map_at_r": 100.0 * float(map_at_r.mean()),
        "r_precision": 100.0 * float(r_precision.mean()),
        "ndcg_at_k": {str(k): 100.0 * float(np.nanmean(ndcg[k])) for k in ks},
        "queries_without_relevant": int((~with_relevant).sum()),
        "knn": knn_auroc(query_table, gallery_table, top_indices, knn_ks, names),
    }
    if per_finding:
        result["per_finding"] = per_finding_ap(slots, ranked.slots, names)
    if not return_per_query:
        return result

    def full(values):
        out = torch.full((len(query),), float("nan"), dtype=torch.float64, device=device)
        out[with_relevant] = values
        return out.cpu().numpy()

    per_query = {"ap": full(ap), "map_at_r": full(map_at_r), "r_precision": full(r_precision),
                 "n_relevant": ranked.n_relevant.cpu().numpy(), "ndcg": ndcg,
                 "hits": top_relevant[:, at_k].cpu().numpy(), "top_indices": top_indices.cpu().numpy(),
                 "scored": with_relevant.cpu().numpy(), "ks": ks}
    return result, per_query


def as_finding_table(table, name, n, device):
    """(n, F) bool on `device` from a 0/1 table of any integer, bool or float type."""
    table = torch.as_tensor(np.asarray(table) if not isinstance(table, torch.Tensor) else table)
    if table.dim() != 2 or len(table) != n:
        raise ValueError(f"{name} must be (N, F) = ({n}, findings), got shape {tuple(table.shape)}")
    if table.shape[1] > MAX_FINDINGS:
        raise ValueError(f"{name} has {table.shape[1]} findings; at most {MAX_FINDINGS} are supported")
    if not bool(((table == 0) | (table == 1)).all()):
        raise ValueError(f"{name} must hold 0/1 values (whether each film carries each finding)")
    return table.bool().to(device)


def bit_sets(table):
    """(N,) int64: bit f set when the film carries finding f."""
    weights = torch.tensor([1 << f for f in range(table.shape[1])], dtype=torch.int64, device=table.device)
    return (table.long() * weights).sum(1)


def same_group_pairs(query_codes, gallery_codes, n_query, leave_one_out, device):
    """(query index, gallery index) of every gallery film that leaves a query's ranking: of its
    own group, and in leave-one-out the query itself; sorted by query."""
    if query_codes is None:
        if not leave_one_out:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty
        own = torch.arange(n_query, device=device)
        return own, own
    order = torch.argsort(gallery_codes, stable=True)
    ordered = gallery_codes[order]
    start = torch.searchsorted(ordered, query_codes)
    counts = torch.searchsorted(ordered, query_codes, right=True) - start
    queries = torch.repeat_interleave(torch.arange(n_query, device=device), counts)
    offsets = torch.arange(len(queries), device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                counts)
    return queries, order[torch.repeat_interleave(start, counts) + offsets]


def ndcg_at_k(query_table, gallery_table, top_indices, ks, pairs):
    """{k: (Q,) nDCG@k as a fraction, NaN where no gallery film shares a finding}; gains are the
    Jaccard overlaps, the ideal order is over the gallery films each query ranks (all but the
    (query, gallery film) `pairs` of same_group_pairs)."""
    device = query_table.device
    max_k = max(ks)
    discounts = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64, device=device))
    query_float, gallery_float = query_table.double(), gallery_table.double()
    top = top_indices[:, :max_k]
    inter = (query_float[:, None, :] * gallery_float[top]).sum(2)  # (Q, k)
    union = query_float.sum(1, keepdim=True) + gallery_float[top].sum(2) - inter
    gains = torch.where(union > 0, inter / union.clamp_min(1), 0.0)
    dcg = (gains * discounts).cumsum(1)
    # The ideal: the gallery's distinct finding sets with their counts, less the films that leave
    # each query's ranking; the best gains first, each as many times as films hold it.
    combos, combo_of, combo_counts = torch.unique(bit_sets(gallery_table), return_inverse=True, return_counts=True)
    first = torch.zeros(len(combos), dtype=torch.int64, device=device).scatter_(
        0, combo_of, torch.arange(len(combo_of), device=device))
    combo_table = gallery_float[first]  # (U, F)
    pair_queries, pair_gallery = pairs
    ideal = torch.empty(len(query_table), max_k, dtype=torch.float64, device=device)
    positions = torch.arange(1, max_k + 1, device=device)
    for start in range(0, len(query_table), _NDCG_ROWS):
        stop = min(start + _NDCG_ROWS, len(query_table))
        q = query_float[start:stop]
        inter_u = q @ combo_table.T
        union_u = q.sum(1, keepdim=True) + combo_table.sum(1)[None] - inter_u
        gain_u = torch.where(union_u > 0, inter_u / union_u.clamp_min(1), 0.0)  # (c, U)
        available = combo_counts[None].repeat(stop - start, 1)
        lo, hi = torch.searchsorted(pair_queries, torch.tensor([start, stop], device=device)).tolist()
        available.index_put_((pair_queries[lo:hi] - start, combo_of[pair_gallery[lo:hi]]),
                             torch.full((hi - lo,), -1, dtype=torch.int64, device=device), accumulate=True)
        gain_u, order = gain_u.sort(dim=1, descending=True, stable=True)
        filled = available.gather(1, order).cumsum(1)  # films holding the best u gains
        slot = torch.searchsorted(filled, positions[None].expand(stop - start, -1).contiguous())
        ideal[start:stop] = torch.where(slot < gain_u.shape[1], gain_u.gather(1, slot.clamp(max=gain_u.shape[1] - 1)),
                                        0.0)
    idcg = (ideal * discounts).cumsum(1)
    out = {}
    for k in ks:
        best = idcg[:, k - 1]
        out[k] = torch.where(best > 0, dcg[:, k - 1] / best.clamp_min(1e-300), float("nan")).cpu().numpy()
    return out


def per_finding_ap(slots, slot_sums, names):
    """{finding: {"ap": % or None, "queries": int}}: the mean AP of the queries carrying the finding,
    relevant = carrying it, from the AP sums of each query's findings (ranking.rank_with_relevance);
    queries whose ranking holds no other carrier are left out."""
    ap_sum, n_relevant = slot_sums[..., 0], slot_sums[..., 1]
    out = {}
    for f, name in enumerate(names):
        scored = (slots == f) & (n_relevant > 0)
        ap = ap_sum[scored].double() / AP_FIXED_POINT / n_relevant[scored]
        out[name] = {"ap": 100.0 * float(ap.mean()) if len(ap) else None, "queries": int(scored.sum())}
    return out


def knn_auroc(query_table, gallery_table, top_indices, knn_ks, names):
    """{k: {"auroc": {finding: % or None}, "auroc_mean": % or None}} of the neighbour-share scores."""
    truth = query_table.cpu().numpy()
    gallery_float = gallery_table.float()
    counts, carried = {}, torch.zeros(query_table.shape, dtype=torch.float32, device=query_table.device)
    for j in range(max(knn_ks)):  # a loop over ranks, not queries: neighbours carrying each finding
        carried += gallery_float[top_indices[:, j]]
        if j + 1 in knn_ks:
            counts[j + 1] = carried.clone()
    out = {}
    for k in knn_ks:
        scores = (counts[k] / k).cpu().numpy()
        auroc = {}
        for f, name in enumerate(names):
            column = truth[:, f]
            auroc[name] = 100.0 * float(roc_auc_score(column, scores[:, f])) if 0 < column.sum() < len(column) \
                else None
        defined = [value for value in auroc.values() if value is not None]
        out[str(k)] = {"auroc": auroc, "auroc_mean": float(np.mean(defined)) if defined else None}
    return out
