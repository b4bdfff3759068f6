"""test.py's report as the lines it prints: retrieval numbers with their intervals, the
multi-label part (relevance, nDCG, per finding, kNN AUROC), the votes, per class, abstention and
the OOD count."""


def _ci(entry):
    """' [low, high]' of a bootstrap entry, or nothing."""
    if entry is None or entry.get("low") is None:
        return ""
    return f" [{entry['low']:.1f}, {entry['high']:.1f}]"


def print_report(report):
    excluded = "excluded" if report.get("same_patient_excluded") else "kept"
    print(f"\n{report['protocol']}: {report['num_queries']} queries, gallery of {report['num_gallery']}; "
          f"images of the query's own patient {excluded}")
    intervals = report.get("confidence_intervals", {})
    if intervals:
        print(f"  (95% intervals: {intervals['resamples']} resamples of {intervals['patients']} patients)")
    print("  " + "   ".join(f"R@{k} {v:6.2f}{_ci(intervals.get('recall_at_k', {}).get(k))}"
                            for k, v in report["recall_at_k"].items()))
    print(f"  mAP {report['map']:6.2f}{_ci(intervals.get('map'))}")
    if report.get("branch_attribution"):
        shares = report["branch_attribution"]
        print("  share of the similarity to the top-1 neighbour: "
              + ", ".join(f"{branch} {share:.1f}%" for branch, share in shares.items()))
    print("  " + "   ".join(f"mP@{k} {v:6.2f}{_ci(intervals.get('precision_at_k', {}).get(k))}"
                            for k, v in report["precision_at_k"].items()))
    print(f"  MAP@R {report['map_at_r']:6.2f}{_ci(intervals.get('map_at_r'))}   "
          f"R-precision {report['r_precision']:6.2f}{_ci(intervals.get('r_precision'))}"
          + (f"   ({report['queries_without_relevant']} queries without a relevant image, left out)"
             if report["queries_without_relevant"] else ""))
    if report.get("rerank"):
        print_rerank(report["rerank"])
    if "ndcg_at_k" in report:
        print_findings(report)
    over = " over the finding combinations" if report.get("classification_over") else ""
    print(f"\nmajority-vote kNN classification{over} (%)")
    columns = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
               "precision_weighted", "recall_weighted", "f1_weighted")
    print("    k " + " ".join(f"{c:>18}" for c in columns))
    for k, row in report["classification"].items():
        print(f"  {k:>3} " + " ".join(f"{row[c]:18.2f}" for c in columns))
    for k, row in report["classification"].items():
        print(f"\nconfusion matrix, k={k} (rows: true {', '.join(report['classes'])}; columns: predicted)")
        for line in row["confusion_matrix"]:
            print("  " + " ".join(f"{n:6d}" for n in line))
    if "per_class" in report:
        vote_k = str(report["abstention"]["vote_k"]) if "abstention" in report else next(iter(report["classification"]))
        print(f"\nper class (%)          queries   R@1     AP  vote recall (k={vote_k})")
        rows = {**report["per_class"]["classes"], "macro average": report["per_class"]["macro"]}
        for name, row in rows.items():
            ap = row.get("ap", row.get("map"))
            print(f"  {name:<20} {row.get('queries', ''):>7} {row['recall_at_1']:6.2f} "
                  f"{'   n/a' if ap is None else f'{ap:6.2f}'} {row['vote_recall'][vote_k]:6.2f}")
    if "abstention" in report:
        a = report["abstention"]
        line = (f"\nabstention of the vote at k={a['vote_k']}: AURC {a['risk_coverage']['aurc']:.2f}, "
                f"ECE of the vote share {a['ece']:.2f}, accuracy at full coverage {a['accuracy_full_coverage']:.2f}")
        if "operating_point" in a:
            op = a["operating_point"]
            answered = "n/a" if op["accuracy_answered"] is None else f"{op['accuracy_answered']:.2f}"
            line += (f"; abstaining below a share of {op['abstain_below']:g}: coverage {op['coverage']:.1f}, "
                     f"accuracy of the answered {answered}")
        print(line)
    if "ood" in report:
        counts = ", ".join(f"{name} {count} of {report['num_queries']} ({report['ood']['flagged_share'][name]:.1%})"
                           for name, count in report["ood"]["flagged_count"].items())
        # The thresholds are the saved (deployed) ones, set by ood.py to accept a share tpr of its
        # calibration images: say so, since "at 95% TPR" alone reads as a rate measured on these queries.
        print(f"\nqueries out of distribution at the deployed thresholds of {report['ood']['detector']} "
              f"(set to accept {report['ood']['tpr']:.0%} of its calibration images): {counts}")


def print_rerank(rerank):
    """The re-ranked numbers above against the plain ranking of the same embeddings."""
    c = rerank["vs_plain"]
    settings = ", ".join(f"{key} {value:g}" for key, value in rerank.items() if key not in ("method", "vs_plain"))
    print(f"  re-ranked by {rerank['method']} ({settings}); minus the plain ranking, paired bootstrap "
          f"over {c['patients']} patients ({c['resamples']} resamples), 95% intervals:")
    rows = [("R@1", c["recall_at_k"]["1"]), ("mAP", c["map"]), ("MAP@R", c["map_at_r"])]
    print("    " + "   ".join(f"{name} {row['b']:.2f} -> {row['a']:.2f} ({row['difference']:+.2f}"
                              + ("" if row["low"] is None else f" [{row['low']:+.2f}, {row['high']:+.2f}]") + ")"
                              for name, row in rows))


def print_findings(report):
    """The multi-label part of the report: relevance, nDCG, per finding, the kNN AUROC."""
    print(f"  relevance: {'a shared finding' if report['relevance'] == 'any' else 'the same findings'}; "
          + "   ".join(f"nDCG@{k} {v:6.2f}" for k, v in report["ndcg_at_k"].items()) + " (Jaccard gains)")
    knn = report["knn"]
    k = str(report.get("abstention", {}).get("vote_k"))
    k = k if k in knn else next(iter(knn))
    print(f"\nper finding        queries     AP   kNN AUROC (k={k})")
    for name, row in report["per_finding"].items():
        ap, auroc = row["ap"], knn[k]["auroc"].get(name)
        print(f"  {name:<20} {row['queries']:>5} {'   n/a' if ap is None else f'{ap:6.2f}'} "
              f"{'     n/a' if auroc is None else f'{auroc:8.2f}'}")
    means = {size: row["auroc_mean"] for size, row in knn.items()}
    print("  kNN AUROC, mean over findings: " + "   ".join(
        f"k={size} {'n/a' if mean is None else f'{mean:.2f}'}" for size, mean in means.items()))
