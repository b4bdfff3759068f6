"""How well an explanation map localises the finding of the image at hand, and how faithful it
is, each beside what an answer that never looks at that image scores on the same images.

Why the baselines: findings have usual places (COVID-19 lower and peripheral, effusion basal), so
a map that always points at the lower lung already hits most of those lesions. Only the part of
the hit rate that a map cannot get without the image at hand says the map localises:

- pointing game: the map's peak inside the lesion mask dilated by a tolerance stated in pixels
  (a fraction of the image width: 5% by default, 10% as well for comparison);
- chance: the exact probability that a uniformly random lung point hits, per image
  (dilated lesion area within the lungs / lung area), averaged over the images: expected hits,
  not one random draw;
- prior point: the best fixed point per class (normalised image coordinates), fitted on the
  lesion masks of another list than the one that reports (fit_prior); never fitted on the
  reported images;
- mismatched: each image's peak scored against the lesions of the *other* images of its class
  (mismatched_hits). A map that ignores the image scores the same on its own lesion as on the
  others', so image-specific gain = own - mismatched is ~0 for it: the headline number;
- zone agreement beside the most frequent lesion zone of the class (zone prior).

Rates come with 95% Wilson intervals (fractional counts, e.g. expected hits, are allowed);
differences of paired per-image values (gains, faithfulness advantages) with a t interval over
the per-image differences, since both numbers come from the same images.

Faithfulness (deletion and insertion against their own baselines) is in faithfulness.py.
"""
from collections import Counter

import numpy as np
from scipy import ndimage, stats

from cxr import regions
from cxr.report_stats import wilson

DEFAULT_TOLERANCE = 0.05  # fraction of the image width (--pointing-tolerance)
COMPARISON_TOLERANCE = 0.10  # the wider target reported beside it
PRIOR_GRID = 256  # candidate fixed points: the centres of a PRIOR_GRID^2 grid over the image


def tolerances(primary=DEFAULT_TOLERANCE):
    """{aggregate/record key: tolerance as a fraction of the image width}."""
    return {"pointing_game": primary, "pointing_game_at_10pct": COMPARISON_TOLERANCE}


def rate(values):
    """{"rate", "ci95" (Wilson), "n"} of 0/1 values or per-image probabilities; None if empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"rate": float(np.mean(values)), "ci95": wilson(sum(values), len(values)), "n": len(values)}


def paired_difference(a, b):
    """{"mean", "ci95", "n"} of a - b over paired per-image values (pairs with a None dropped);
    the interval is mean +- t(0.975, n-1) * standard error, None for fewer than two pairs."""
    d = np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], dtype=np.float64)
    if d.size == 0:
        return None
    mean = float(d.mean())
    if d.size < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(d.size)}


# ---------------------------------------------------------------------- one lesion
def to_unit(xy, size):
    """Pixel (x, y) of an image of `size` (H, W) -> normalised (x, y) of the pixel's centre."""
    return ((xy[0] + 0.5) / size[1], (xy[1] + 0.5) / size[0])


def to_pixel(unit_xy, size):
    """Normalised (x, y) -> the pixel (x, y) of an image of `size` (H, W) that contains it."""
    return (min(int(unit_xy[0] * size[1]), size[1] - 1), min(int(unit_xy[1] * size[0]), size[0] - 1))


class Lesion:
    """One lesion mask, with its distance map computed once for every point and tolerance
    scored against it. Tolerances are fractions of this image's width, so the target is the
    same share of the image whatever its resolution."""

    def __init__(self, mask):
        self.mask = np.asarray(mask, dtype=bool)
        self.size = self.mask.shape
        self.distance = ndimage.distance_transform_edt(~self.mask)  # 0 inside the lesion

    def target(self, fraction):
        """The lesion dilated by `fraction` of the width (as regions.pointing_hit)."""
        return self.distance <= fraction * self.size[1]

    def hit(self, unit_xy, fraction):
        x, y = to_pixel(unit_xy, self.size)
        return bool(self.distance[y, x] <= fraction * self.size[1])

    def chance(self, lungs, fraction):
        """Probability that a uniformly random lung pixel hits: the dilated lesion's area within
        the lungs over the lung area; None without lungs."""
        if lungs is None or not lungs.any():
            return None
        return float((self.target(fraction) & lungs).sum() / lungs.sum())


