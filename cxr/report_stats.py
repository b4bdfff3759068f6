"""Statistics on top of retrieval_metrics.py: per-class numbers, patient-bootstrap confidence intervals,
paired comparison of two models, and abstention (risk-coverage, calibration) of the vote.

Everything here starts from the per-query values of one ranking
(`retrieval_metrics.evaluate_retrieval(..., return_per_query=True)`): each query's hits in its top K,
its AP, its majority vote and vote share. A metric is then a weighted mean over queries, and a
bootstrap resample is a vector of query weights:

    weights (B, Q) = how often each query's patient was drawn in each of B resamples

so B resamples cost a few (B, Q) x (Q, C) matrix products, with no Python loop over them.

What the bootstrap resamples: queries, by patient (cluster bootstrap: a patient's images go in
and out together, since they are not independent). The gallery is held fixed: in leave-one-out
it is the same set as the queries, and a full resample would re-rank every query against a
resampled gallery; keeping the rankings and resampling only who asks approximates that and is
exact for query-gallery. The intervals therefore describe uncertainty from the choice of test
patients, not from the choice of gallery. Percentages are 0-100.
"""
import numpy as np

# Resamples are drawn this many (resample, query) weights at a time, so memory stays bounded.
_WEIGHTS_PER_BLOCK = 2**23


