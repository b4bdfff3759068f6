"""A real labelled image set that ships inside scikit-learn's wheel, written in the demo's layout.

The phantoms are this repo's own invention, so a default chosen on them alone may only fit them.
scikit-learn's handwritten digits (UCI optical recognition of handwritten digits: 1,797 8x8
scans, 10 classes, 16 grey levels) are real images that every install has offline. They are
written as COVIDx lists (train_split.txt / test_split.txt, one "patient filename label source"
line per image) with 8x8 greyscale PNGs, so every program reads them as `--dataset covid`:

    python demo_data.py --real digits --out data/digits
    python train.py --dataset covid --dataset-dir data/digits --setup small \\
        --train-image-list data/digits/train_split.txt --test-image-list data/digits/test_split.txt

The data set has no writer ids, so every image is its own patient. The test third is drawn
stratified by class with a fixed generator: same seed -> byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.atomic_files import new_folder

SOURCE = "sklearn_digits"
REAL_SETS = ("digits",)
TEST_SHARE = 1 / 3


def digit_class(value):
    return f"digit_{int(value)}"


def write_digits_dataset(out_dir, seed=0) -> Path:
    """Write scikit-learn's digits into out_dir (absent or empty): train/ and test/ PNGs and lists."""
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or choose another folder")
    digits = load_digits()
    # 16 grey levels (0..16) spread over 8 bits; the scans themselves are kept at their 8x8.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    is_test = _stratified_test_mask(digits.target, seed)
    with new_folder(out_dir) as tmp:
        lines = {"train": [], "test": []}
        for index, (image, target, test) in enumerate(zip(pixels, digits.target, is_test)):
            split = "test" if test else "train"
            name = f"digit_{index:04d}.png"
            (tmp / split).mkdir(exist_ok=True)
            Image.fromarray(image, mode="L").save(tmp / split / name)
            lines[split].append(f"D{index:04d} {name} {digit_class(target)} {SOURCE}\n")
        for split, split_lines in lines.items():
            (tmp / f"{split}_split.txt").write_text("".join(split_lines))
        meta = {"source": SOURCE, "seed": seed, "test_share": TEST_SHARE,
                "classes": [digit_class(v) for v in sorted(set(digits.target))],
                "images": {split: len(split_lines) for split, split_lines in lines.items()}}
        (tmp / "digits_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def _stratified_test_mask(targets, seed):
    rng = np.random.default_rng([seed, 28])
    mask = np.zeros(len(targets), dtype=bool)
    for value in np.unique(targets):
        members = np.flatnonzero(targets == value)
        mask[rng.choice(members, size=round(len(members) * TEST_SHARE), replace=False)] = True
    return mask