def lesion_check(full, mask, size, branches, top_zone, tolerance_keys, prior=None, label=None):
    """The pointing game of one image with a lesion mask, per tolerance (tolerance_keys, see
    tolerances()): whether each branch's peak hits, the chance level, whether the class's prior
    point hits (None without a fitted prior); "mismatched" is filled in after the batch
    (mismatched_hits). With lungs: the lesion's zones and whether the map's top zone is one."""
    lesion = Lesion(regions._fit(mask["lesion"], size))
    lungs = regions._fit(mask.get("lungs"), size)
    peaks = {b: to_unit(np.unravel_index(int(full[b].argmax()), size)[::-1], size) for b in branches}
    points = (prior or {}).get("points") or {}
    result = {"image_size": [int(size[1]), int(size[0])]}  # [width, height], as peak_xy
    for key, fraction in tolerance_keys.items():
        point = points.get(key, {}).get(label)
        result[key] = {"tolerance": fraction, "tolerance_px": fraction * size[1],
                       "hits": {b: lesion.hit(peaks[b], fraction) for b in branches},
                       "chance": lesion.chance(lungs, fraction),
                       "prior_point": lesion.hit(point, fraction) if point is not None else None,
                       "mismatched": None}
    if lungs is not None and lungs.any():
        sides = mask.get("sides")  # per-lung masks (CheXmask) assign the zones to sides
        sides = {k: regions._fit(m, size) for k, m in sides.items()} if sides else None
        truth = regions.lesion_zones(lesion.mask, lungs, sides=sides)
        result.update(lesion_zones=truth, zone_agrees=top_zone in truth)
    return result


# ---------------------------------------------------------------------- baselines across images
def mismatched_hits(records, load_lesion, tolerance_keys, branches):
    """Each lesion record's peaks against the lesions of the other records of its label: sets
    record["lesion"][key]["mismatched"][branch] to the fraction of those lesions hit (None
    where the label has a single lesion image). `load_lesion(name, (H, W))` reads a record's
    lesion mask again (one at a time: a batch's masks are not all kept in memory)."""
    groups = {}
    for record in records:
        if "lesion" in record:
            groups.setdefault(record["label"], []).append(record)
    for group in groups.values():
        if len(group) < 2:
            continue
        peaks = [{b: to_unit(r["peaks"][b], r["lesion"]["image_size"][::-1]) for b in branches} for r in group]
        hits = np.zeros((len(group), len(tolerance_keys), len(branches)))
        for j, other in enumerate(group):
            lesion = Lesion(load_lesion(other["image"], tuple(other["lesion"]["image_size"][::-1])))
            for i in range(len(group)):
                if i != j:
                    hits[i] += [[lesion.hit(peaks[i][b], f) for b in branches] for f in tolerance_keys.values()]
        hits /= len(group) - 1
        for i, record in enumerate(group):
            for t, key in enumerate(tolerance_keys):
                record["lesion"][key]["mismatched"] = {b: float(hits[i, t, k]) for k, b in enumerate(branches)}


def fit_prior(samples, tolerance_keys, grid=PRIOR_GRID):
    """The location prior of each label from `samples` = (label, lesion, lungs, sides) of the
    fitting images (lungs and sides may be None; images without a lesion are skipped): per
    tolerance, the grid point (normalised [x, y]) inside the most dilated lesions, with its hit
    rate on the fitting images; and the most frequent lesion zone. Ties go to the first point
    in row-major order and to the first zone of regions.ZONES."""
    counts, zones, numbers = {}, {}, Counter()
    centres = (np.arange(grid) + 0.5) / grid
    for label, lesion, lungs, sides in samples:
        if lesion is None or not np.asarray(lesion).any():
            continue
        lesion = Lesion(lesion)
        numbers[label] += 1
        rows = np.minimum((centres * lesion.size[0]).astype(int), lesion.size[0] - 1)
        cols = np.minimum((centres * lesion.size[1]).astype(int), lesion.size[1] - 1)
        for key, fraction in tolerance_keys.items():
            hit = lesion.target(fraction)[np.ix_(rows, cols)]  # each grid point, scored exactly
            counts.setdefault(key, {}).setdefault(label, np.zeros((grid, grid), np.int64))
            counts[key][label] += hit
        if lungs is not None and np.asarray(lungs).any():
            lungs = regions._fit(lungs, lesion.size)
            sides = {k: regions._fit(m, lesion.size) for k, m in sides.items()} if sides else None
            zones.setdefault(label, Counter()).update(regions.lesion_zones(lesion.mask, lungs, sides=sides))
    points, fit_rate = {}, {}
    for key, by_label in counts.items():
        points[key], fit_rate[key] = {}, {}
        for label, count in by_label.items():
            row, col = np.unravel_index(int(count.argmax()), count.shape)
            points[key][label] = [float(centres[col]), float(centres[row])]
            fit_rate[key][label] = float(count[row, col] / numbers[label])
    return {"points": points, "fit_hit_rate": fit_rate, "zones": {k: most_frequent(c) for k, c in zones.items()},
            "num_images": dict(numbers)}


