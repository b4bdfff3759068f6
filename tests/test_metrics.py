"""Tests for retrieval_metrics.py: golden values, a slow obvious reference, helpers, errors."""

import functools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxr import ranking, retrieval_metrics
from cxr.retrieval_metrics import evaluate_retrieval, majority_vote, rank_topk

GOLDEN = json.loads((Path(__file__).parent / "data" / "retrieval_metrics_golden.json").read_text())
GROUPS_GOLDEN_PATH = Path(__file__).parent / "data" / "retrieval_groups_golden.json"
KS, VOTE_KS = (1, 5, 10), (1, 5, 10, 15, 20)


# ---------------------------------------------------------------- reference

def reference_rankings(query, gallery=None, query_groups=None, gallery_groups=None):
    """Gallery order of each query: exact float64 similarities, stable argsort of -sim.
    With groups, gallery items of the query's own group are dropped (as the query itself
    is in leave-one-out)."""
    leave_one_out = gallery is None
    gallery = query if leave_one_out else gallery
    # float32 products are exact in float64 and math.fsum is correctly rounded,
    # so identical rows give identical similarities: ties are real ties.
    products = (np.asarray(query, np.float64)[:, None, :] * np.asarray(gallery, np.float64)[None]).tolist()
    sims = np.array([[math.fsum(p) for p in row] for row in products])
    rankings = []
    for i, row in enumerate(sims):
        order = np.argsort(-row, kind="stable")
        if leave_one_out:
            order = order[order != i]
        if query_groups is not None:
            groups = query_groups if leave_one_out else gallery_groups
            order = np.array([j for j in order if groups[j] != query_groups[i]], dtype=np.int64)
        rankings.append(order)
    return rankings, sims


def reference_vote(labels):
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)  # first in ranking wins ties


def reference_metrics(query, query_labels, gallery=None, gallery_labels=None, ks=KS, vote_ks=VOTE_KS,
                      num_classes=None, query_groups=None, gallery_groups=None):
    query_labels = [int(x) for x in query_labels]
    gallery_labels = query_labels if gallery is None else [int(x) for x in gallery_labels]
    rankings, _ = reference_rankings(query, gallery, query_groups, gallery_groups)
    n = len(query)
    found, precision, aps = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0.0), []
    maps_at_r, r_precisions = [], []
    predictions = {k: [] for k in vote_ks}
    for label, order in zip(query_labels, rankings):
        ranked_labels = [gallery_labels[j] for j in order]
        relevant = [x == label for x in ranked_labels]
        for k in ks:
            found[k] += any(relevant[:k])
            precision[k] += sum(relevant[:k]) / k
        if sum(relevant):
            hits, total = 0, 0.0
            for rank, is_relevant in enumerate(relevant, start=1):
                if is_relevant:
                    hits += 1
                    total += hits / rank  # P(rank) at each relevant rank
            aps.append(total / sum(relevant))
            r = sum(relevant)  # MAP@R and R-precision (Musgrave et al., 2020): the top R only
            r_precisions.append(sum(relevant[:r]) / r)
            maps_at_r.append(sum(sum(relevant[:rank]) / rank for rank in range(1, r + 1) if relevant[rank - 1]) / r)
        for k in vote_ks:
            predictions[k].append(reference_vote(ranked_labels[:k]))
    labels = list(range(num_classes)) if num_classes else sorted(set(query_labels) | set(gallery_labels))
    present = [label for label in labels if label in set(query_labels)]  # macro: classes with queries
    classification = {}
    for k in vote_ks:
        y_pred = predictions[k]
        scores = {"accuracy": 100 * accuracy_score(query_labels, y_pred)}
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(query_labels, y_pred, labels=present,
                                                         average=average, zero_division=0)
            scores.update({f"precision_{average}": 100 * p, f"recall_{average}": 100 * r,
                           f"f1_{average}": 100 * f})
        scores["confusion_matrix"] = confusion_matrix(query_labels, y_pred, labels=labels).tolist()
        classification[str(k)] = scores
    return {
        "recall_at_k": {str(k): 100 * found[k] / n for k in ks},
        "map": 100 * sum(aps) / len(aps),
        "precision_at_k": {str(k): 100 * precision[k] / n for k in ks},
        "map_at_r": 100 * sum(maps_at_r) / len(maps_at_r),
        "r_precision": 100 * sum(r_precisions) / len(r_precisions),
        "queries_without_relevant": n - len(aps),
        "classification": classification,
    }


