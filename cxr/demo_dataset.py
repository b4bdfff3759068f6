"""The phantom data set on disk, written exactly like real data (demo_data.py is its command):

    write_demo_dataset(out_dir, ...) -> Path     # fails if out_dir is non-empty
    ensure_demo_dataset(out_dir, ...) -> Path    # reuse if same parameters
    save_preview(path, ...) -> Path              # grid picture, one row per class

Layout (COVIDx lists + CheXmask-style masks)::

    out_dir/train/<file>.png, out_dir/test/<file>.png
    out_dir/train_split.txt, out_dir/test_split.txt   # "patient_id file label source"
    out_dir/masks/{lungs,heart,lesion}/<file>.png     # 8-bit, 0 or 255
    out_dir/demo_meta.json                            # parameters + per-image info
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr import phantom
from cxr.atomic_files import new_folder
from cxr.phantom import CLASSES, MASK_NAMES

SOURCE = "phantom"


META_NAME = "demo_meta.json"


# Bump when the pictures change, so ensure_demo_dataset refuses a stale folder
# instead of silently mixing two generator versions.
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------
# Dataset on disk
# ----------------------------------------------------------------------------
def _params(train_per_class: int, test_per_class: int, size: int, seed: int, sixteen_bit: bool) -> dict:
    return {
        "train_per_class": int(train_per_class),
        "test_per_class": int(test_per_class),
        "size": int(size),
        "seed": int(seed),
        "sixteen_bit": bool(sixteen_bit),
        "generator_version": GENERATOR_VERSION,
    }


def _save_image(img: np.ndarray, path: Path, sixteen_bit: bool) -> None:
    # Noisy images barely compress, so the fastest zlib level costs ~15% in size and saves
    # a good part of the generation time (masks use it too).
    if sixteen_bit:
        # 12-bit values in a 16-bit PNG, like DICOM-derived files; PIL reads it back as "I;16".
        Image.fromarray(np.round(img * 4095).astype(np.uint16)).save(path, compress_level=1)
    else:
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, compress_level=1)


def _render_to(root: Path, size: int, seed: int, sixteen_bit: bool, job) -> dict:
    """Draw one phantom and write its image and masks under ``root``; returns its info."""
    split, split_code, i, label = job
    rng = np.random.default_rng([seed, split_code, 2, i])  # one generator per image
    img, masks, info = phantom.make_phantom_with_info(rng, label, size)
    name = f"phantom_{split}_{i:05d}.png"
    _save_image(img, root / split / name, sixteen_bit)
    for key in MASK_NAMES:
        Image.fromarray(masks[key].astype(np.uint8) * 255).save(root / "masks" / key / name, compress_level=1)
    return info


def map_in_processes(function, jobs):
    """[function(job)] with one process per core: generation is pure numpy per image, and an
    image depends only on its job, so the files are the same whatever the number of processes.
    fork only (Linux): other start methods re-import the caller, which may be a script without a
    __main__ guard; elsewhere the jobs run one by one."""
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 50 and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(function, jobs, chunksize=16))
    return [function(job) for job in jobs]


def write_demo_dataset(
    out_dir, train_per_class=60, test_per_class=20, size=256, seed=0, sixteen_bit=False
) -> Path:
    """Generate the phantom dataset into ``out_dir`` (which must not exist or be empty).

    Everything is written to a hidden sibling folder first and renamed into place at
    the end, so an interrupted run never leaves a half dataset that looks complete.
    Same arguments -> byte-identical files.
    """
    out_dir = Path(out_dir)
    if min(train_per_class, test_per_class, seed) < 0:
        raise ValueError("train_per_class, test_per_class and seed must be non-negative")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or choose another folder")
    params = _params(train_per_class, test_per_class, size, seed, sixteen_bit)
    with new_folder(out_dir) as tmp:
        for sub in ("train", "test", *(f"masks/{name}" for name in MASK_NAMES)):
            (tmp / sub).mkdir(parents=True)
        jobs = []  # (split, split_code, index, label), in list order
        for split_code, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
            # Shuffled so the list interleaves classes, as real split files do.
            labels = np.repeat(np.arange(len(CLASSES)), per_class)
            labels = np.random.default_rng([seed, split_code, 1]).permutation(labels)
            jobs += [(split, split_code, i, CLASSES[label]) for i, label in enumerate(labels)]
        infos = map_in_processes(functools.partial(_render_to, tmp, size, seed, sixteen_bit), jobs)
        images, lines = {}, {"train": [], "test": []}
        for patient, ((split, _, i, label), info) in enumerate(zip(jobs, infos)):
            name = f"phantom_{split}_{i:05d}.png"
            patient_id = f"P{patient:05d}"
            lines[split].append(f"{patient_id} {name} {label} {SOURCE}\n")
            images[name] = {
                "split": split,
                "patient_id": patient_id,
                "label": label,
                "ctr": round(info["ctr"], 4),
                "lesion_sides": info["lesion_sides"],
                "lesion_zones": info["lesion_zones"],
            }
        for split, split_lines in lines.items():
            (tmp / f"{split}_split.txt").write_text("".join(split_lines))
        meta = {"params": params, "classes": list(CLASSES), "source": SOURCE, "images": images}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out_dir


def ensure_demo_dataset(
    out_dir, train_per_class=60, test_per_class=20, size=256, seed=0, sixteen_bit=False
) -> Path:
    """Reuse ``out_dir`` if it holds a phantom dataset with these parameters, else generate it."""
    out_dir = Path(out_dir)
    params = _params(train_per_class, test_per_class, size, seed, sixteen_bit)
    meta_path = out_dir / META_NAME
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())["params"]
        if existing == params:
            return out_dir
        raise ValueError(
            f"{out_dir} holds a demo dataset generated with {existing}, but {params} was requested; "
            "delete the folder or choose another --dataset-dir"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not empty but has no {META_NAME}, so it is not a demo dataset; "
            "delete it or choose another --dataset-dir"
        )
    n_train, n_test = train_per_class * len(CLASSES), test_per_class * len(CLASSES)
    print(f"Generating demo phantom dataset in {out_dir}: {n_train} train + {n_test} test images, {size}px")
    return write_demo_dataset(out_dir, train_per_class, test_per_class, size, seed, sixteen_bit)


def save_preview(path, per_class: int = 4, size: int = 192, seed: int = 0) -> Path:
    """Grid picture: one row per class, ``per_class`` phantoms each, class name on the first tile."""
    path = Path(path)
    grid = Image.new("L", (per_class * size, len(CLASSES) * size))
    try:
        font = ImageFont.load_default(size=max(10, size // 12))
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    for row, label in enumerate(CLASSES):
        for col in range(per_class):
            img, _ = phantom.make_phantom(np.random.default_rng([seed, 3, row, col]), label, size)
            grid.paste(Image.fromarray(np.round(img * 255).astype(np.uint8)), (col * size, row * size))
        ImageDraw.Draw(grid).text((4, row * size + 2), label, fill=255, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
