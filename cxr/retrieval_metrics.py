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

The ranking itself (exact, chunked, deterministic) is cxr/ranking.py's.
"""

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
from cxr.ranking import AP_FIXED_POINT, rank_chunks

__all__ = ["evaluate_retrieval", "rank_topk", "majority_vote"]

# majority_vote works on this many (query, class) counts at a time.
_VOTE_TABLE_ELEMENTS = 2**22


def evaluate_retrieval(query_emb, query_labels, gallery_emb=None, gallery_labels=None,
                       ks=(1, 5, 10), vote_ks=(1, 5, 10, 15, 20), num_classes=None,
                       chunk_size=None, query_groups=None, gallery_groups=None,
                       return_per_query=False, rerank=None):
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
        rerank: a reranking.Rerank: every number is of the re-ranked order
            (the same exclusions; None or method "none": the plain ranking).

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

    rescore = rerank.bind(query, gallery, query_codes, gallery_codes, leave_one_out) if rerank else None
    top_keys, ap_sums, extra, _ = rank_chunks(query, gallery, max_k, chunk_size, leave_one_out,
                                              query_ids, gallery_ids, query_codes=query_codes,
                                              gallery_codes=gallery_codes, rescore=rescore)
    top_relevant = (top_keys & 1).cumsum(1)  # (Q, max_k) relevant items within the top k
    top_ids = gallery_ids[(top_keys & 0xFFFFFFFF) >> 1]  # (Q, max_k) neighbour label ids
    at_k = torch.tensor([k - 1 for k in ks], dtype=torch.int64, device=device)
    hits_at_k = top_relevant[:, at_k].double()  # (Q, len(ks)) relevant items in the top K
    recall = 100.0 * (hits_at_k > 0).double().mean(0)
    precision = 100.0 * (hits_at_k / torch.tensor(ks, dtype=torch.float64, device=device)).mean(0)
    with_relevant = n_relevant > 0
    ap = ap_sums[with_relevant].double() / AP_FIXED_POINT / n_relevant[with_relevant]
    map_at_r = extra[with_relevant, 2].double() / AP_FIXED_POINT / n_relevant[with_relevant]
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

    rank_chunks(query, gallery, k, chunk_size, exclude_self, on_chunk=gather_scores)
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
