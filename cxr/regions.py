"""Region statistics of a saliency map from lung and heart masks (CheXmask-style binary PNGs).

    stats = region_statistics(saliency, lungs, heart)     # all (H, W); masks bool or None

    stats = region_statistics(saliency, lungs, heart, sides={"right": r, "left": l})

Zones: each lung (right = the patient's right = image left on a PA film) split into upper,
middle and lower thirds of its own height, as radiologists split a lung into zones. The two
lungs are told apart by the midline of the lung fields (midpoint of their horizontal extent),
or, when the masks come per lung (CheXmask's Right Lung and Left Lung), by those masks: a
rotated patient's lung may cross the midline of the fields.
Shares are fractions of the map's total positive activation. Without masks the statistics
that need them are None: absent, never guessed.
"""
import numpy as np
from PIL import Image
from scipy import ndimage

SIDES = ("right", "left")  # patient sides
LEVELS = ("upper", "middle", "lower")
ZONES = tuple(f"{side}_{level}" for side in SIDES for level in LEVELS)


def load_mask(path, size=None):
    """A binary mask PNG as bool (H, W), resized (nearest) to `size` = (H, W) if given."""
    with Image.open(path) as image:
        mask = image.convert("L")
        if size is not None and mask.size != (size[1], size[0]):
            mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return np.asarray(mask) > 127


def cardiothoracic_ratio(lungs, heart):
    """Widest horizontal extent of the heart / widest extent of the lung fields (inner thoracic
    width), from the masks; None when either mask is empty."""
    lung_cols, heart_cols = np.flatnonzero(lungs.any(axis=0)), np.flatnonzero(heart.any(axis=0))
    if lung_cols.size == 0 or heart_cols.size == 0:
        return None
    return float((heart_cols[-1] - heart_cols[0] + 1) / (lung_cols[-1] - lung_cols[0] + 1))


