"""Where the lung, heart and lesion masks of an image come from: PNG folders (--mask-dir, with
lungs/, heart/ and lesion/ as demo_data.py and `chexmask.py to-png` write them), single PNGs
(--lung-mask, --heart-mask), or CheXmask CSV rows (--chexmask), decoded at the image's size.

    reader = MaskReader(args, names)      # names: the images as listed
    source = reader.source(name)          # None, a dict of masks, or a function of (H, W)
"""
from pathlib import Path

from cxr import chexmask_csv, regions
from cxr.errors import UserError


def mask_file(mask_dir, kind, name):
    """<mask_dir>/<kind>/ file of the image listed as `name`: the same relative path, or the
    same file name, as it is or as .png (what `chexmask.py to-png` writes); None if absent."""
    name = Path(name)
    for candidate in dict.fromkeys((name, name.with_suffix(".png"), Path(name.name),
                                    Path(name.name).with_suffix(".png"))):
        path = Path(mask_dir) / kind / candidate
        if not candidate.is_absolute() and path.is_file():
            return path
    return None


def read_masks(mask_dir, name, lung_mask=None, heart_mask=None):
    """{"lungs", "heart", "lesion"} bool arrays (None where the file is absent)."""
    files = {"lungs": lung_mask, "heart": heart_mask, "lesion": None}
    if mask_dir:
        for kind in files:
            if files[kind] is None:
                files[kind] = mask_file(mask_dir, kind, name)
    out = {}
    for kind, path in files.items():
        if path is not None and not Path(path).is_file():
            raise UserError(f"--{kind.rstrip('s')}-mask {path}: no such file")
        out[kind] = regions.load_mask(path) if path is not None else None
    return out


class MaskReader:
    """The masks of each image, by the name it is listed under: PNGs (--mask-dir, --lung-mask,
    --heart-mask), or lungs and heart from CheXmask rows (--chexmask), decoded at the image's
    size when explain_batch has loaded it (reader.source(name) is a function of the size).
    With CheXmask, --mask-dir still gives the lesion masks. Rows below --min-mask-dice give no
    lung or heart masks, so the statistics that need them are null; `counts` feeds the summary."""

    def __init__(self, args, names):
        self.args = args
        self.rows = None
        self.counts = {"with_masks": 0, "below_min_dice": 0, "without_row": 0, "sides_swapped": 0}
        if args.chexmask:
            self.rows = chexmask_csv.read_rows(args.chexmask, [(n, n) for n in names], args.chexmask_id_column)
            if not self.rows:
                raise UserError(
                    f"no row of --chexmask {', '.join(args.chexmask)} matches any of the {len(names)} "
                    f"images (first: {names[0]}); check the CSV is the images' collection, or name "
                    "its image-id column with --chexmask-id-column")

    def source(self, name):
        if self.rows is None:
            if not (self.args.mask_dir or self.args.lung_mask or self.args.heart_mask):
                return None
            return read_masks(self.args.mask_dir, name, self.args.lung_mask, self.args.heart_mask)
        return lambda size: self.decode(name, size)

    def decode(self, name, size):
        masks = {"lungs": None, "heart": None, "lesion": None}
        if self.args.mask_dir:
            lesion = mask_file(self.args.mask_dir, "lesion", name)
            masks["lesion"] = regions.load_mask(lesion) if lesion else None
        row = self.rows.get(name)
        if row is None:
            self.counts["without_row"] += 1
            masks["info"] = {"source": "chexmask", "row": None, "used": False, "reason": "no CheXmask row"}
            return masks
        why = row.quality(self.args.min_mask_dice)
        info = {"source": "chexmask", "row": row.where, "dice_rca_mean": row.dice_mean,
                "dice_rca_max": row.dice_max, "used": why is None, "reason": why}
        if why:
            self.counts["below_min_dice"] += 1
        else:
            organs, details = row.masks(size)
            masks.update(organs)
            info.update(details)
            self.counts["with_masks"] += 1
            self.counts["sides_swapped"] += details["sides_swapped"]
        masks["info"] = info
        return masks

    def summary(self):
        if self.rows is None:
            return None
        return {"source": "chexmask", "csvs": list(self.args.chexmask),
                "min_mask_dice": self.args.min_mask_dice, **self.counts}