# --------------------------------------------------------------------------------------------
# Patients
# --------------------------------------------------------------------------------------------
def group_codes(groups, n):
    """(n,) int codes 0..P-1 of the patient of each query; without groups each image is its
    own patient."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} patient ids for {n} queries; give one per query")
    return np.unique(groups.astype(str), return_inverse=True)[1].reshape(-1)


# --------------------------------------------------------------------------------------------
# Metrics as weighted means over queries
# --------------------------------------------------------------------------------------------
def _weighted_metrics(per_query, weights):
    """The bootstrapped metrics under query weights (B, Q), each an array (B,) in percent
    (NaN where a resample leaves a metric undefined, e.g. no query with a relevant item)."""
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum(1)  # (B,)
    out = {}
    hits = per_query["hits"]
    # Multi-label reports score R@K and mP@K over the queries with a relevant film ("scored").
    scored = per_query.get("scored")
    hit_weights = weights if scored is None else weights * scored
    hit_total = total if scored is None else hit_weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, k in enumerate(per_query["ks"]):
            out[("recall_at_k", str(k))] = 100.0 * (hit_weights @ (hits[:, i] > 0)) / hit_total
            out[("precision_at_k", str(k))] = 100.0 * (hit_weights @ (hits[:, i] / k)) / hit_total
    for key in ("ap", "map_at_r", "r_precision"):  # NaN where the query has no relevant item
        if key not in per_query:
            continue
        valid = ~np.isnan(per_query[key])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[("map" if key == "ap" else key,)] = (100.0 * (weights[:, valid] @ per_query[key][valid])
                                                     / weights[:, valid].sum(1))
    classes = per_query["classes"]
    truth = per_query["y_true"][:, None] == classes[None, :]  # (Q, C) one-hot true class
    support = weights @ truth  # (B, C)
    present = support > 0
    for k in per_query["vote_ks"]:
        predicted_onehot = per_query["votes"][k][:, None] == classes[None, :]  # (Q, C)
        true_positive = weights @ (truth & predicted_onehot)
        predicted = weights @ predicted_onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(support + predicted > 0, 2 * true_positive / (support + predicted), 0.0)
            out[("classification", str(k), "accuracy")] = 100.0 * true_positive.sum(1) / total
            # Macro: over the classes present in the (resampled) evaluated set only.
            out[("classification", str(k), "f1_macro")] = 100.0 * (f1 * present).sum(1) / present.sum(1)
    return out


def point_estimates(per_query):
    """The metrics of the evaluated set itself (every query weight 1), as floats."""
    return {key: float(value[0]) for key, value in
            _weighted_metrics(per_query, np.ones((1, len(per_query["y_true"])))).items()}


def _resample_weights(codes, n_resamples, seed):
    """Blocks of (b, Q) query weights: each of the P patients drawn P times with replacement."""
    rng = np.random.default_rng(seed)
    n_patients = int(codes.max()) + 1
    block = max(1, _WEIGHTS_PER_BLOCK // max(len(codes), n_patients))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=b)  # (b, P)
        yield counts[:, codes]


def _check_resamples(n_resamples):
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ValueError(f"the number of bootstrap resamples must be an integer of at least 2, "
                         f"got {n_resamples!r} (1000 to 10000 is usual)")


def _nest(flat):
    """{("classification", "5", "accuracy"): v} -> {"classification": {"5": {"accuracy": v}}}."""
    nested = {}
    for key, value in flat.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return nested


def _interval(samples, level):
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None, None
    tail = (100.0 - level) / 2
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap(per_query, groups=None, n_resamples=1000, seed=0, level=95.0):
    """Percentile confidence intervals for R@K, mAP, mP@K, vote accuracy and macro-F1 from a
    patient (cluster) bootstrap of the queries; see the module docstring for what it assumes.

    Returns {"method", "resamples", "level", "seed", "patients", "recall_at_k": {"K": {"estimate",
    "low", "high"}}, "map": {...}, "precision_at_k": {...}, "classification": {"k":
    {"accuracy": {...}, "f1_macro": {...}}}}.
    """
    _check_resamples(n_resamples)
    codes = group_codes(groups, len(per_query["y_true"]))
    estimates = point_estimates(per_query)
    samples = {key: [] for key in estimates}
    for weights in _resample_weights(codes, n_resamples, seed):
        for key, values in _weighted_metrics(per_query, weights).items():
            samples[key].append(values)
    flat = {}
    for key, estimate in estimates.items():
        low, high = _interval(np.concatenate(samples[key]), level)
        flat[key] = {"estimate": estimate, "low": low, "high": high}
    return {"method": "percentile bootstrap over patients (queries resampled by patient; "
                      "gallery and rankings held fixed)",
            "resamples": int(n_resamples), "level": float(level), "seed": int(seed),
            "patients": int(codes.max()) + 1, **_nest(flat)}


def paired_comparison(per_query_a, per_query_b, groups=None, n_resamples=1000, seed=0, level=95.0):
    """Difference A - B of every bootstrapped metric on the same queries, with a paired patient
    bootstrap: both models are scored on the same resampled patients, so what the two share
    (the hard patients) cancels. The p-value is two-sided, from the bootstrap distribution of
    the difference: 2 x the smaller share of resamples on either side of 0 (including 0),
    capped at 1; identical models give difference 0 and p = 1. A p-value of 0 means no
    resample fell on the other side: p < 2 / n_resamples.

    Returns {"method", "resamples", "level", "seed", "patients", <metric>: {"a", "b",
    "difference", "low", "high", "p_value"}} nested like bootstrap().
    """
    _check_resamples(n_resamples)
    n = len(per_query_a["y_true"])
    if len(per_query_b["y_true"]) != n or not np.array_equal(per_query_a["y_true"], per_query_b["y_true"]):
        raise ValueError("the two models were evaluated on different queries (labels differ); "
                         "compare embeddings of the same list")
    codes = group_codes(groups, n)
    estimates_a, estimates_b = point_estimates(per_query_a), point_estimates(per_query_b)
    differences = {key: [] for key in estimates_a}
    for weights in _resample_weights(codes, n_resamples, seed):
        metrics_a, metrics_b = _weighted_metrics(per_query_a, weights), _weighted_metrics(per_query_b, weights)
        for key in differences:
            differences[key].append(metrics_a[key] - metrics_b[key])
    flat = {}
    for key in estimates_a:
        samples = np.concatenate(differences[key])
        samples = samples[~np.isnan(samples)]
        low, high = _interval(samples, level)
        p_value = None
        if samples.size:
            p_value = float(min(1.0, 2.0 * min((samples <= 0).mean(), (samples >= 0).mean())))
        flat[key] = {"a": estimates_a[key], "b": estimates_b[key],
                     "difference": estimates_a[key] - estimates_b[key],
                     "low": low, "high": high, "p_value": p_value}
    return {"method": "paired percentile bootstrap over patients (both models on the same "
                      "resampled patients; gallery and rankings held fixed)",
            "resamples": int(n_resamples), "level": float(level), "seed": int(seed),
            "patients": int(codes.max()) + 1, **_nest(flat)}


# --------------------------------------------------------------------------------------------
# Per-class numbers
# --------------------------------------------------------------------------------------------
def per_class(per_query, class_names, groups=None):
    """R@1, AP and majority-vote recall of each class present among the queries, and their
    macro averages (over those classes only: an absent class has nothing to average).

    Returns {"classes": {name: {"queries", "patients", "recall_at_1", "ap", "vote_recall":
    {"k": %}}}, "macro": {"recall_at_1", "map", "vote_recall": {"k": %}}}; "ap" is the class's
    mAP (its queries' mean AP; None if none of them has a relevant item), so "macro"'s "map" is
    the class-balanced mAP and differs from the report's (query-weighted) "map".
    """
    if 1 not in per_query["ks"]:
        raise ValueError("per-class numbers need K = 1 among ks")
    hit_at_1 = per_query["hits"][:, per_query["ks"].index(1)] > 0
    y_true = per_query["y_true"]
    codes = group_codes(groups, len(y_true))
    rows = {}
    for value in per_query["classes"]:
        mask = y_true == value
        if not mask.any():
            continue
        ap = per_query["ap"][mask]
        rows[str(class_names[int(value)])] = {
            "queries": int(mask.sum()), "patients": int(len(np.unique(codes[mask]))),
            "recall_at_1": 100.0 * float(hit_at_1[mask].mean()),
            "ap": None if np.isnan(ap).all() else 100.0 * float(np.nanmean(ap)),
            "vote_recall": {str(k): 100.0 * float((per_query["votes"][k][mask] == value).mean())
                            for k in per_query["vote_ks"]}}
    aps = [row["ap"] for row in rows.values() if row["ap"] is not None]
    macro = {"recall_at_1": float(np.mean([row["recall_at_1"] for row in rows.values()])),
             "map": float(np.mean(aps)) if aps else None,
             "vote_recall": {str(k): float(np.mean([row["vote_recall"][str(k)] for row in rows.values()]))
                             for k in per_query["vote_ks"]}}
    return {"classes": rows, "macro": macro}


# --------------------------------------------------------------------------------------------
# Abstention
# --------------------------------------------------------------------------------------------
def risk_coverage(correct, confidence):
    """Risk-coverage curve of a classifier that answers only when its confidence reaches a
    threshold, for every threshold at a distinct confidence value (tied queries are answered
    or abstained on together).

    Returns {"threshold": [...], "coverage": [%], "risk": [% wrong among the answered],
    "aurc": area under risk (%) over coverage (0-1), the step curve from coverage 0 to 1}.
    A lower AURC means the confidence ranks errors last; a confidence that knows nothing gives
    about the full-coverage risk.
    """
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    if correct.shape != confidence.shape or correct.ndim != 1 or correct.size == 0:
        raise ValueError("correct and confidence must be 1-D arrays of the same non-zero length")
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, errors = confidence[order], np.cumsum(~correct[order])
    # The last query of each run of equal confidence: where a threshold can stop.
    ends = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    answered = ends + 1
    coverage = answered / correct.size
    risk = errors[ends] / answered
    aurc = float(np.sum(risk * np.diff(np.r_[0.0, coverage])))
    return {"threshold": sorted_conf[ends].tolist(), "coverage": (100.0 * coverage).tolist(),
            "risk": (100.0 * risk).tolist(), "aurc": 100.0 * aurc}


def expected_calibration_error(correct, confidence, n_bins=10):
    """ECE of a confidence in [0, 1]: sum over equal-width bins (lo, hi] of
    (share of queries in the bin) x |accuracy - mean confidence| in the bin, in percent, with
    the bins for a reliability diagram."""
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    # (lo, hi] bins; the small offset keeps a share of exactly 3/10 in (0.2, 0.3].
    index = np.clip(np.ceil(confidence * n_bins - 1e-9).astype(int) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = index == b
        if not mask.any():
            continue
        accuracy, mean_conf = correct[mask].mean(), confidence[mask].mean()
        ece += mask.mean() * abs(accuracy - mean_conf)
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(mask.sum()),
                     "confidence": 100.0 * float(mean_conf), "accuracy": 100.0 * float(accuracy)})
    return 100.0 * float(ece), bins


def abstention(per_query, vote_k, abstain_below=None, ood_scores=None):
    """Abstention of the majority vote at k = vote_k: its risk-coverage curve and AURC when it
    abstains below a vote share, the ECE of the vote share, and, with abstain_below, the
    operating point (coverage, accuracy of the answered queries). ood_scores ({name: (Q,)},
    higher = more out-of-distribution) add one curve per score, abstaining on the most
    out-of-distribution queries first."""
    if vote_k not in per_query["vote_ks"]:
        raise ValueError(f"vote k {vote_k} was not evaluated; choose one of {list(per_query['vote_ks'])}")
    correct = per_query["votes"][vote_k] == per_query["y_true"]
    share = per_query["vote_share"][vote_k]
    ece, bins = expected_calibration_error(correct, share)
    result = {"vote_k": int(vote_k), "confidence": "vote share",
              "accuracy_full_coverage": 100.0 * float(correct.mean()),
              "risk_coverage": risk_coverage(correct, share), "ece": ece, "reliability": bins}
    if abstain_below is not None:
        answered = share >= abstain_below
        result["operating_point"] = {
            "abstain_below": float(abstain_below), "coverage": 100.0 * float(answered.mean()),
            "abstained": int((~answered).sum()),
            "accuracy_answered": 100.0 * float(correct[answered].mean()) if answered.any() else None}
    if ood_scores:
        result["ood"] = {name: risk_coverage(correct, -np.asarray(score, dtype=np.float64))
                         for name, score in ood_scores.items()}
    return result


# --------------------------------------------------------------------------------------------
# Binomial rates
# --------------------------------------------------------------------------------------------
Z95 = 1.959963984540054


# ---------------------------------------------------------------------- intervals
def wilson(successes, n, z=Z95):
    """95% Wilson score interval [low, high] of successes / n (successes may be fractional)."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denominator
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]