def zone_map(lungs, sides=None):
    """(H, W) int array: index into ZONES for lung pixels, -1 elsewhere; plus the midline column.
    `sides` = {"right": mask, "left": mask} (patient sides) assigns the lungs instead of the
    midline."""
    zones = np.full(lungs.shape, -1, dtype=np.int64)
    cols = np.flatnonzero(lungs.any(axis=0))
    if cols.size == 0:
        return zones, None
    midline = (cols[0] + cols[-1]) / 2
    column = np.arange(lungs.shape[1])[None, :]
    rows = np.arange(lungs.shape[0])[:, None]
    if sides is not None:
        halves = (_fit(sides["right"], lungs.shape), _fit(sides["left"], lungs.shape))
    else:
        halves = (column < midline, column >= midline)  # image left = patient right
    for s, half in enumerate(halves):
        lung = lungs & half
        lung_rows = np.flatnonzero(lung.any(axis=1))
        if lung_rows.size == 0:
            continue
        top, height = lung_rows[0], lung_rows[-1] - lung_rows[0] + 1
        level = np.clip(((rows - top) * 3) // height, 0, 2)
        zones[lung] = (3 * s + np.broadcast_to(level, lungs.shape))[lung]
    return zones, midline


def peripheral_band(lungs, midline, fraction=1 / 3):
    """Lung pixels in the outer `fraction` of each lung's width (towards the chest wall)."""
    cols = np.flatnonzero(lungs.any(axis=0))
    column = np.broadcast_to(np.arange(lungs.shape[1])[None, :], lungs.shape)
    right_edge = cols[0] + fraction * (midline - cols[0])  # patient right: image left
    left_edge = cols[-1] - fraction * (cols[-1] - midline)
    return lungs & ((column <= right_edge) | (column >= left_edge))


def region_statistics(saliency, lungs=None, heart=None, salient=0.0, sides=None):
    """Statistics of a non-negative (H, W) map; masks of another size are resized to it.
    `salient` > 0 keeps only the salient region, the pixels at or above that fraction of the
    map's maximum (a dense map otherwise spreads every share towards the regions' areas).
    `sides`: per-lung masks {"right", "left"} (patient sides) for the zones (see zone_map)."""
    saliency = np.clip(np.asarray(saliency, dtype=np.float64), 0, None)
    if salient > 0:
        saliency = np.where(saliency >= salient * saliency.max(), saliency, 0.0)
    size = saliency.shape
    lungs = _fit(lungs, size)
    heart = _fit(heart, size)
    total = saliency.sum()
    peak_row, peak_col = np.unravel_index(int(np.argmax(saliency)), size)
    stats = {"peak_xy": [int(peak_col), int(peak_row)], "lungs_share": None, "heart_share": None,
             "outside_share": None, "zones": None, "top_zone": None, "peak_zone": None,
             "right_lung_share": None, "left_lung_share": None, "lower_share": None,
             "peripheral_share": None, "dominant_lung_share": None, "top_zone_share": None,
             "peak_level": None, "ctr": None}

    def share(mask):
        return float(saliency[mask].sum() / total) if total > 0 else 0.0

    if heart is not None:
        stats["heart_share"] = share(heart)
    if lungs is not None and lungs.any():
        stats["lungs_share"] = share(lungs)
        if heart is not None:
            stats["outside_share"] = share(~(lungs | heart))
        zones, midline = zone_map(lungs, sides)
        in_lungs = saliency[lungs].sum()
        mass = {zone: float(saliency[zones == i].sum()) for i, zone in enumerate(ZONES)}
        stats["zones"] = {zone: (m / in_lungs if in_lungs > 0 else 0.0) for zone, m in mass.items()}
        if in_lungs > 0:
            # Most activated = highest mean activation: zones differ in size (the lower ones are
            # cut by the domes and the heart), so the largest zone would win on total mass.
            density = {z: mass[z] / max((zones == i).sum(), 1) for i, z in enumerate(ZONES)}
            stats["top_zone"] = max(ZONES, key=lambda zone: density[zone])
            stats["right_lung_share"] = sum(stats["zones"][z] for z in ZONES[:3])
            stats["left_lung_share"] = sum(stats["zones"][z] for z in ZONES[3:])
            stats["lower_share"] = stats["zones"]["right_lower"] + stats["zones"]["left_lower"]
            stats["peripheral_share"] = float(saliency[peripheral_band(lungs, midline)].sum() / in_lungs)
            stats["dominant_lung_share"] = max(stats["right_lung_share"], stats["left_lung_share"])
            stats["top_zone_share"] = stats["zones"][stats["top_zone"]]
        peak = zones[peak_row, peak_col]
        stats["peak_zone"] = ZONES[peak] if peak >= 0 else None
        stats["peak_level"] = stats["peak_zone"].split("_")[1] if peak >= 0 else "outside"
    if lungs is not None and heart is not None:
        stats["ctr"] = cardiothoracic_ratio(lungs, heart)
    return stats


def lesion_zones(lesion, lungs, min_share=0.25, sides=None):
    """Zones holding at least `min_share` of a lesion mask's lung pixels (and always the one
    holding most): the ground truth for zone agreement."""
    lesion, lungs = _fit(lesion, lungs.shape), lungs
    zones, _ = zone_map(lungs, sides)
    counts = np.array([(lesion & (zones == i)).sum() for i in range(len(ZONES))], dtype=np.float64)
    if counts.sum() == 0:
        return []
    shares = counts / counts.sum()
    return [ZONES[i] for i in range(len(ZONES)) if shares[i] >= min_share or i == shares.argmax()]


def pointing_hit(point_xy, lesion, tolerance):
    """Whether the point lies inside the lesion mask dilated by `tolerance` pixels."""
    x, y = point_xy
    distance = ndimage.distance_transform_edt(~lesion)  # 0 inside the lesion
    return bool(distance[y, x] <= tolerance)


def _fit(mask, size):
    if mask is None:
        return None
    mask = np.asarray(mask).astype(bool)
    if mask.shape != tuple(size):
        image = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)
        mask = np.asarray(image) > 127
    return mask
