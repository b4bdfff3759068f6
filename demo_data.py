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
    cardiothoracic_ratio(lungs, heart) -> float
    write_demo_dataset(out_dir, ...) -> Path     # fails if out_dir is non-empty
    ensure_demo_dataset(out_dir, ...) -> Path    # reuse if same parameters
    save_preview(path, ...) -> Path              # grid picture, one row per class

Layout written by ``write_demo_dataset`` (COVIDx lists + CheXmask-style masks)::

    out_dir/train/<file>.png, out_dir/test/<file>.png
    out_dir/train_split.txt, out_dir/test_split.txt   # "patient_id file label source"
    out_dir/masks/{lungs,heart,lesion}/<file>.png     # 8-bit, 0 or 255
    out_dir/demo_meta.json                            # parameters + per-image info

Usage
    python demo_data.py --out data/demo --train-per-class 60 --test-per-class 20 \\
        --size 256 --seed 0 [--sixteen-bit] [--preview preview.png]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate the synthetic chest X-ray phantom dataset.")
    parser.add_argument("--out", type=Path, default=None, help="output folder (must not exist or be empty)")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sixteen-bit", action="store_true", help="16-bit PNGs holding 12-bit values 0..4095")
    parser.add_argument("--preview", type=Path, default=None, help="also save a grid picture of samples per class")
    import utils  # here: the generator itself needs only numpy and Pillow, not torch
    return utils.add_debug_flag(parser)


def main(args: argparse.Namespace) -> None:
    if args.out is None and args.preview is None:
        raise SystemExit("nothing to do: give --out and/or --preview")
    if args.out is not None:
        write_demo_dataset(
            args.out, args.train_per_class, args.test_per_class, args.size, args.seed, args.sixteen_bit
        )
        n = (args.train_per_class + args.test_per_class) * len(CLASSES)
        print(f"Wrote {n} phantom images ({args.size}px) to {args.out}")
    if args.preview is not None:
        save_preview(args.preview, seed=args.seed)
        print(f"Saved preview grid to {args.preview}")


def cli():
    """main, with a folder that holds files or a negative count as the user's error."""
    import utils

    try:
        main(get_args_parser().parse_args())
    except (FileExistsError, ValueError) as error:
        raise utils.UserError(str(error)) from error


if __name__ == "__main__":
    import utils

    utils.run_cli(cli)
