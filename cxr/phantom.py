"""Synthetic chest X-ray phantoms: the embedded ``demo`` dataset.

``python train.py --dataset demo`` trains on these images, so the repo runs end to
end on a fresh machine with no real data. Each phantom is a PA chest radiograph
*as displayed*: the patient's right lung is on the image LEFT, the heart bulges
mostly to the image RIGHT, the right hemidiaphragm sits a little higher.

Classes (``CLASSES``, in this order) and what they look like:

* ``normal``       -- no finding, cardiothoracic ratio (CTR) about 0.38-0.48.
* ``pneumonia``    -- one dense, roughly round/lobar consolidation with soft edges
                      in ONE lung (random side and zone), clipped by the pleura.
* ``COVID-19``     -- bilateral, peripheral, lower-zone ground-glass haze: several
                      faint mottled patches near the lateral edges of both bases.
* ``effusion``     -- basal opacity in one (sometimes both) costophrenic angle with
                      a concave-up meniscus that climbs the lateral chest wall.
* ``cardiomegaly`` -- enlarged heart, CTR about 0.58-0.70.

Every image also varies in pose, scale, lung/heart shape, rib pattern, contrast,
brightness, gamma, noise and blur, and carries class-independent confounders
(breast shadows, vascular markings, lung mottling, ECG leads, gastric bubble), so
the findings are learnable but not trivial.

API
    make_phantom(rng, label, size) -> (image, masks)
    make_phantom_with_info(rng, label, size) -> (image, masks, info)
    make_phantom_with_info(rng, label, size, ctr_ranges={"normal": (lo, hi), ...})
        # opt-in CTR ranges per class (rule_check.py's borderline hearts); default unchanged

demo_dataset.py writes them to disk as a data set; regions.cardiothoracic_ratio measures the CTR.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from cxr.regions import cardiothoracic_ratio

CLASSES = ("normal", "pneumonia", "COVID-19", "effusion", "cardiomegaly")


ZONES = ("upper", "middle", "lower")


MASK_NAMES = ("lungs", "heart", "lesion")


# CTR ranges sampled per class (measured CTR from the masks lands close to these).
_CTR_NORMAL = (0.38, 0.48)


_CTR_CARDIOMEGALY = (0.58, 0.70)


# ----------------------------------------------------------------------------
# Small numeric helpers
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, cached because every phantom of a size reuses them."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below edge0, 1 above edge1, smooth in between (edges may be reversed)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur as a sum of shifted slices, borders extended.

    Plain numpy on purpose: a BLAS matrix product would be shorter, but threaded
    BLAS slows to a crawl when the CPU is shared (e.g. with a training process).
    """
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    n = img.shape[0]
    for axis in (0, 1):
        pad = [(radius, radius) if ax == axis else (0, 0) for ax in (0, 1)]
        padded = np.pad(img, pad, mode="edge")
        img = sum(w * (padded[i : i + n] if axis == 0 else padded[:, i : i + n]) for i, w in enumerate(taps))
    return img