def assert_metrics_close(actual, expected, tol=1e-4, same_keys=True):
    """Every number within tol (percent), confusion matrices exactly, same keys (or, for golden
    files written before MAP@R and R-precision existed, every key they hold)."""
    assert set(actual) == set(expected) if same_keys else set(expected) <= set(actual)
    actual = {key: actual[key] for key in expected}
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_metrics_close(actual[key], value, tol)
        elif key == "confusion_matrix":
            assert actual[key] == value
        else:
            assert actual[key] == pytest.approx(value, abs=tol), key


# ---------------------------------------------------------------- data

def normalised_embeddings(rng, n, dim, n_duplicates):
    """Unit rows with n_duplicates exact copies of other rows (exact ties)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = rng.choice(n, size=(n_duplicates, 2), replace=False)
    x[copies[:, 0]] = x[copies[:, 1]]
    return x


def grid_embeddings(rng, n, dim):
    """Rows of multiples of 1/4 in [-1/2, 1/2]: every dot product is exact in
    float32, so there are many exact ties between different rows."""
    return (rng.integers(-2, 3, size=(n, dim)) / 4).astype(np.float32)


def assert_well_separated(query, gallery=None):
    """Distinct similarities of a row differ by far more than float32 rounding (~1e-7)."""
    _, sims = reference_rankings(query, gallery)
    for row in sims:
        gaps = np.diff(np.unique(row))
        assert gaps.size == 0 or gaps.min() > 2e-6


def imbalanced_labels(rng, n, weights):
    return rng.choice(len(weights), size=n, p=np.asarray(weights) / np.sum(weights))


def case_leave_one_out_normalised():
    rng = np.random.default_rng(1)
    query = normalised_embeddings(rng, 90, 12, n_duplicates=12)
    assert_well_separated(query)
    return dict(query_emb=query, query_labels=imbalanced_labels(rng, 90, [0.6, 0.25, 0.1, 0.05]))


def case_leave_one_out_grid():
    rng = np.random.default_rng(2)
    return dict(query_emb=grid_embeddings(rng, 80, 6), query_labels=rng.integers(0, 3, 80))


def case_query_gallery_grid():
    """Class 3 only in the gallery; class 4 only in the queries (R = 0)."""
    rng = np.random.default_rng(3)
    query_labels = rng.integers(0, 3, 50)
    query_labels[[4, 17, 30]] = 4
    gallery_labels = imbalanced_labels(rng, 70, [0.5, 0.2, 0.2, 0.1])
    return dict(query_emb=grid_embeddings(rng, 50, 5), query_labels=query_labels,
                gallery_emb=grid_embeddings(rng, 70, 5), gallery_labels=gallery_labels)


def case_query_gallery_normalised():
    """Some queries are exact copies of gallery items; labels are not 0..C-1."""
    rng = np.random.default_rng(4)
    gallery = normalised_embeddings(rng, 75, 10, n_duplicates=8)
    query = normalised_embeddings(rng, 40, 10, n_duplicates=3)
    query[:6] = gallery[10:16]
    assert_well_separated(query, gallery)
    values = np.array([3, 7, 10])
    return dict(query_emb=query, query_labels=values[rng.integers(0, 3, 40)],
                gallery_emb=gallery, gallery_labels=values[imbalanced_labels(rng, 75, [0.7, 0.2, 0.1])])


CASES = {
    "leave_one_out_normalised": case_leave_one_out_normalised,
    "leave_one_out_grid": case_leave_one_out_grid,
    "query_gallery_grid": case_query_gallery_grid,
    "query_gallery_normalised": case_query_gallery_normalised,
}


@functools.lru_cache(maxsize=None)
def cached_case(name):
    return CASES[name]()


@pytest.fixture(params=sorted(CASES))
def case(request):
    return cached_case(request.param)  # shared: tests must not modify it


@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    """Rank with numpy in threads (the CPU path) or with torch ops (the GPU path, run on CPU)."""
    if request.param == "torch":
        monkeypatch.setattr(ranking, "_on_cpu", lambda device: False)
    return request.param


# ---------------------------------------------------------------- evaluate_retrieval

@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_golden_cases(name, backend):
    golden = GOLDEN["cases"][name]
    arrays = dict(query_emb=np.array(golden["query_embeddings"], np.float32),
                  query_labels=np.array(golden["query_labels"]))
    if "gallery_embeddings" in golden:
        arrays.update(gallery_emb=np.array(golden["gallery_embeddings"], np.float32),
                      gallery_labels=np.array(golden["gallery_labels"]))
    result = evaluate_retrieval(**arrays, ks=GOLDEN["ks"], vote_ks=GOLDEN["vote_ks"])
    assert_metrics_close(result, golden["expected"], same_keys=False)
    # The reference agrees with the golden file too, so it can be trusted below (and for the
    # keys the golden file predates: MAP@R, R-precision).
    reference = reference_metrics(arrays["query_emb"], arrays["query_labels"], arrays.get("gallery_emb"),
                                  arrays.get("gallery_labels"), GOLDEN["ks"], GOLDEN["vote_ks"])
    assert_metrics_close(reference, golden["expected"], same_keys=False)
    assert_metrics_close(result, reference)


def test_matches_reference(case, backend):
    result = evaluate_retrieval(**case)
    expected = reference_metrics(case["query_emb"], case["query_labels"], case.get("gallery_emb"),
                                 case.get("gallery_labels"))
    assert_metrics_close(result, expected, tol=1e-4)
    fixed_point = ("map", "map_at_r")  # summed in 2**-32 units of float32-rounded terms
    assert_metrics_close({k: v for k, v in result.items() if k not in fixed_point},
                         {k: v for k, v in expected.items() if k not in fixed_point}, tol=1e-9)


def test_query_without_relevant_items_is_left_out_of_map():
    data = case_query_gallery_grid()
    keep = data["query_labels"] != 4
    without = evaluate_retrieval(data["query_emb"][keep], data["query_labels"][keep],
                                 data["gallery_emb"], data["gallery_labels"])
    assert evaluate_retrieval(**data)["map"] == pytest.approx(without["map"], abs=1e-9)


def test_chunk_and_block_sizes_do_not_change_results(case, monkeypatch):
    expected = evaluate_retrieval(**case)
    for chunk_size in (1, 3, 7, None):
        assert evaluate_retrieval(**case, chunk_size=chunk_size) == expected
    monkeypatch.setattr(ranking, "_ELEMENTS_PER_BLOCK", 100)  # blocks of one or two rows
    monkeypatch.setattr(ranking, "_ELEMENTS_PER_CHUNK", 500)
    assert evaluate_retrieval(**case) == expected
    monkeypatch.setattr(ranking, "_on_cpu", lambda device: False)  # the torch path
    assert evaluate_retrieval(**case) == expected


def test_numpy_torch_and_dtypes_agree(case):
    expected = evaluate_retrieval(**case)
    as_torch = {k: torch.as_tensor(v) for k, v in case.items()}
    assert evaluate_retrieval(**as_torch) == expected
    as_float64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in case.items()}
    assert evaluate_retrieval(**as_float64) == expected


def test_half_precision_inputs_are_upcast():
    data = case_leave_one_out_grid()  # multiples of 1/4 are exact in bf16 and fp16
    expected = evaluate_retrieval(**data)
    for dtype in (torch.bfloat16, torch.float16):
        emb = torch.as_tensor(data["query_emb"]).to(dtype)
        assert evaluate_retrieval(emb, data["query_labels"]) == expected


def test_num_classes_reports_every_class():
    data = case_leave_one_out_grid()  # labels 0..2
    result = evaluate_retrieval(**data, num_classes=5)
    expected = reference_metrics(data["query_emb"], data["query_labels"], num_classes=5)
    assert_metrics_close(result, expected)
    assert np.array(result["classification"]["5"]["confusion_matrix"]).shape == (5, 5)


def test_result_is_plain_json():
    result = evaluate_retrieval(**case_query_gallery_normalised(), ks=(1, 2), vote_ks=(3,))
    assert json.loads(json.dumps(result)) == result
    assert set(result["recall_at_k"]) == {"1", "2"} and set(result["classification"]) == {"3"}
    assert type(result["map"]) is float
    assert all(type(v) is int for row in result["classification"]["3"]["confusion_matrix"] for v in row)


def test_hand_computed_example():
    # 1-D embeddings: similarity order is obvious. Query 0 (label 0) ranks
    # items 1 (0.9, label 1), 2 (0.5, label 0), 3 (0.5, label 0, tie -> after 2), 4.
    query = np.array([[1.0]], np.float32)
    gallery = np.array([[1.0], [0.9], [0.5], [0.5], [-1.0]], np.float32)
    result = evaluate_retrieval(query, [0], gallery, [0, 1, 0, 0, 1], ks=(1, 2), vote_ks=(2, 4))
    # Relevant at ranks 1, 3, 4: AP = (1/1 + 2/3 + 3/4) / 3.
    assert result["map"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 4) / 3)
    assert result["recall_at_k"] == {"1": 100.0, "2": 100.0}
    assert result["precision_at_k"] == {"1": 100.0, "2": 50.0}
    # Top 2 = labels [0, 1]: a tie, won by label 0 (ranked first).
    assert result["classification"]["2"]["confusion_matrix"] == [[1, 0], [0, 0]]
    assert result["classification"]["4"]["accuracy"] == 100.0


# ---------------------------------------------------------------- rank_topk

@pytest.mark.parametrize("exclude_self", [False, True])
def test_rank_topk_matches_reference(case, backend, exclude_self):
    query = case["query_emb"]
    gallery = query if exclude_self else case.get("gallery_emb", query)
    rankings, sims = reference_rankings(query, None if exclude_self else gallery)
    for k in (1, 4, len(rankings[0])):
        for chunk_size in (None, 7):
            scores, indices = rank_topk(query, gallery, k, exclude_self=exclude_self, chunk_size=chunk_size)
            assert scores.shape == indices.shape == (len(query), k)
            assert indices.dtype == torch.int64 and scores.dtype == torch.float32
            np.testing.assert_array_equal(indices.numpy(), np.stack([order[:k] for order in rankings]))
            np.testing.assert_allclose(scores.numpy(), np.take_along_axis(sims, indices.numpy(), 1),
                                       atol=1e-6)


def test_ties_and_signed_zeros_rank_by_index(backend):
    # Hand-made similarity rows through the ranking core: -0.0 and +0.0 are
    # equal, so they tie and go by gallery index, as do equal values.
    sims = np.array([[-0.0, 0.0, -0.0, 1e-45, -1e-45, -1.0, 1.0, 0.25, 0.25]], np.float32)
    job = ranking._Job(9, False, np.arange(9, dtype=np.int32) << 1)
    top = np.empty((1, 9), np.int64)
    if backend == "torch":
        sims, job, top = torch.from_numpy(sims), job._replace(index_bits=torch.from_numpy(job.index_bits)), \
            torch.from_numpy(top)
    ranking._rank_rows(sims, 0, job, top, None)
    assert ((np.asarray(top) & 0xFFFFFFFF) >> 1).tolist() == [[6, 7, 8, 3, 0, 1, 2, 4, 5]]


# ---------------------------------------------------------------- majority_vote

def test_majority_vote_matches_counter_reference():
    rng = np.random.default_rng(5)
    for k, num_classes in ((1, 3), (4, 2), (6, 3), (10, 5), (20, 7)):
        labels = rng.integers(0, num_classes, size=(300, k))  # many ties
        expected = [reference_vote(list(row)) for row in labels]
        assert majority_vote(torch.as_tensor(labels), num_classes).tolist() == expected


def test_majority_vote_ties_go_to_first_in_ranking():
    labels = torch.tensor([[1, 2, 2, 1], [2, 1, 1, 2], [3, 1, 1, 0], [0, 1, 2, 3], [2, 2, 1, 1]])
    assert majority_vote(labels, 4).tolist() == [1, 2, 1, 0, 2]
    assert majority_vote(labels[:0], 4).shape == (0,)


def test_majority_vote_in_row_chunks(monkeypatch):
    labels = torch.as_tensor(np.random.default_rng(7).integers(0, 3, size=(50, 5)))
    expected = majority_vote(labels, 3)
    monkeypatch.setattr(retrieval_metrics, "_VOTE_TABLE_ELEMENTS", 10)  # 3 rows per chunk
    assert torch.equal(majority_vote(labels, 3), expected)


def test_majority_vote_errors():
    with pytest.raises(ValueError, match="0..2"):
        majority_vote(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match=r"\(Q, k\)"):
        majority_vote(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="integers"):
        majority_vote(torch.tensor([[0.0, 1.0]]), 3)


# ---------------------------------------------------------------- errors

def _small():
    rng = np.random.default_rng(6)
    return normalised_embeddings(rng, 6, 4, n_duplicates=0), np.array([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("change, message", [
    (dict(query_labels=[0, 1]), "6 embeddings"),
    (dict(gallery_emb=np.eye(4, dtype=np.float32), gallery_labels=[0, 1]), "4 embeddings"),
    (dict(gallery_emb=np.eye(3, dtype=np.float32), gallery_labels=[0, 1, 2]), "dimension"),
    (dict(gallery_emb=np.eye(4, dtype=np.float32)), "both gallery_emb and gallery_labels"),
    (dict(query_emb=np.zeros((0, 4), np.float32), query_labels=[]), "empty"),
    (dict(gallery_emb=np.zeros((0, 4), np.float32), gallery_labels=[]), "empty"),
    (dict(ks=(6,)), "N - 1 for leave-one-out"),
    (dict(vote_ks=(1, 6)), "N - 1 for leave-one-out"),
    (dict(gallery_emb=np.eye(4, dtype=np.float32), gallery_labels=[0, 1, 2, 0], ks=(5,)), "gallery size"),
    (dict(ks=(0,)), "positive"),
    (dict(query_labels=[0, 1, 2, 3, 4, 5]), "no query has a relevant"),
    (dict(query_emb=np.full((6, 4), np.nan, np.float32)), "NaN"),
    (dict(query_labels=np.zeros(6)), "integers"),
    (dict(num_classes=2), r"0\.\.1"),
    (dict(num_classes=0), "num_classes"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_evaluate_errors(change, message):
    query, labels = _small()
    arguments = dict(query_emb=query, query_labels=labels, ks=(1,), vote_ks=(1,))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        evaluate_retrieval(**arguments)


def test_largest_allowed_k_works():
    query, labels = _small()
    assert evaluate_retrieval(query, labels, ks=(5,), vote_ks=(5,))["recall_at_k"]["5"] == 100.0
    gallery = np.eye(4, dtype=np.float32)
    evaluate_retrieval(query, labels, gallery, [0, 1, 2, 0], ks=(4,), vote_ks=(4,))


def test_rank_topk_errors():
    query, _ = _small()
    with pytest.raises(ValueError, match="N - 1 for leave-one-out"):
        rank_topk(query, query, 6, exclude_self=True)
    with pytest.raises(ValueError, match="gallery size"):
        rank_topk(query, query[:3], 4)
    with pytest.raises(ValueError, match="exclude_self needs"):
        rank_topk(query, query[:3], 1, exclude_self=True)


# ---------------------------------------------------------------- groups (patients)

def case_groups_leave_one_out_grid():
    """Several images per patient, many exact ties; patient ids are strings."""
    rng = np.random.default_rng(11)
    n = 80
    groups = np.array([f"P{g:02d}" for g in rng.integers(0, 25, n)])
    return dict(query_emb=grid_embeddings(rng, n, 6), query_labels=rng.integers(0, 3, n), query_groups=groups)


def case_groups_leave_one_out_near_copies():
    """Each patient's films are near copies of one another: without the exclusion R@1 is ~100."""
    rng = np.random.default_rng(12)
    centres = normalised_embeddings(rng, 30, 10, n_duplicates=0)
    patient = np.repeat(np.arange(30), 3)
    x = centres[patient] + 0.05 * rng.standard_normal((90, 10)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 30)[patient]
    return dict(query_emb=x, query_labels=labels, query_groups=patient)


