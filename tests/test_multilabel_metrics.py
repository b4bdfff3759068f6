"""multilabel_metrics.evaluate_multilabel against a slow, obvious reference written here."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr.multilabel_metrics import bit_sets, evaluate_multilabel

KS, KNN_KS = (1, 3, 5), (1, 5)


def reference(query, q_table, gallery=None, g_table=None, q_groups=None, g_groups=None, relevance="any",
              ks=KS, knn_ks=KNN_KS):
    loo = gallery is None
    gallery, g_table = (query, q_table) if loo else (gallery, g_table)
    g_groups = q_groups if loo else g_groups
    sims = np.asarray(query, np.float64) @ np.asarray(gallery, np.float64).T
    rows = []
    for i in range(len(query)):
        order = [j for j in np.argsort(-sims[i], kind="stable")
                 if not (loo and j == i) and not (q_groups is not None and g_groups[j] == q_groups[i])]
        rows.append(order)

    def relevant(qi, j):
        q, g = set(np.flatnonzero(q_table[qi])), set(np.flatnonzero(g_table[j]))
        return bool(q & g) if relevance == "any" else q == g

    def jaccard(qi, j):
        q, g = set(np.flatnonzero(q_table[qi])), set(np.flatnonzero(g_table[j]))
        return len(q & g) / len(q | g) if q | g else 0.0

    aps, mapr, rprec, hits, ndcg = [], [], [], {k: [] for k in ks}, {k: [] for k in ks}
    for i, order in enumerate(rows):
        rel = [relevant(i, j) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        aps.append(sum(sum(rel[:n]) / n for n in range(1, len(rel) + 1) if rel[n - 1]) / r)
        mapr.append(sum(sum(rel[:n]) / n for n in range(1, r + 1) if rel[n - 1]) / r)
        rprec.append(sum(rel[:r]) / r)
        gains = [jaccard(i, j) for j in order]
        ideal = sorted(gains, reverse=True)
        for k in ks:
            hits[k].append(sum(rel[:k]))
            dcg = sum(g / math.log2(n + 2) for n, g in enumerate(gains[:k]))
            idcg = sum(g / math.log2(n + 2) for n, g in enumerate(ideal[:k]))
            ndcg[k].append(dcg / idcg)
    out = {"map": 100 * np.mean(aps), "map_at_r": 100 * np.mean(mapr), "r_precision": 100 * np.mean(rprec),
           "recall_at_k": {str(k): 100 * np.mean([h > 0 for h in hits[k]]) for k in ks},
           "precision_at_k": {str(k): 100 * np.mean([h / k for h in hits[k]]) for k in ks},
           "ndcg_at_k": {str(k): 100 * np.mean(ndcg[k]) for k in ks},
           "queries_without_relevant": len(query) - len(aps)}
    per_finding = {}
    for f in range(q_table.shape[1]):
        values = []
        for i, order in enumerate(rows):
            if not q_table[i, f]:
                continue
            rel = [bool(g_table[j, f]) for j in order]
            if sum(rel):
                values.append(sum(sum(rel[:n]) / n for n in range(1, len(rel) + 1) if rel[n - 1]) / sum(rel))
        per_finding[str(f)] = {"ap": 100 * np.mean(values) if values else None, "queries": len(values)}
    out["per_finding"] = per_finding
    knn = {}
    for k in knn_ks:
        scores = np.array([[np.mean([g_table[j, f] for j in order[:k]]) for f in range(q_table.shape[1])]
                           for order in rows])
        auroc = {str(f): (100 * roc_auc_score(q_table[:, f], scores[:, f]) if 0 < q_table[:, f].sum() < len(q_table)
                          else None) for f in range(q_table.shape[1])}
        defined = [v for v in auroc.values() if v is not None]
        knn[str(k)] = {"auroc": auroc, "auroc_mean": np.mean(defined)}
    out["knn"] = knn
    return out


def assert_close(actual, expected, tol=1e-6):
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_close(actual[key], value, tol)
        elif value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(value, abs=tol), key


def random_case(seed, n=40, findings=4, quantised=True, gallery=False):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 6)).astype(np.float32)
    if quantised:  # exact ties
        emb = np.round(emb * 2) / 2 + 0.01
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = rng.random((n, findings)) < 0.3
    table[~table.any(1), -1] = True  # a film with no finding is "No Finding", the last column
    table[table[:, :-1].any(1), -1] = False
    groups = [f"p{i // 3}" for i in range(n)]
    return emb, table, groups


@pytest.mark.parametrize("relevance", ["any", "exact"])
@pytest.mark.parametrize("with_groups", [False, True])
def test_leave_one_out_matches_reference(relevance, with_groups):
    emb, table, groups = random_case(0)
    groups = groups if with_groups else None
    result = evaluate_multilabel(emb, table, ks=KS, knn_ks=KNN_KS, relevance=relevance, query_groups=groups)
    assert_close(result, reference(emb, table, q_groups=groups, relevance=relevance))


@pytest.mark.parametrize("with_groups", [False, True])
def test_query_gallery_matches_reference(with_groups):
    q_emb, q_table, q_groups = random_case(1, n=25)
    g_emb, g_table, g_groups = random_case(2, n=50)
    g_groups = [f"p{i // 5}" for i in range(50)]  # some patients on both sides
    args = dict(query_groups=q_groups, gallery_groups=g_groups) if with_groups else {}
    result = evaluate_multilabel(q_emb, q_table, g_emb, g_table, ks=KS, knn_ks=KNN_KS, **args)
    assert_close(result, reference(q_emb, q_table, g_emb, g_table, q_groups if with_groups else None,
                                   g_groups if with_groups else None))


def test_chunks_and_torch_agree():
    emb, table, groups = random_case(3, n=60, quantised=False)
    base = evaluate_multilabel(emb, table, ks=KS, knn_ks=KNN_KS, query_groups=groups)
    assert evaluate_multilabel(emb, table, ks=KS, knn_ks=KNN_KS, query_groups=groups, chunk_size=7) == base
    torched = evaluate_multilabel(torch.from_numpy(emb), torch.from_numpy(table), ks=KS, knn_ks=KNN_KS,
                                  query_groups=groups)
    assert_close(torched, base, tol=1e-9)


@pytest.mark.parametrize("with_groups", [False, True])
def test_torch_ops_path_agrees(monkeypatch, with_groups):
    # What runs on a GPU: the ranking on torch tensors, a whole chunk at a time.
    from cxr import ranking

    emb, table, groups = random_case(5, n=50)
    args = dict(ks=KS, knn_ks=KNN_KS, query_groups=groups if with_groups else None)
    base = evaluate_multilabel(emb, table, **args)
    monkeypatch.setattr(ranking, "_on_cpu", lambda device: False)
    assert_close(evaluate_multilabel(emb, table, **args, chunk_size=9), base, tol=1e-9)


def test_single_finding_tables_give_the_single_label_metrics():
    from cxr.retrieval_metrics import evaluate_retrieval

    emb, _, groups = random_case(4)
    labels = np.random.default_rng(4).integers(0, 3, len(emb))
    single = evaluate_retrieval(emb, labels, ks=KS, vote_ks=(1,), query_groups=groups)
    multi = evaluate_multilabel(emb, np.eye(3, dtype=bool)[labels], ks=KS, knn_ks=(1,), query_groups=groups)
    assert_close(multi, {key: single[key] for key in ("map", "map_at_r", "r_precision", "recall_at_k",
                                                      "precision_at_k", "queries_without_relevant")}, tol=1e-9)


def test_hand_computed_example():
    # Query 0 = {A, B}; gallery by similarity: {A} (relevant, Jaccard 1/2), {C} (not), {A, B} (1).
    query = np.array([[1.0, 0.0]], np.float32)
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    q_table = np.array([[1, 1, 0]])
    g_table = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0]])
    result = evaluate_multilabel(query, q_table, gallery, g_table, ks=(1, 2, 3), knn_ks=(1,))
    assert result["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["map_at_r"] == pytest.approx(100 * (1 / 2))  # R = 2: only rank 1 counts of the top 2
    assert result["r_precision"] == pytest.approx(50.0)
    dcg = 0.5 + 0 + 1 / math.log2(4)
    idcg = 1 + 0.5 / math.log2(3)
    assert result["ndcg_at_k"]["3"] == pytest.approx(100 * dcg / idcg)
    exact = evaluate_multilabel(query, q_table, gallery, g_table, ks=(1,), knn_ks=(1,), relevance="exact")
    assert exact["map"] == pytest.approx(100 / 3)


def test_queries_without_relevant_films_are_counted():
    emb = np.eye(3, dtype=np.float32)
    table = np.array([[1, 0], [1, 0], [0, 1]])
    result = evaluate_multilabel(emb, table, ks=(1,), knn_ks=(1,))
    assert result["queries_without_relevant"] == 1
    assert result["map"] == 100.0


def test_bit_sets():
    assert bit_sets(torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)).tolist() == [5, 0]


@pytest.mark.parametrize("change, message", [
    (dict(relevance="some"), "unknown relevance"),
    (dict(query_findings=np.zeros((5, 2)) + 2), "0/1"),
    (dict(query_findings=np.zeros((4, 2))), "must be"),
])
def test_errors(change, message):
    args = dict(query_emb=np.eye(5, dtype=np.float32), query_findings=np.eye(5, 2), ks=(1,), knn_ks=(1,))
    with pytest.raises(ValueError, match=message):
        evaluate_multilabel(**{**args, **change})
