"""Paired comparison of two models' embeddings of the same list (files test.py wrote):
differences A - B of every metric with patient-bootstrap intervals and p-values.

    python test.py --compare runs/a/<a>_test_split_embeddings.npz runs/b/<b>_test_split_embeddings.npz
"""
import datetime
from pathlib import Path

import numpy as np

from cxr import cli, report_inputs, report_stats
from cxr.atomic_files import write_json
from cxr.errors import UserError
from cxr.multilabel_metrics import evaluate_multilabel
from cxr.retrieval_metrics import evaluate_retrieval

KS = report_inputs.KS


def load_embeddings(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--compare {path}: no such file; give the .npz files test.py wrote "
                              "(its last lines name them)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise UserError(f"--compare {path}: not an embeddings file of test.py ({error})") from error
    missing = {"query_embeddings", "query_labels", "query_paths", "classes"} - set(arrays)
    if missing:
        raise UserError(f"--compare {path}: lacks {', '.join(sorted(missing))}; write it with test.py")
    return arrays


def compare(args, versions):
    """Both files' per-query values on the same queries, then a paired patient bootstrap;
    `versions` (the libraries) go into the report."""
    paths = [Path(p) for p in args.compare]
    a, b = (load_embeddings(p) for p in paths)
    for key in ("query_paths", "query_labels", "classes", "gallery_paths", "gallery_labels", "query_findings",
                "gallery_findings", "findings", "relevance"):
        if (key in a) != (key in b) or (key in a and not np.array_equal(a[key], b[key])):
            raise UserError(f"--compare: {paths[0].name} and {paths[1].name} differ in {key}; "
                                  "compare embeddings of the same list(s), protocol and classes")
    n_resamples = args.bootstrap or 1000
    if n_resamples < 2:
        raise SystemExit(f"error: --bootstrap {args.bootstrap}: a comparison needs at least 2 resamples")
    patients = a["query_patients"] if "query_patients" in a else None
    if patients is None:
        print("note: the files hold no patient ids (written by an older test.py): each image counts "
              "as its own patient")
    groups = {}
    if not args.keep_same_patient and patients is not None:
        groups["query_groups"] = patients
        if "gallery_embeddings" in a:
            groups["gallery_groups"] = a.get("gallery_patients", np.array([f"gallery {i}" for i in
                                                                          range(len(a["gallery_labels"]))]))
    classes = a["classes"].tolist()
    # The vote sizes both files can hold (a small list holds fewer than the default ones).
    gallery_patients = None
    if "gallery_embeddings" in a:
        gallery_patients = list(groups.get("gallery_groups", range(len(a["gallery_labels"]))))
    available = report_inputs.neighbours_available(
        list(patients) if patients is not None else list(range(len(a["query_labels"]))),
        gallery_patients, exclude_same_patient=bool(groups))
    vote_ks, _ = report_inputs.choose_vote_ks(args.vote_ks, available)
    rerank = cli.rerank_from_args(args)  # both files re-ranked alike (default: none)
    per_query = []
    for data in (a, b):
        _, values = evaluate_retrieval(data["query_embeddings"], data["query_labels"],
                                       data.get("gallery_embeddings"), data.get("gallery_labels"),
                                       ks=KS, vote_ks=vote_ks, num_classes=len(classes),
                                       return_per_query=True, rerank=rerank, **groups)
        if "query_findings" in data:  # multi-label lists: the retrieval numbers by finding relevance
            _, multilabel = evaluate_multilabel(data["query_embeddings"], data["query_findings"],
                                                data.get("gallery_embeddings"), data.get("gallery_findings"),
                                                ks=KS, knn_ks=vote_ks, relevance=str(data["relevance"]),
                                                per_finding=False, return_per_query=True, rerank=rerank,
                                                **groups)
            values = {**values, **multilabel}
        per_query.append(values)
    result = report_stats.paired_comparison(*per_query, patients, n_resamples, args.bootstrap_seed)
    intervals = [report_stats.bootstrap(values, patients, n_resamples, args.bootstrap_seed) for values in per_query]

    def describe(path, data, ci):
        return {"embeddings": str(path), "checkpoint": str(data.get("checkpoint", "")),
                "model": str(data.get("model", "")),
                "epoch": int(data["epoch"]) if int(data.get("epoch", -1)) >= 0 else None,
                "confidence_intervals": ci}

    report = {"a": describe(paths[0], a, intervals[0]), "b": describe(paths[1], b, intervals[1]),
              "protocol": "query-gallery" if "gallery_embeddings" in a else "leave-one-out",
              "num_queries": len(a["query_labels"]), "classes": classes,
              "relevance": str(a["relevance"]) if "relevance" in a else None,
              "same_patient_excluded": bool(groups), "comparison": result, "rerank": rerank.describe(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions}
    print_comparison(report)
    report_path = Path(args.report or paths[0].with_name(f"{paths[0].stem}_vs_{paths[1].stem}_compare.json"))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report_path, report)
    print(f"\ncomparison: {report_path}")
    return report


def print_comparison(report):
    c = report["comparison"]
    a, b = (report[side]["model"] or report[side]["embeddings"] for side in ("a", "b"))
    print(f"\nA: {a}   B: {b}")
    print(f"{report['protocol']}, {report['num_queries']} queries of {c['patients']} patients; paired "
          f"bootstrap, {c['resamples']} resamples; 95% intervals")
    print(f"  {'metric':<16}{'A':>8}{'B':>8}{'A - B':>8}   {'95% interval':<16}{'p':>7}")
    if report.get("relevance"):
        print(f"  multi-label relevance: {report['relevance']}; the votes are over the finding combinations")
    rows = [(f"R@{k}", v) for k, v in c["recall_at_k"].items()] + [("mAP", c["map"])]
    rows += [(name, c[key]) for key, name in (("map_at_r", "MAP@R"), ("r_precision", "R-precision")) if key in c]
    rows += [(f"mP@{k}", v) for k, v in c["precision_at_k"].items()]
    for k, v in c["classification"].items():
        rows += [(f"vote acc k={k}", v["accuracy"]), (f"macro-F1 k={k}", v["f1_macro"])]
    for name, row in rows:
        interval = "n/a" if row["low"] is None else f"[{row['low']:.1f}, {row['high']:.1f}]"
        p = "n/a" if row["p_value"] is None else f"{row['p_value']:.3f}"
        if row["p_value"] == 0.0:  # no resample on the other side of 0: below the resolution 2 / B
            p = f"<{2 / c['resamples']:.3f}" if 2 / c["resamples"] >= 0.001 else "<0.001"
        print(f"  {name:<16}{row['a']:8.2f}{row['b']:8.2f}{row['difference']:8.2f}   {interval:<16}{p:>7}")