def case_groups_query_gallery():
    """Some query patients also have images in the gallery (integer ids)."""
    rng = np.random.default_rng(13)
    return dict(query_emb=grid_embeddings(rng, 40, 5), query_labels=rng.integers(0, 3, 40),
                query_groups=rng.integers(0, 30, 40), gallery_emb=grid_embeddings(rng, 70, 5),
                gallery_labels=rng.integers(0, 3, 70), gallery_groups=rng.integers(20, 60, 70))


GROUP_CASES = {
    "groups_leave_one_out_grid": case_groups_leave_one_out_grid,
    "groups_leave_one_out_near_copies": case_groups_leave_one_out_near_copies,
    "groups_query_gallery": case_groups_query_gallery,
}


def _reference_for(case):
    return reference_metrics(case["query_emb"], case["query_labels"], case.get("gallery_emb"),
                             case.get("gallery_labels"), query_groups=case.get("query_groups"),
                             gallery_groups=case.get("gallery_groups"))


@pytest.mark.parametrize("name", sorted(GROUP_CASES))
def test_same_group_exclusion_matches_reference(name, backend):
    case = GROUP_CASES[name]()
    result = evaluate_retrieval(**case)
    assert_metrics_close(result, _reference_for(case), tol=1e-4)
    for chunk_size in (1, 7):
        assert evaluate_retrieval(**case, chunk_size=chunk_size) == result


