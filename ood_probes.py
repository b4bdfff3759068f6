"""Out-of-distribution probe sets for the demo model, made from nothing downloaded.

    python ood_probes.py --out data/ood_probes [--per-set 100] [--size 128] [--seed 0]

writes one folder and one COVIDx-format list per set (`<out>/<set>/*.png`, `<out>/<set>.txt`,
label `ood`), which `python ood.py --probe-dir <out>` evaluates:

far OOD: not chest X-rays at all
    noise     Gaussian or uniform pixel noise, random mean and contrast
    textures  gratings, checkerboards and smooth random fields
    shapes    ellipses, rectangles and polygons on a plain background
    photos    random crops of the two photographs that ship inside scikit-learn, in grey
shifted: phantoms acquired or exported wrongly
    inverted  intensity-inverted phantoms (a MONOCHROME1 file read as MONOCHROME2)
    rotated   phantoms rotated by 90 degrees
    blurred   phantoms under a heavy Gaussian blur
    lateral   a lateral-like view: one hemithorax of a phantom stretched to the full width
near OOD: a chest X-ray with a finding the model never saw
    mass      a normal phantom with a sharp-edged round mass in one lung (the training findings
              have soft edges, or are basal, bilateral or cardiac)
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxr import phantom
from cxr.cli import add_debug_flag, run_cli
from cxr.presets import DEMO_DATA

SETS = ("noise", "textures", "shapes", "photos", "inverted", "rotated", "blurred", "lateral", "mass")
FAR, SHIFTED, NEAR = SETS[:4], SETS[4:8], SETS[8:]


def _noise(rng, size):
    if rng.random() < 0.5:
        img = rng.normal(rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.25), (size, size))
    else:
        img = rng.uniform(0, 1, (size, size)) * rng.uniform(0.3, 1.0) + rng.uniform(0, 0.3)
    return img


def _texture(rng, size):
    ys, xs = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 0:  # grating
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 20)
        return 0.5 + 0.4 * np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)))
    if kind == 1:  # checkerboard
        cells = int(rng.integers(2, 16))
        return 0.2 + 0.6 * ((np.floor(xs * cells) + np.floor(ys * cells)) % 2)
    field = rng.standard_normal((int(rng.integers(4, 16)),) * 2).astype(np.float32)
    field = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC))
    return 0.5 + 0.2 * field


def _shapes(rng, size):
    image = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
        fill = int(rng.integers(0, 256))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([tuple(p) for p in rng.integers(0, size, (int(rng.integers(3, 7)), 2))], fill=fill)
    return np.asarray(image) / 255.0


def _photo(rng, size, photos):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop) / 255.0


def _phantom(rng, size, label=None):
    label = label or phantom.CLASSES[rng.integers(len(phantom.CLASSES))]
    return phantom.make_phantom(rng, label, size)


def _shifted(name, rng, size):
    img, masks = _phantom(rng, size, "normal" if name == "mass" else None)
    if name == "inverted":
        return 1.0 - img
    if name == "rotated":
        return np.rot90(img, k=1 if rng.random() < 0.5 else 3)
    if name == "blurred":
        blurred = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 16))
        return np.asarray(blurred) / 255.0
    if name == "lateral":  # one hemithorax, spine at the edge, stretched to a full-width chest
        half = img[:, : size // 2] if rng.random() < 0.5 else img[:, size // 2:][:, ::-1]
        return np.asarray(Image.fromarray(half.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    # mass: a sharp-edged round opacity centred inside the lungs
    ys, xs = np.nonzero(masks["lungs"])
    pick = rng.integers(len(ys))
    radius = rng.uniform(0.05, 0.09) * size
    yy, xx = np.mgrid[0:size, 0:size]
    disk = ((yy - ys[pick]) ** 2 + (xx - xs[pick]) ** 2) <= radius ** 2
    return np.clip(img + rng.uniform(0.25, 0.4) * disk, 0.0, 1.0)


def make_probe(name, rng, size, photos=None):
    """One probe image of set `name`: a float array (size, size) in [0, 1]."""
    if name == "noise":
        img = _noise(rng, size)
    elif name == "textures":
        img = _texture(rng, size)
    elif name == "shapes":
        img = _shapes(rng, size)
    elif name == "photos":
        img = _photo(rng, size, photos)
    elif name in SETS:
        img = _shifted(name, rng, size)
    else:
        raise ValueError(f"unknown probe set '{name}'; choose from {', '.join(SETS)}")
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def write_probes(out_dir, per_set=100, size=128, seed=0, sets=SETS):
    """Write every set under out_dir; returns {set: list file}."""
    from sklearn.datasets import load_sample_images  # two photographs shipped with scikit-learn

    photos = load_sample_images().images
    out_dir = Path(out_dir)
    lists = {}
    for name in sets:
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(per_set):
            rng = np.random.default_rng([seed, 7, SETS.index(name), i])
            img = make_probe(name, rng, size, photos)
            file = f"{name}_{i:04d}.png"
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / file)
            lines.append(f"{name}{i:04d} {file} ood probe\n")
        lists[name] = out_dir / f"{name}.txt"
        lists[name].write_text("".join(lines))
    return lists


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--per-set", type=int, default=100, help="images per set")
    parser.add_argument("--size", type=int, default=DEMO_DATA["size"], help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    args = add_debug_flag(parser).parse_args()
    lists = write_probes(args.out, args.per_set, args.size, args.seed, args.sets)
    print(f"wrote {len(lists)} probe sets of {args.per_set} images to {args.out}")


if __name__ == "__main__":
    run_cli(main)