def _wide_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large ``sigma`` (pixels), done cheaply at a quarter of the resolution."""
    n = img.shape[0]
    small = Image.fromarray(img.astype(np.float32)).resize((n // 4,) * 2, Image.Resampling.BOX)
    small = _gaussian_blur(np.asarray(small), sigma / 4)
    return np.asarray(Image.fromarray(small).resize((n, n), Image.Resampling.BILINEAR))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)) / 1.5


# ----------------------------------------------------------------------------
# Anatomy, in a "body frame": x in units of the thoracic half-width (negative =
# image left = patient right), y = 0 at the lung apices and 1 at the right
# costophrenic angle. The patient is drawn upright, where x depends only on the
# column and y only on the row, so most shape functions are 1-D and broadcast;
# the small tilt of a real patient is applied at the end as one affine warp.
# ----------------------------------------------------------------------------
class _Frame:
    """Pose of one phantom: position, scale and tilt of the body frame in the image."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        self.cx = size * (0.5 + rng.uniform(-0.03, 0.03))
        self.cy = size * (0.52 + rng.uniform(-0.03, 0.03))
        self.hw = size * rng.uniform(0.36, 0.42)  # thoracic half-width in pixels
        self.h = size * rng.uniform(0.52, 0.60)  # apex-to-costophrenic height in pixels
        self.angle = math.radians(rng.uniform(-3.0, 3.0))  # patient slightly tilted
        # The upright canvas has a margin, so tilting never pulls empty corners in.
        self.pad = math.ceil(0.04 * size)
        self.canvas = size + 2 * self.pad
        centres = np.arange(self.canvas, dtype=np.float32) + 0.5 - self.pad
        self.xb = ((centres - self.cx) / self.hw)[None, :]  # (1, canvas)
        self.yb = ((centres - self.cy) / self.h + 0.5)[:, None]  # (canvas, 1)

    def to_canvas(self, xb: np.ndarray, yb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Body frame -> upright canvas pixels (for PIL drawing)."""
        return self.cx + self.pad + xb * self.hw, self.cy + self.pad + (yb - 0.5) * self.h

    def tilt(self, canvas: np.ndarray) -> np.ndarray:
        """Rotate an upright canvas about the thorax centre and crop it to the output size."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        cx, cy = self.cx, self.cy
        # Output pixel (x, y) samples the canvas at centre + R(-angle) (p - centre) + pad.
        affine = (c, s, cx - c * cx - s * cy + self.pad, -s, c, cy + s * cx - c * cy + self.pad)
        out = (self.size, self.size)
        if canvas.dtype == bool:  # masks stay binary
            im = Image.fromarray(canvas.astype(np.uint8) * 255)
            return np.asarray(im.transform(out, Image.Transform.AFFINE, affine, Image.Resampling.NEAREST)) > 127
        im = Image.fromarray(canvas.astype(np.float32))
        return np.asarray(im.transform(out, Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR))

    def tilted_x(self) -> np.ndarray:
        """Body-frame x of every output pixel (its sign tells the patient side)."""
        xs, ys = _pixel_grid(self.size)
        return ((xs - self.cx) * math.cos(self.angle) + (ys - self.cy) * math.sin(self.angle)) / self.hw


def _lung_params(rng: np.random.Generator, drop: float) -> dict[str, float]:
    """Random shape of one lung; ``drop`` lowers its hemidiaphragm (left side)."""
    p = {
        "lateral": rng.uniform(0.90, 1.0),  # lateral extent near the base
        "apex_lateral": rng.uniform(0.52, 0.64),  # lateral extent at the apex level
        "medial_base": rng.uniform(0.07, 0.11),  # medial border near the spine at the base
        "medial_top": rng.uniform(0.07, 0.12),  # extra mediastinal width at the top
        "lateral_power": rng.uniform(2.5, 3.5),  # how fast the lateral border bulges out
        "cp": 1.0 + drop,  # costophrenic angle level
        "dome_height": rng.uniform(0.12, 0.20),
        "dome_peak": rng.uniform(0.4, 0.6),  # where the dome peaks, 0 = lateral, 1 = medial
        "apex_height": rng.uniform(0.8, 1.1),  # apex dome height / its half-width
    }
    p["cardiophrenic"] = p["cp"] - rng.uniform(0.05, 0.10)
    return p


def _medial_border(p: dict[str, float], yb: np.ndarray) -> np.ndarray:
    """Mediastinal edge of the lung: wider at the top (great vessels), near the spine below."""
    return p["medial_base"] + p["medial_top"] * (1.0 - np.clip(yb, 0.0, 1.0)) ** 2


def _lateral_border(p: dict[str, float], yb: np.ndarray) -> np.ndarray:
    """Chest-wall edge of the lung: narrow at the apex, bulging out to ``lateral`` at the base."""
    t = np.clip(yb / p["cp"], 0.0, 1.0)
    return p["apex_lateral"] + (p["lateral"] - p["apex_lateral"]) * (1.0 - (1.0 - t) ** p["lateral_power"])


def _dome(p: dict[str, float], a: np.ndarray) -> np.ndarray:
    """Hemidiaphragm level as a function of distance from the midline ``a``.

    It meets the lateral border at a sharp costophrenic angle, peaks in the middle
    and comes down to the cardiophrenic angle medially; beyond the lung it slopes
    down the chest wall.
    """
    u = np.clip((p["lateral"] - a) / (p["lateral"] - p["medial_base"]), 0.0, 1.0)
    q = math.log(0.5) / math.log(p["dome_peak"])  # puts the top of the dome at dome_peak
    dome = p["cp"] + (p["cardiophrenic"] - p["cp"]) * u - p["dome_height"] * np.sin(np.pi * u**q)
    return dome + 0.5 * np.maximum(a - p["lateral"], 0.0)


def _lung_region(p: dict[str, float], a: np.ndarray, yb: np.ndarray, frame: _Frame) -> np.ndarray:
    """One lung field (heart not yet removed) for distance-from-midline ``a``."""
    body = (yb >= 0) & (a > _medial_border(p, yb)) & (a < _lateral_border(p, yb)) & (yb < _dome(p, a))
    # Rounded apex: half-ellipse on top of the segment between medial and lateral borders.
    medial_top = p["medial_base"] + p["medial_top"]
    centre, radius = (p["apex_lateral"] + medial_top) / 2, (p["apex_lateral"] - medial_top) / 2
    radius_y = radius * frame.hw / frame.h * p["apex_height"]
    cap = (yb < 0) & (((a - centre) / radius) ** 2 + (yb / radius_y) ** 2 < 1.0)
    return body | cap


def _heart_region(
    rng: np.random.Generator, ctr: float, lung_r: dict, lung_l: dict, xb: np.ndarray, yb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cardiac silhouette whose width is ``ctr`` times the distance between the lung edges.

    Returns the mask and the relative height ``s`` (0 at the top, 1 on the diaphragm).
    """
    width = ctr * (lung_r["lateral"] + lung_l["lateral"])
    right = width * rng.uniform(0.30, 0.40)  # about a third projects to the patient's right
    left = width - right
    # Bigger hearts are also taller; the base sits just under the cardiophrenic angles.
    top = rng.uniform(0.30, 0.42) - 0.6 * (ctr - 0.43)
    bottom = max(lung_r["cardiophrenic"], lung_l["cardiophrenic"]) + rng.uniform(0.02, 0.05)
    s = (yb - top) / (bottom - top)

    def profile(peak: float, sag: float) -> np.ndarray:
        # Rounded top rising to full width at ``peak``, slightly narrower on the diaphragm.
        rise = np.sqrt(np.sin(0.5 * np.pi * np.clip(s / peak, 0.0, 1.0)))
        fall = 1.0 - sag * np.clip((s - peak) / (1.0 - peak), 0.0, 1.0) ** 2
        return np.where(s < peak, rise, fall)

    right_edge = right * profile(rng.uniform(0.55, 0.70), rng.uniform(0.1, 0.3))
    left_edge = left * profile(rng.uniform(0.70, 0.85), rng.uniform(0.05, 0.2))
    return (s >= 0) & (s <= 1) & (xb > -right_edge) & (xb < left_edge), s


def _rib_bands(phase: np.ndarray, duty: float) -> np.ndarray:
    """Periodic rib cross-section: a band of relative width ``duty`` per period, brighter cortex."""
    f = phase - np.floor(phase)
    band = _smoothstep(0.0, 0.12, f) * _smoothstep(duty, duty - 0.12, f)
    cortex = np.minimum(np.abs(2.0 * f / duty - 1.0), 1.0) ** 4  # near 1 at the rib edges
    return band * (0.7 + 0.3 * cortex)


def _draw_vessels(rng: np.random.Generator, frame: _Frame, hila: list[tuple[float, float]]) -> np.ndarray:
    """Vascular markings: branching lines fanning out from each hilum, thinner and fainter outward."""
    counts = rng.integers(7, 12, len(hila))
    start = np.repeat(np.array(hila), counts, axis=0)
    side = np.sign(start[:, 0])  # branches point laterally: -1 image left, +1 image right
    # Fan from up-lateral to down-lateral, mostly downward (basal vessels are bigger).
    angle = rng.uniform(-0.45 * np.pi, 0.55 * np.pi, len(start))
    canvas = Image.new("F", (frame.canvas, frame.canvas), 0.0)
    draw = ImageDraw.Draw(canvas)
    for depth in range(4):  # one generation of branches at a time, all trees together
        length = rng.uniform(0.14, 0.28, len(start)) * 0.75**depth
        end = start + length[:, None] * np.stack([side * np.cos(angle), np.sin(angle)], axis=1)
        x0, y0 = frame.to_canvas(start[:, 0], start[:, 1])
        x1, y1 = frame.to_canvas(end[:, 0], end[:, 1])
        width = max(1, round(max(1.0, frame.size / 110) * 0.7**depth))
        for line in zip(x0, y0, x1, y1):
            draw.line(line, fill=0.7**depth, width=width)
        # Each branch forks into one or two children that turn by up to ~30 degrees.
        parent = np.repeat(np.arange(len(start)), rng.integers(1, 3, len(start)))
        start, side = end[parent], side[parent]
        angle = angle[parent] + rng.uniform(-0.5, 0.5, len(parent))
    return np.asarray(canvas)


def _draw_ecg_leads(rng: np.random.Generator, size: int) -> np.ndarray:
    """Class-independent clutter: ECG electrodes (rings) with wires running off the image."""
    canvas = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(size / 200))
    for _ in range(rng.integers(2, 5)):
        x, y = rng.uniform(0.15, 0.85) * size, rng.uniform(0.1, 0.45) * size
        r = size * rng.uniform(0.012, 0.02)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=1.0, width=width)
        draw.ellipse([x - r / 3, y - r / 3, x + r / 3, y + r / 3], fill=1.0)
        # Wire: a sagging quadratic curve from the electrode to the top or a side edge.
        end = np.array([rng.choice([0.0, size]), rng.uniform(0, 0.6) * size])
        mid = (np.array([x, y]) + end) / 2 + rng.normal(0, 0.08 * size, 2)
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * np.array([x, y]) + 2 * (1 - t) * t * mid + t**2 * end
        draw.line([tuple(pt) for pt in pts], fill=0.6, width=width)
    return np.asarray(canvas)


def _finding(
    rng: np.random.Generator,
    label: str,
    xb: np.ndarray,
    yb: np.ndarray,
    lung_r: dict,
    lung_l: dict,
    lungs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Opacity of the finding (fraction of lung air it replaces, 0..1) and its lesion mask.

    Patches are centred on random pixels well inside the lung region where the finding
    belongs, so they always overlap the lung, even behind a big heart.
    """
    opacity = np.zeros(lungs.shape, np.float32)
    a, on_right = np.abs(xb), xb < 0
    rows = np.broadcast_to(yb, lungs.shape)
    interior = lungs & (_wide_blur(lungs, 0.02 * lungs.shape[0]) > 0.7)

    def pick(region: np.ndarray) -> tuple[float, float]:
        """(distance from midline, height) of a random pixel of ``region``, else of the lungs."""
        pixels = np.flatnonzero(region)
        row, col = divmod(rng.choice(pixels if pixels.size else np.flatnonzero(lungs)), lungs.shape[1])
        return abs(xb[0, col]), yb[row, 0]

    if label == "pneumonia":
        # Lobar-ish consolidation: a few overlapping soft-edged ellipses in one zone
        # (upper, middle or lower third) of one lung.
        sign = rng.choice([-1.0, 1.0])
        half = on_right if sign < 0 else ~on_right
        top, bottom = rows[lungs & half].min(), rows[lungs & half].max()
        zone = rng.integers(0, 3)
        lo, hi = top + (bottom - top) * (zone + 0.15) / 3, top + (bottom - top) * (zone + 0.85) / 3
        a0, y0 = pick(interior & half & (rows >= lo) & (rows <= hi))
        for _ in range(rng.integers(2, 5)):
            cx, cy = a0 + rng.normal(0, 0.08), y0 + rng.normal(0, 0.05)
            rx, ry = rng.uniform(0.16, 0.30), rng.uniform(0.10, 0.20)
            blob = _smoothstep(1.0, 0.55, np.hypot((a - cx) / rx, (yb - cy) / ry))
            opacity = np.maximum(opacity, blob * half)  # never spills into the other lung
        lesion = (opacity > 0.5) & lungs
        opacity *= rng.uniform(0.6, 0.9) * (0.85 + 0.15 * _smooth_noise(rng, lungs.shape[0], 16))
    elif label == "COVID-19":
        # Bilateral, peripheral, lower-zone ground glass: faint, mottled, patchy.
        for sign, p in ((-1.0, lung_r), (1.0, lung_l)):
            half = on_right if sign < 0 else ~on_right
            for _ in range(rng.integers(2, 5)):
                cx, cy = pick(interior & half & (rows > 0.68) & (a > 0.55 * p["lateral"]))
                rx, ry = rng.uniform(0.12, 0.22), rng.uniform(0.08, 0.14)
                patch = np.exp(-(((a - cx) / rx) ** 2) - ((yb - cy) / ry) ** 2)
                opacity = np.maximum(opacity, patch * half)
        lesion = (opacity > 0.5) & lungs
        opacity *= rng.uniform(0.3, 0.5) * (0.6 + 0.4 * _smooth_noise(rng, lungs.shape[0], 20))
    elif label == "effusion":
        # Fluid fills the costophrenic angle (usually one side, sometimes both); its
        # upper edge (meniscus) is concave up, climbing highest at the lateral chest wall.
        first = rng.choice([-1.0, 1.0])
        for sign in (-1.0, 1.0) if rng.random() < 0.25 else (first,):
            p, half = (lung_r, on_right) if sign < 0 else (lung_l, ~on_right)
            level = p["cp"] - rng.uniform(0.25, 0.55)  # meniscus height at the chest wall
            depth = rng.uniform(0.12, 0.3)  # how much lower it lies medially
            t = np.clip((p["lateral"] - a) / (p["lateral"] - p["medial_base"]), 0.0, 1.0)
            meniscus = level + depth * (1.0 - (1.0 - t) ** rng.uniform(2.5, 4.0))
            opacity = np.maximum(opacity, _smoothstep(meniscus - 0.01, meniscus + 0.03, yb) * half)
        lesion = (opacity > 0.5) & lungs
        opacity *= rng.uniform(0.75, 0.95)
    else:
        lesion = np.zeros_like(lungs)
    return opacity, lesion


def _describe_lesion(lesion: np.ndarray, lungs: np.ndarray, xb: np.ndarray) -> tuple[list, list]:
    """Patient side(s) holding the lesion and, per side, the zone of its centroid.

    ``xb`` is the body-frame x of each pixel (negative = image left = patient right).
    Zones are thirds of that lung's vertical extent in the mask (upper/middle/lower).
    A side counts if it holds at least 10% of the lesion pixels.
    """
    sides, zones = [], []
    total = lesion.sum()
    rows = np.broadcast_to(np.arange(lesion.shape[0])[:, None], lesion.shape)
    for side, half in (("right", xb < 0), ("left", xb >= 0)):
        part = lesion & half
        if total == 0 or part.sum() < 0.1 * total:
            continue
        lung_rows = rows[lungs & half]
        top, bottom = lung_rows.min(), lung_rows.max()
        rel = (rows[part].mean() - top) / max(bottom - top, 1)
        sides.append(side)
        zones.append(ZONES[int(np.clip(rel * 3, 0, 2))])
    return sides, zones


def make_phantom_with_info(
    rng: np.random.Generator, label: str, size: int, ctr_ranges: dict | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """One synthetic PA chest X-ray of class ``label``.

    Returns ``(image, masks, info)``: image float32 (size, size) in [0, 1]; masks
    ``{"lungs", "heart", "lesion"}`` bool (size, size) -- lungs exclude the heart,
    lesion is the finding region (empty for normal/cardiomegaly); info
    ``{"label", "ctr", "lesion_sides", "lesion_zones"}`` with CTR measured from the
    masks, and sides in PATIENT terms ("right" = image left) with one zone per side.
    ``ctr_ranges`` ({label: (low, high)}, opt-in) replaces the CTR range the heart width is
    drawn from for the labels it names; without it the phantoms are exactly the default ones.
    """
    findings = label.split("|")  # co-occurring findings, e.g. "cardiomegaly|effusion"
    if any(finding not in CLASSES for finding in findings) or ("normal" in findings and len(findings) > 1):
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}, or findings other than "
                         "normal joined by '|'")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    frame = _Frame(rng, size)
    xb, yb = frame.xb, frame.yb
    a = np.abs(xb)  # distance from the midline: both hemithoraces share one formula
    on_right = xb < 0  # patient right = image left

    # --- Masks -------------------------------------------------------------
    # The left hemidiaphragm sits lower than the right (liver under the right one).
    lung_r = _lung_params(rng, drop=0.0)
    lung_l = _lung_params(rng, drop=rng.uniform(0.04, 0.09))
    hemithorax = np.where(on_right, _lung_region(lung_r, a, yb, frame), _lung_region(lung_l, a, yb, frame))
    ctr_range = _CTR_CARDIOMEGALY if "cardiomegaly" in findings else _CTR_NORMAL
    if ctr_ranges is not None and label in ctr_ranges:  # opt-in: rule_check.py's borderline set
        ctr_range = ctr_ranges[label]
    heart, heart_s = _heart_region(rng, rng.uniform(*ctr_range), lung_r, lung_l, xb, yb)
    # Aortic knob: a round bulge of the left upper mediastinum, indenting the left lung.
    knob_r = rng.uniform(0.08, 0.12)
    knob_x, knob_y = rng.uniform(0.10, 0.14), rng.uniform(0.15, 0.25)
    knob = ((xb - knob_x) / knob_r) ** 2 + ((yb - knob_y) * frame.h / frame.hw / knob_r) ** 2 < 1.0
    lungs = hemithorax & ~heart & ~knob
    # Chest-wall line per side (float32 keeps every 2-D array below in float32).
    lateral = np.where(on_right, np.float32(lung_r["lateral"]), np.float32(lung_l["lateral"]))

    # --- Density (brighter = more attenuating), built additively -------------
    # Soft tissue: thicker (brighter) centrally, a neck on top and shoulders.
    neck, trunk = rng.uniform(0.26, 0.34), rng.uniform(1.12, 1.22)
    body_half = (
        neck
        + (trunk - neck) * _smoothstep(-0.55, -0.2, yb)
        + rng.uniform(0.15, 0.35) * np.exp(-(((yb + 0.12) / 0.12) ** 2))  # shoulders
        - 0.08 * _smoothstep(0.9, 1.5, yb)  # waist
    )
    thickness = np.sqrt(np.clip(1.0 - (a / body_half) ** 2, 0.0, 1.0))
    body = _smoothstep(0.0, 0.2, thickness)  # soft skin edge
    density = rng.uniform(0.50, 0.60) * body * (0.6 + 0.4 * thickness)

    # Solid organs -- heart, aortic knob, liver/abdomen under the domes -- share one
    # density, so the heart base merges into the diaphragm as on a real film and
    # the heart's top fades into the mediastinum.
    dome_level = np.where(on_right, _dome(lung_r, a), _dome(lung_l, a))
    centre = (lung_r["cardiophrenic"] + lung_l["cardiophrenic"]) / 2
    dome_level = np.where(a < 0.15, np.maximum(dome_level, centre), dome_level)
    below_diaphragm = (yb > dome_level) & ~hemithorax
    # The heart is thinner, so less dense, towards its borders.
    heart_core = np.minimum(1.5 * _wide_blur(heart, 0.03 * size), 1.0)
    heart_shade = heart * _smoothstep(0.0, 0.3, heart_s) * (0.6 + 0.4 * heart_core)
    # The abdomen fades out under the lateral chest wall instead of ending in a hard line.
    solid = np.maximum(heart_shade, below_diaphragm * _smoothstep(lateral + 0.15, lateral - 0.1, a))
    solid = np.maximum(solid, 0.15 * knob)
    density += rng.uniform(0.10, 0.16) * solid * body
    if rng.random() < 0.6:  # gastric air bubble just under the left dome
        bubble_x = rng.uniform(0.5, 0.7)
        bubble_y = float(_dome(lung_l, np.float32(bubble_x))) + rng.uniform(0.04, 0.07)
        rx, ry = rng.uniform(0.10, 0.18), rng.uniform(0.04, 0.07)
        bubble = ((xb - bubble_x) / rx) ** 2 + ((yb - bubble_y) / ry) ** 2 < 1.0
        density -= rng.uniform(0.08, 0.16) * (bubble & below_diaphragm)

    # Lungs are air: subtract, less at the bases and periphery where soft tissue
    # overlaps, and less near the borders where the lung is thin (a wide blur of the
    # mask stands in for its thickness), with a mottled texture. The finding
    # replaces part of that air.
    lung_depth = rng.uniform(0.30, 0.40)
    air = lung_depth * (1.0 - 0.25 * np.clip(yb, 0.0, 1.1) ** 2 - 0.1 * _smoothstep(0.5, 1.0, a / lateral))
    air = air * (0.3 + 0.7 * np.minimum(1.4 * _wide_blur(lungs, 0.03 * size), 1.0))
    opacity, lesion = _finding(rng, findings[0], xb, yb, lung_r, lung_l, lungs)
    for finding in findings[1:]:  # a second finding adds its opacity and lesion
        more_opacity, more_lesion = _finding(rng, finding, xb, yb, lung_r, lung_l, lungs)
        opacity, lesion = np.maximum(opacity, more_opacity), lesion | more_lesion
    mottling = 1.0 + rng.uniform(0.04, 0.10) * _smooth_noise(rng, frame.canvas, int(rng.integers(6, 12)))
    density -= air * lungs * mottling * (1.0 - opacity)
    # Hila and vascular markings: denser around the lung roots, fanning out from them.
    hila = [(sign * rng.uniform(0.18, 0.26), rng.uniform(0.33, 0.45)) for sign in (-1.0, 1.0)]
    for hx, hy in hila:
        density += rng.uniform(0.03, 0.07) * lungs * np.exp(-(((xb - hx) / 0.12) ** 2) - ((yb - hy) / 0.10) ** 2)
    density += rng.uniform(0.04, 0.08) * _draw_vessels(rng, frame, hila) * lungs

    # Spine: vertical band with darker disc spaces; trachea: dark air column above the carina.
    spine_w = rng.uniform(0.08, 0.11)
    spine = np.sqrt(np.clip(1.0 - (xb / spine_w) ** 2, 0.0, 1.0))
    discs = 1.0 - 0.3 * _smoothstep(0.75, 0.95, np.cos(2 * np.pi * (yb / rng.uniform(0.085, 0.1) + rng.random())))
    density += rng.uniform(0.05, 0.09) * spine * discs * body
    trachea_w = rng.uniform(0.035, 0.05)
    trachea = np.sqrt(np.clip(1.0 - ((xb + rng.uniform(0.0, 0.03)) / trachea_w) ** 2, 0.0, 1.0))
    density -= rng.uniform(0.05, 0.10) * trachea * _smoothstep(rng.uniform(0.28, 0.36), 0.15, yb)

    # Ribs over the thoracic cage. Posterior ribs arch up from the spine then curve
    # down laterally; anterior ribs run obliquely down towards the sternum, fainter.
    # A low-frequency warp keeps them from looking like a ruled grid; they fade over
    # the solid organs, where the film is already bright. Ribs vary smoothly, so they
    # are evaluated on every other pixel (a quarter of the work) and upsampled.
    ah, yh = a[:, ::2], yb[::2]
    warp = 0.25 * _smooth_noise(rng, ah.shape[1], 4)
    bend = rng.uniform(0.2, 0.3) * ah**2 * (1 + 0.6 * np.clip(yh, 0, 1)) + rng.uniform(0.1, 0.2) * ah**6
    posterior = (yh + rng.uniform(0.12, 0.2) * ah - bend) / rng.uniform(0.1, 0.12)
    ribs = _rib_bands(posterior + warp + rng.random(), rng.uniform(0.35, 0.45))
    ribs *= _smoothstep(spine_w * 0.8, spine_w * 1.6, ah)
    anterior = (yh - rng.uniform(0.25, 0.35) * (1.05 - ah) - 0.1 * (1.05 - ah) ** 2) / rng.uniform(0.13, 0.16)
    front = _rib_bands(anterior + warp + rng.random(), 0.45)
    front *= _smoothstep(0.25, 0.45, ah) * _smoothstep(0.9, 0.6, yh)
    cage = _smoothstep(lateral + 0.12, lateral + 0.03, a) * _smoothstep(-0.25, -0.1, yb)
    cage = cage * _smoothstep(1.0, 0.85, yb) * (1.0 - 0.7 * solid)
    rib_map = Image.fromarray(ribs + 0.4 * front).resize((frame.canvas,) * 2, Image.Resampling.BILINEAR)
    density += rng.uniform(0.04, 0.08) * np.asarray(rib_map) * cage

    # Clavicles: S-shaped bands rising laterally from the sternal ends.
    clavicle_y = rng.uniform(-0.1, 0.0) - rng.uniform(0.12, 0.2) * (a - 0.12) + 0.1 * (a - 0.12) ** 2
    clavicle_w = rng.uniform(0.025, 0.035)
    clavicle = _smoothstep(clavicle_w, clavicle_w * 0.5, np.abs(yb - clavicle_y))
    density += rng.uniform(0.06, 0.10) * clavicle * _smoothstep(0.08, 0.14, a) * _smoothstep(0.95, 0.8, a)

    # Confounders shared by all classes.
    if rng.random() < 0.35:  # breast shadows: lower-lateral soft-tissue haze, bilateral
        breast = _smoothstep(1.0, 0.8, np.hypot((a - 0.55) / 0.45, (yb - 0.95) / 0.28))
        density += rng.uniform(0.02, 0.06) * breast * body * ~below_diaphragm

    # --- Tilt, then acquisition: window, gamma, unsharpness, heel effect, noise ---
    density = frame.tilt(density)
    lungs, heart, lesion = frame.tilt(lungs), frame.tilt(heart), frame.tilt(lesion)
    if rng.random() < 0.25:  # ECG leads lie on the patient, but are drawn untilted
        density = density + rng.uniform(0.25, 0.4) * _draw_ecg_leads(rng, size)
    low, high = rng.uniform(-0.05, 0.08), rng.uniform(0.8, 1.0)
    img = np.clip((density - low) / (high - low), 0.0, 1.0) ** math.exp(rng.uniform(-0.3, 0.25))
    img = _gaussian_blur(img, rng.uniform(0.4, 1.2) * size / 256 + 0.2)
    img += rng.uniform(-0.05, 0.05) * (np.arange(size, dtype=np.float32)[:, None] / size - 0.5)
    # Quantum noise per pixel; smaller images stand for downsampled films, hence less noise.
    noise = rng.uniform(0.008, 0.03) * min(1.0, math.sqrt(size / 256))
    img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    sides, zones = _describe_lesion(lesion, lungs, frame.tilted_x())
    masks = {"lungs": lungs, "heart": heart, "lesion": lesion}
    ctr = cardiothoracic_ratio(lungs, heart)
    info = {"label": label, "ctr": ctr, "lesion_sides": sides, "lesion_zones": zones}
    return img, masks, info


def make_phantom(rng: np.random.Generator, label: str, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(image, masks)`` of one phantom; see ``make_phantom_with_info`` for the per-image info."""
    img, masks, _ = make_phantom_with_info(rng, label, size)
    return img, masks