def test_same_group_exclusion_golden_cases(backend):
    golden = json.loads(GROUPS_GOLDEN_PATH.read_text())
    for name, data in golden["cases"].items():
        arrays = dict(query_emb=np.array(data["query_embeddings"], np.float32),
                      query_labels=np.array(data["query_labels"]), query_groups=data["query_groups"])
        if "gallery_embeddings" in data:
            arrays.update(gallery_emb=np.array(data["gallery_embeddings"], np.float32),
                          gallery_labels=np.array(data["gallery_labels"]),
                          gallery_groups=data["gallery_groups"])
        assert_metrics_close(evaluate_retrieval(**arrays, ks=golden["ks"], vote_ks=golden["vote_ks"]),
                             data["expected"], same_keys=False), name


def test_near_copies_inflate_without_exclusion():
    case = case_groups_leave_one_out_near_copies()
    with_copies = evaluate_retrieval(case["query_emb"], case["query_labels"])
    without = evaluate_retrieval(**case)
    assert with_copies["recall_at_k"]["1"] == 100.0  # the patient's other film is always first
    assert without["recall_at_k"]["1"] < 60.0


def test_hand_computed_group_example():
    # Query (label 0, patient p1) against: its own near copy (p1, label 0), 0.9 (p2, label 1),
    # 0.5 (p3, label 0), 0.4 (p1, label 0), -1 (p4, label 1). Without p1: ranking 1, 2, 4 and
    # one relevant item, at rank 2.
    query = np.array([[1.0]], np.float32)
    gallery = np.array([[1.0], [0.9], [0.5], [0.4], [-1.0]], np.float32)
    labels = [0, 1, 0, 0, 1]
    result = evaluate_retrieval(query, [0], gallery, labels, ks=(1, 2), vote_ks=(1, 3),
                                query_groups=["p1"], gallery_groups=["p1", "p2", "p3", "p1", "p4"])
    assert result["map"] == pytest.approx(50.0)
    assert result["recall_at_k"] == {"1": 0.0, "2": 100.0}
    assert result["classification"]["3"]["confusion_matrix"] == [[0, 1], [0, 0]]  # votes 1, 0, 1
    kept = evaluate_retrieval(query, [0], gallery, labels, ks=(1, 2), vote_ks=(1,))
    assert kept["map"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 4) / 3)


