"""Re-ranking (cxr/reranking.py, cxr/kreciprocal.py): the identity settings reproduce the plain
ranking bit for bit, aqe and dba equal a slow per-query reference, a query's own patient never
enters its neighbour sets, and test.py / retrieve.py expose it."""
import json

import numpy as np
import pytest
import torch

from cxr import gallery_index
from cxr.errors import UserError
from cxr.metric_inputs import exclusion_codes
from cxr.multilabel_metrics import evaluate_multilabel
from cxr.reranking import Rerank, search_reranked
from cxr.retrieval_metrics import evaluate_retrieval
from test_evaluation import clustered, evaluated, run_test_py  # noqa: F401  (the evaluated fixture)
from test_retrieve import index_argv, trained  # noqa: F401  (the trained fixture)
from test_train import phantoms  # noqa: F401  (the phantoms fixture)

IDENTITIES = [Rerank("aqe", k=0), Rerank("dba", k=0), Rerank("kreciprocal", jaccard_weight=0.0)]
ACTIVE = [Rerank("aqe", k=3), Rerank("aqe", k=4, alpha=0.0), Rerank("dba", k=3), Rerank("dba", k=5, alpha=1.0),
          Rerank("kreciprocal", k1=6, k2=3)]


def same_numbers(a, b):
    assert a[0] == b[0]
    for key in ("top_indices", "hits", "n_relevant"):
        np.testing.assert_array_equal(a[1][key], b[1][key])
    np.testing.assert_array_equal(np.nan_to_num(a[1]["ap"], nan=-1), np.nan_to_num(b[1]["ap"], nan=-1))


@pytest.mark.parametrize("rerank", IDENTITIES, ids=lambda r: r.method)
def test_identity_settings_reproduce_the_plain_ranking_exactly(rerank):
    x, y, patients = clustered(40, images_per_patient=3)
    plain = evaluate_retrieval(x, y, query_groups=patients, return_per_query=True)
    same_numbers(evaluate_retrieval(x, y, query_groups=patients, return_per_query=True, rerank=rerank), plain)
    # query-gallery, and without groups
    q, g = x[:30], x[30:]
    plain = evaluate_retrieval(q, y[:30], g, y[30:], query_groups=patients[:30], gallery_groups=patients[30:],
                               return_per_query=True)
    same_numbers(evaluate_retrieval(q, y[:30], g, y[30:], query_groups=patients[:30], gallery_groups=patients[30:],
                                    return_per_query=True, rerank=rerank), plain)
    same_numbers(evaluate_retrieval(x, y, return_per_query=True, rerank=rerank),
                 evaluate_retrieval(x, y, return_per_query=True))
    findings = np.eye(3, dtype=bool)[y]
    a = evaluate_multilabel(x, findings, query_groups=patients, return_per_query=True, rerank=rerank)
    b = evaluate_multilabel(x, findings, query_groups=patients, return_per_query=True)
    assert a[0] == b[0]


def excluded_sets(patients, n_gallery, leave_one_out):
    return [{j for j in range(n_gallery) if patients[j] == patients[i]} | ({i} if leave_one_out else set())
            for i in range(len(patients))]


def reference_scores(method, x, k, alpha, excluded):
    """Slow per-query aqe / dba: neighbour sets taken from the gallery less the query's exclusions."""
    s = x @ x.T
    out = np.empty_like(s, dtype=np.float64)
    for i in range(len(x)):
        allowed = [j for j in range(len(x)) if j not in excluded[i]]
        if method == "aqe":
            top = sorted(allowed, key=lambda j: (-s[i, j], j))[:k]
            expanded = x[i] + sum(max(s[i, j], 0) ** alpha * x[j] for j in top)
            out[i] = x @ expanded
            continue
        for g in range(len(x)):
            others = [j for j in allowed if j != g]
            top = sorted(others, key=lambda j: (-s[g, j], j))[:k]
            w = [max(s[g, j], 0) ** alpha for j in top]
            out[i, g] = (s[i, g] + sum(wj * s[i, j] for wj, j in zip(w, top))) / (1 + sum(w))
    return out