def most_frequent(counter):
    """The zone counted most often (ties: regions.ZONES order); None for an empty count."""
    best = max(regions.ZONES, key=lambda z: (counter.get(z, 0), -regions.ZONES.index(z)))
    return best if counter.get(best, 0) > 0 else None


def zone_prior_agreement(records, prior=None):
    """record["lesion"]["prior_zone_agrees"]: whether the class's most frequent lesion zone is
    one of this lesion's zones. The zone comes from the fitted prior when there is one, else
    from the other lesion images of the same label in the batch (leave-one-out, so no image
    scores a prior it helped to fit). Returns where the zones came from."""
    with_zones = [r for r in records if "lesion_zones" in r.get("lesion", {})]
    if prior is not None:
        for r in with_zones:
            zone = prior["zones"].get(r["label"])
            r["lesion"]["prior_zone_agrees"] = (zone in r["lesion"]["lesion_zones"]) if zone else None
        return "fitting list"
    totals = {}
    for r in with_zones:
        totals.setdefault(r["label"], Counter()).update(r["lesion"]["lesion_zones"])
    for r in with_zones:
        others = totals[r["label"]] - Counter(r["lesion"]["lesion_zones"])
        zone = most_frequent(others)
        r["lesion"]["prior_zone_agrees"] = (zone in r["lesion"]["lesion_zones"]) if zone else None
    return "other images of the same label in this batch (leave-one-out)"


# ---------------------------------------------------------------------- aggregate
def pointing_summary(records, key, branches):
    """Rates of one tolerance over `records` (all with a lesion)."""
    blocks = [r["lesion"][key] for r in records]
    mismatched = {b: [(x["mismatched"] or {}).get(b) for x in blocks] for b in branches}
    own = {b: [float(x["hits"][b]) for x in blocks] for b in branches}
    prior = [x["prior_point"] for x in blocks]
    return {
        "num_images": len(blocks),
        "map": {b: rate(own[b]) for b in branches},
        "chance": rate(x["chance"] for x in blocks),
        "prior_point": rate(prior),
        "mismatched": {b: rate(mismatched[b]) for b in branches},
        "image_specific_gain": {b: paired_difference(own[b], mismatched[b]) for b in branches},
        "gain_over_prior_point": {b: paired_difference(own[b], prior) for b in branches},
    }


def lesion_aggregate(records, branches, tolerance_keys, prior=None, zones_from=None):
    """The aggregate keys of the images with a lesion mask (explain.aggregate), overall and per
    label. `prior`: the fitted location prior or None (its baseline is then null)."""
    with_lesion = [r for r in records if "lesion" in r]
    if not with_lesion:
        return {}
    labels = sorted({str(r["label"]) for r in with_lesion})

    def per_label(summarise):
        return {"overall": summarise(with_lesion),
                "by_label": {label: summarise([r for r in with_lesion if str(r["label"]) == label])
                             for label in labels}}

    out = {"num_with_lesion": len(with_lesion)}
    for key, fraction in tolerance_keys.items():
        out[key] = {"tolerance": fraction, **per_label(lambda rs, key=key: pointing_summary(rs, key, branches))}
    main = out["pointing_game"]
    pneumonia = next((label for label in labels if label.lower() == "pneumonia"), None)
    out["image_specific_gain"] = {
        "branch": "fused", "tolerance": tolerance_keys["pointing_game"],
        "overall": main["overall"]["image_specific_gain"]["fused"],
        "pneumonia": main["by_label"][pneumonia]["image_specific_gain"]["fused"] if pneumonia else None,
        "by_label": {label: s["image_specific_gain"]["fused"] for label, s in main["by_label"].items()}}

    def zones(rs):
        rs = [r["lesion"] for r in rs if "zone_agrees" in r["lesion"]]
        return {"map": rate(x["zone_agrees"] for x in rs), "prior_zone": rate(x.get("prior_zone_agrees") for x in rs)}

    out["zone_agreement"] = per_label(zones)
    out["location_prior"] = {
        "fitted_on": prior["fitted_on"] if prior else None,
        "points": prior["points"] if prior else None,
        "fit_hit_rate": prior["fit_hit_rate"] if prior else None,
        "num_fitting_images": prior["num_images"] if prior else None,
        "zones": prior["zones"] if prior else None, "zones_from": zones_from,
        "note": None if prior else ("prior point not computed: no --prior-image-list, and no --split with "
                                    "lesion masks (it is never fitted on the images that report)")}
    return out