def test_distinct_groups_change_nothing(case):
    n = len(case["query_emb"])
    groups = dict(query_groups=[f"img{i}" for i in range(n)])
    if "gallery_emb" in case:
        groups["gallery_groups"] = [f"gal{i}" for i in range(len(case["gallery_emb"]))]
    assert evaluate_retrieval(**case, **groups) == evaluate_retrieval(**case)


def test_per_query_values_give_the_metrics():
    case = case_groups_leave_one_out_grid()
    result, per_query = evaluate_retrieval(**case, return_per_query=True)
    assert result == evaluate_retrieval(**case)
    hits = per_query["hits"]
    assert 100 * (hits[:, 0] > 0).mean() == pytest.approx(result["recall_at_k"]["1"])
    assert 100 * (hits[:, 2] / 10).mean() == pytest.approx(result["precision_at_k"]["10"])
    assert 100 * np.nanmean(per_query["ap"]) == pytest.approx(result["map"])
    for k in VOTE_KS:
        accuracy = 100 * (per_query["votes"][k] == per_query["y_true"]).mean()
        assert accuracy == pytest.approx(result["classification"][str(k)]["accuracy"])
        assert ((per_query["vote_share"][k] > 0) & (per_query["vote_share"][k] <= 1)).all()
    rankings, _ = reference_rankings(case["query_emb"], query_groups=case["query_groups"])
    np.testing.assert_array_equal(per_query["top_indices"], np.stack([r[:20] for r in rankings]))


def test_macro_averages_count_only_classes_with_queries():
    data = case_leave_one_out_grid()  # labels 0..2, reported over 5 classes
    result = evaluate_retrieval(**data, num_classes=5)
    assert result == evaluate_retrieval(**data) | {"classification": result["classification"]}
    for k, row in result["classification"].items():
        assert row["recall_macro"] == pytest.approx(evaluate_retrieval(**data)["classification"][k]["recall_macro"])


@pytest.mark.parametrize("change, message", [
    (dict(query_groups=["a"] * 5 + ["b"]), "outside its own group"),
    (dict(query_groups=["a", "b"]), "one group"),
    (dict(gallery_groups=list(range(6))), "needs query_groups"),
    (dict(query_groups=list(range(6)), gallery_groups=list(range(6))), "query_groups only"),
])
def test_group_errors(change, message):
    query, labels = _small()
    arguments = dict(query_emb=query, query_labels=labels, ks=(1,), vote_ks=(2,))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        evaluate_retrieval(**arguments)