@pytest.mark.parametrize("method", ["aqe", "dba"])
def test_aqe_and_dba_equal_a_slow_reference(method):
    x, _, patients = clustered(12, images_per_patient=2, dim=6, seed=4)
    xt = torch.from_numpy(x)
    codes = exclusion_codes(patients, None, len(x), len(x), True, xt.device)
    rescore = Rerank(method, k=3, alpha=2.0).bind(xt, xt, *codes, leave_one_out=True)
    sims = xt @ xt.T
    rescore(0, sims)
    expected = reference_scores(method, x.astype(np.float64), 3, 2.0, excluded_sets(patients, len(x), True))
    allowed = ~np.array([[j in e for j in range(len(x))] for e in excluded_sets(patients, len(x), True)])
    np.testing.assert_allclose(sims.numpy()[allowed], expected[allowed], rtol=1e-5, atol=1e-6)


def reciprocal(s, item, k, candidates):
    """{item} and the h of item's top k (among `candidates`) with item in h's top k (among theirs)."""
    def top(a):
        return sorted((j for j in candidates if j != a), key=lambda j: (-s[a, j], j))[:k]
    return {item} | {h for h in top(item) if item in top(h)}


def kreciprocal_reference(x, k1, k2, w, excluded):
    """Slow dense k-reciprocal scores (Zhong et al., 2017; distances divided by the item's largest,
    as in their code) with this repository's two choices: the gallery's graph is the gallery's own
    (the query is not added), and the query's lists (and its largest distance) are over the gallery
    less its exclusions, whose entries leave every vector."""
    s, n = x @ x.T, len(x)
    gallery = range(n)
    largest = (2 - 2 * s).max(1)  # each gallery film's largest distance
    full = [reciprocal(s, g, k1, gallery) for g in gallery]
    half = [reciprocal(s, g, (k1 + 1) // 2, gallery) for g in gallery]

    def vector(item_sims, base, halves, scale):
        members = set(base)
        for h in base:
            if halves[h] and len(halves[h] & base) > 2 / 3 * len(halves[h]):
                members |= halves[h]
        v = np.zeros(n)
        for m in members:
            v[m] = np.exp(-(2 - 2 * item_sims[m]) / scale)
        return v / v.sum() if v.sum() else v

    base = np.array([vector(s[g], full[g], half, largest[g]) for g in gallery])
    top_k2 = [sorted((j for j in gallery if j != g), key=lambda j: (-s[g, j], j))[:k2 - 1] for g in gallery]
    expanded = np.array([base[[g, *top_k2[g]]].mean(0) for g in gallery])
    out = np.empty((n, n))
    for q in range(n):
        allowed = [j for j in gallery if j not in excluded[q]]
        order = sorted(allowed, key=lambda j: (-s[q, j], j))
        own = {h for h in order[:k1]  # q enters h's top k1 among the items q keeps
               if len([j for j in allowed if j != h and s[h, j] > s[h, q]]) < k1}
        scale = max(2 - 2 * s[q, j] for j in allowed)
        v = vector(s[q], own, [h - set(excluded[q]) for h in half], scale) if own else np.zeros(n)
        if k2 > 1:
            v = (v + base[order[:k2 - 1]].sum(0)) / (1 + len(order[:k2 - 1]))
        keep = np.ones(n, dtype=bool)
        keep[list(excluded[q])] = False
        for g in gallery:
            a, b = v * keep, expanded[g] * keep
            union = np.maximum(a, b).sum()
            jaccard = 1 - np.minimum(a, b).sum() / union if own and union > 0 else 1.0
            out[q, g] = -((1 - w) * (2 - 2 * s[q, g]) / scale + w * jaccard) * scale / 2 + (1 - w)  # the score
    return out


@pytest.mark.parametrize("k1, k2", [(4, 3), (3, 6), (23, 2)])
def test_kreciprocal_equals_a_slow_reference(k1, k2):
    """Also when the query keeps fewer than k1 films (k1 = 23: each keeps 22 of the 24 films) and when
    k2 exceeds the neighbour lists (k2 = 6 > k1)."""
    x, _, patients = clustered(12, images_per_patient=2, dim=6, seed=4)
    xt = torch.from_numpy(x)
    codes = exclusion_codes(patients, None, len(x), len(x), True, xt.device)
    rescore = Rerank("kreciprocal", k1=k1, k2=k2, jaccard_weight=0.6).bind(xt, xt, *codes, leave_one_out=True)
    sims = xt @ xt.T
    rescore(0, sims)
    excluded = excluded_sets(patients, len(x), True)
    expected = kreciprocal_reference(x.astype(np.float64), k1, k2, 0.6, excluded)
    allowed = ~np.array([[j in e for j in range(len(x))] for e in excluded])
    np.testing.assert_allclose(sims.numpy()[allowed], expected[allowed], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rerank", ACTIVE, ids=lambda r: f"{r.method}")
def test_the_query_patients_films_never_enter(rerank):
    """Moving the query's own patient's other films anywhere changes none of its scores (aqe,
    dba: exact); for every method they never appear among its re-ranked neighbours."""
    x, y, patients = clustered(30, images_per_patient=3, seed=1)
    xt = torch.from_numpy(x)
    codes = exclusion_codes(patients, None, len(x), len(x), True, xt.device)
    query = 4  # patient P1's films are 3, 4, 5
    sims = xt @ xt.T
    rerank.bind(xt, xt, *codes, leave_one_out=True)(0, sims)
    moved = xt.clone()
    elsewhere = torch.randn(2, x.shape[1], generator=torch.Generator().manual_seed(9))
    moved[[3, 5]] = torch.nn.functional.normalize(elsewhere, dim=1)
    moved_sims = moved @ moved.T
    rerank.bind(moved, moved, *codes, leave_one_out=True)(0, moved_sims)
    others = [j for j in range(len(x)) if patients[j] != patients[query]]
    if rerank.method != "kreciprocal":  # the gallery's own reciprocal structure may see them
        torch.testing.assert_close(moved_sims[query, others], sims[query, others], rtol=0, atol=1e-6)
    _, per_query = evaluate_retrieval(x, y, query_groups=patients, return_per_query=True, rerank=rerank)
    for i, top in enumerate(per_query["top_indices"]):
        assert not any(patients[j] == patients[i] for j in top)
    assert rerank.active


def test_reranking_changes_the_ranking_and_parameters_are_checked():
    x, y, patients = clustered(40, images_per_patient=3, seed=2, noise=1.0)
    plain = evaluate_retrieval(x, y, query_groups=patients, return_per_query=True)
    for rerank in ACTIVE:
        reranked = evaluate_retrieval(x, y, query_groups=patients, return_per_query=True, rerank=rerank)
        assert not np.array_equal(reranked[1]["top_indices"], plain[1]["top_indices"]), rerank
    for bad in (dict(method="qe"), dict(method="aqe", k=-1), dict(method="dba", alpha=-1.0),
                dict(method="kreciprocal", jaccard_weight=1.5), dict(method="kreciprocal", k1=0),
                dict(method="aqe", alpha=float("nan")), dict(method="kreciprocal", k2=0)):
        with pytest.raises(ValueError):
            Rerank(**bad)


def test_search_reranked_matches_the_metrics_ranking():
    """New queries against an index: the same order as the query-gallery metrics' re-ranking."""
    x, y, _ = clustered(30, images_per_patient=2, seed=3)
    q, g = x[:10], x[10:]
    for rerank in [Rerank("none"), *ACTIVE]:
        scores, similarities, indices = search_reranked(q, g, 5, rerank)
        _, per_query = evaluate_retrieval(q, y[:10], g, y[10:], ks=(5,), vote_ks=(1,), return_per_query=True,
                                          rerank=rerank)
        np.testing.assert_array_equal(indices.numpy(), per_query["top_indices"][:, :5])
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
        cosines = (torch.from_numpy(q)[:, None] * torch.from_numpy(g)[indices]).sum(-1)
        torch.testing.assert_close(similarities, cosines)


def test_test_py_reports_the_reranking_against_the_plain_ranking(evaluated, tmp_path, capsys):  # noqa: F811
    root, data, checkpoint = evaluated
    common = ["--resume", checkpoint, "--dataset", "demo", "--test-dataset-dir", data / "test",
              "--test-image-list", data / "test_patients.txt", "--workers", "0", "--device", "cpu",
              "--save-dir", tmp_path, "--no-plots", "--bootstrap", "50"]
    plain = run_test_py(*common, "--report", tmp_path / "plain.json")
    identity = run_test_py(*common, "--report", tmp_path / "k0.json", "--rerank", "dba", "--rerank-k", "0")
    assert identity["map"] == plain["map"] and identity["recall_at_k"] == plain["recall_at_k"]
    assert identity["rerank"]["vs_plain"]["map"]["difference"] == 0.0
    reranked = run_test_py(*common, "--report", tmp_path / "aqe.json", "--rerank", "aqe", "--rerank-k", "2")
    comparison = reranked["rerank"]["vs_plain"]["map"]
    assert reranked["rerank"]["method"] == "aqe" and reranked["rerank"]["k"] == 2
    assert comparison["a"] == pytest.approx(reranked["map"]) and comparison["b"] == pytest.approx(plain["map"])
    assert comparison["low"] <= comparison["difference"] <= comparison["high"]
    assert json.loads((tmp_path / "aqe.json").read_text())["rerank"]["method"] == "aqe"
    assert "re-ranked by aqe" in capsys.readouterr().out
    with pytest.raises(UserError, match="--rerank aqe: re-ranking k = -2 must be >= 0"):
        run_test_py(*common, "--rerank", "aqe", "--rerank-k", "-2")


def test_retrieve_query_reranks_the_exact_scan(trained, phantoms, tmp_path):  # noqa: F811
    import retrieve

    out = tmp_path / "gallery.index"
    retrieve.main(index_argv(trained, phantoms, out))
    images = [str(p) for p in sorted((phantoms / "test").glob("*.png"))[:4]]
    common = ["query", "--index", str(out), "--resume", str(trained), *images, "--topk", "5", "--device", "cpu"]
    plain = retrieve.main([*common, "--out", str(tmp_path / "plain")])
    reranked = retrieve.main([*common, "--out", str(tmp_path / "dba"), "--rerank", "dba", "--rerank-k", "3"])
    manifest, gallery, _, paths = gallery_index.load_index(out)
    for record in reranked:
        scores = [n["rerank_score"] for n in record["neighbours"]]
        assert scores == sorted(scores, reverse=True)
    assert [n["path"] for r in plain for n in r["neighbours"]] != [n["path"] for r in reranked for n in r["neighbours"]]
    summary = json.loads((tmp_path / "dba" / "results.json").read_text())
    assert summary["rerank"] == {"method": "dba", "k": 3, "alpha": 3.0}
    identity = retrieve.main([*common, "--out", str(tmp_path / "k0"), "--rerank", "aqe", "--rerank-k", "0"])
    assert [n["path"] for r in identity for n in r["neighbours"]] == [n["path"] for r in plain for n in r["neighbours"]]
    with pytest.raises(UserError, match="drop --search faiss"):
        retrieve.main([*common, "--out", str(tmp_path / "f"), "--rerank", "aqe", "--search", "faiss"])


def test_rerank_flags_name_the_flag_and_refuse_another_methods_parameter():
    import argparse

    from cxr import cli

    parser = argparse.ArgumentParser()
    cli.add_rerank_flags(parser)
    assert cli.rerank_from_args(parser.parse_args([])) == Rerank()
    assert cli.rerank_from_args(parser.parse_args(["--rerank", "kreciprocal", "--rerank-k1", "7"])) == Rerank(
        "kreciprocal", k1=7)
    for argv, message in ((["--rerank", "aqe", "--rerank-k1", "3"], "--rerank-k1 is a parameter of --rerank "
                           "kreciprocal"), (["--rerank-k", "3"], "not of --rerank none"),
                          (["--rerank", "dba", "--rerank-alpha", "nan"], "--rerank dba: re-ranking alpha")):
        with pytest.raises(UserError, match=message):
            cli.rerank_from_args(parser.parse_args(argv))
