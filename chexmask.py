"""Convert CheXmask CSVs (Gaggion et al., 2023: run-length encoded lung and heart masks of
ChestX-ray8, CheXpert, MIMIC-CXR-JPG, PadChest and VinDr-CXR; read by cxr/chexmask_csv.py) to the
PNG layout of --mask-dir (lungs/ and heart/, named like the images):

    python chexmask.py to-png MIMIC-CXR-JPG.csv.gz --out masks [--dataset-dir IMAGES]

With --dataset-dir, masks are written for every image under it that has a row, at its size (a
Preprocessed 1024 x 1024 row is mapped back onto its image); without it, every row at the size
it is encoded at, named by its id. explain.py reads the CSVs directly too (--chexmask).
"""
import argparse
from pathlib import Path

import numpy as np

from cxr.chexmask_csv import (
    DEFAULT_MIN_DICE,
    DICE_MEAN,
    ID_COLUMNS,
    PREPROCESSED_SIZE,
    ChexmaskError,
    id_parts,
    read_rows,
    records,
    row_from_record,
)
from cxr.cli import add_debug_flag, run_cli
from cxr.images import IMAGE_SUFFIXES, ImageError, is_dicom, load_image, open_image


# --------------------------------------------------------------------------------------------
# to-png: the --mask-dir layout
# --------------------------------------------------------------------------------------------
def _image_files(root):
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_size(path):
    """(height, width) of an image file: from the header, decoding only DICOM."""
    try:
        if is_dicom(path):
            image = load_image(path)
            return image.height, image.width
        with open_image(path) as image:
            return image.height, image.width
    except ImageError as error:
        raise ChexmaskError(f"{path}: {error}") from error


def _safe_name(image_id):
    """An id as a relative .png path under --out (no absolute paths, no '..')."""
    parts = [p for p in id_parts(image_id) if p not in ("..", "")]
    if not parts:
        raise ChexmaskError(f"image id {image_id!r} gives no file name")
    return Path(*parts[:-1], parts[-1] + ".png")


def _jobs(args):
    """(row, image size, output name) of every mask to write, streamed without --dataset-dir."""
    if args.dataset_dir:
        names = {str(p.relative_to(args.dataset_dir)): p for p in _image_files(args.dataset_dir)}
        if not names:
            raise ChexmaskError(f"--dataset-dir {args.dataset_dir}: no image files")
        rows = read_rows(args.csv, list(zip(names, names)), args.id_column)
        if len(rows) < len(names):
            print(f"{len(names) - len(rows)} of the {len(names)} images under {args.dataset_dir} "
                  "have no CheXmask row")
        for name in sorted(rows):
            yield rows[name], _image_size(names[name]), Path(name).with_suffix(".png")
        return
    for path in args.csv:  # every row at the size it is encoded at, named by its id
        for line, image_id, record, column in records(path, args.id_column):
            row = row_from_record(path, line, image_id, record, column)
            yield row, (row.height, row.width), _safe_name(image_id)


def to_png(args):
    from PIL import Image

    out = Path(args.out)
    written, low, squares = 0, [], 0
    for row, size, name in _jobs(args):
        why = row.quality(args.min_mask_dice)
        if why:
            low.append(f"{row.where}: {why}")
            continue
        masks, _ = row.masks(size)
        squares += size == (PREPROCESSED_SIZE, PREPROCESSED_SIZE)
        for kind in ("lungs", "heart"):
            target = out / kind / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(masks[kind].astype(np.uint8) * 255).save(target)
        written += 1
    print(f"wrote lungs/ and heart/ masks of {written} images to {out}")
    if low:
        print(f"left out {len(low)} rows below --min-mask-dice {args.min_mask_dice:g} (first: {low[0]})")
    if squares and not args.dataset_dir:
        print(f"note: {squares} masks are {PREPROCESSED_SIZE} x {PREPROCESSED_SIZE}; if they are the "
              "Preprocessed variant (padded squares), give --dataset-dir so they are mapped back "
              "onto each image")
    return written


def get_args_parser():
    parser = argparse.ArgumentParser(description="CheXmask CSVs (run-length encoded lung and heart masks)")
    commands = parser.add_subparsers(dest="command", required=True)
    png = commands.add_parser("to-png", help="write lungs/ and heart/ PNG masks (the --mask-dir layout)")
    png.add_argument("csv", nargs="+", help="CheXmask CSV(s), .csv or .csv.gz")
    png.add_argument("--out", required=True, help="output folder (lungs/ and heart/ go in it)")
    png.add_argument("--dataset-dir", help="the images: masks are written for every image under it "
                     "that has a row, at its size and named by its path under the folder (needed to "
                     "map the Preprocessed variant back); without it, every row is written at its "
                     "own size, named by its id")
    png.add_argument("--id-column", help="image-id column (default: the first of "
                     f"{', '.join(ID_COLUMNS)} that the CSV has)")
    png.add_argument("--min-mask-dice", type=float, default=DEFAULT_MIN_DICE,
                     help=f"leave out rows whose {DICE_MEAN} is below this (0: keep all)")
    add_debug_flag(parser)
    return parser


if __name__ == "__main__":
    run_cli(lambda: to_png(get_args_parser().parse_args()))
