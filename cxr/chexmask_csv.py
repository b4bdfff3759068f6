"""Lung and heart masks from CheXmask (Gaggion et al., 2023), the HybridGNet segmentations of
ChestX-ray8, CheXpert, MIMIC-CXR-JPG, PadChest and VinDr-CXR.

CheXmask ships one CSV (often .csv.gz) per source collection, one row per image:

    <image id>       the collection's own id column: dicom_id (MIMIC), ImageID (PadChest),
                     Image Index (ChestX-ray8), Path (CheXpert), image_id (VinDr-CXR), ...
    Dice RCA (Mean), Dice RCA (Max)   the estimated quality of the segmentation
    Landmarks        the contour points (not used here: the masks are what we need)
    Left Lung, Right Lung, Heart      run-length encodings: space-separated start/length pairs,
                     starts 1-based, row-major over Height x Width
    Height, Width    the size the encodings cover

"Right Lung" is the PATIENT's right lung: the image's left half on a PA film. Two variants
exist: OriginalResolution (Height x Width = the image's size) and Preprocessed (1024 x 1024,
after the image was padded to a centred square and resized); a Preprocessed row is mapped back
through that padding and resizing onto the image it belongs to.

    rows = read_rows(["MIMIC-CXR-JPG.csv.gz"], [("p10/s5/abc.jpg", "p10/s5/abc.jpg")])
    masks = rows["p10/s5/abc.jpg"].masks((height, width), "p10/s5/abc.jpg")

"""
import csv
import gzip
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from cxr.errors import UserError
from cxr.images import IMAGE_SUFFIXES

# Known image-id columns of the CheXmask CSVs, tried in this order.
# Collections whose images CheXmask cropped (dark border) before padding to a square.
CROPPED_BEFORE_PADDING = {"dicom_id": "MIMIC-CXR-JPG", "ImageID": "PadChest"}


ID_COLUMNS = ("dicom_id", "ImageID", "Image Index", "Path", "image_id", "Image ID", "ImageId",
              "SOPInstanceUID", "filename")


ORGANS = {"right_lung": "Right Lung", "left_lung": "Left Lung", "heart": "Heart"}


DICE_MEAN, DICE_MAX = "Dice RCA (Mean)", "Dice RCA (Max)"


PREPROCESSED_SIZE = 1024


DEFAULT_MIN_DICE = 0.7  # CheXmask's own advice for use: Dice RCA (Mean) >= 0.7


class ChexmaskError(UserError):
    """A CheXmask CSV that cannot be used as it is; the message names the file and row."""


# --------------------------------------------------------------------------------------------
# Run-length encoding
# --------------------------------------------------------------------------------------------
def encode_rle(mask):
    """CheXmask's encoding of a (H, W) mask: 'start length ...', starts 1-based, row-major."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 1-based first pixel of each run, then 1 past its end
    edges[1::2] -= edges[0::2]
    return " ".join(map(str, edges.tolist()))


def decode_rle(rle, height, width, where="RLE"):
    """The (height, width) bool mask of an encoding; an empty one gives an empty mask. A
    malformed encoding (not integers, an odd count, runs outside the image or overlapping) is
    a ChexmaskError naming `where`: such a row would otherwise give a silently wrong mask."""
    text = "" if rle is None else str(rle).strip()
    if not text:
        return np.zeros((height, width), dtype=bool)
    try:
        numbers = np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError:
        raise ChexmaskError(f"{where}: not a run-length encoding (space-separated integers "
                            f"expected, got {text[:40]!r}...)") from None
    if len(numbers) % 2:
        raise ChexmaskError(f"{where}: odd count of numbers ({len(numbers)}); a run-length "
                            "encoding is start/length pairs")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]  # 0-based starts
    size = height * width
    if (starts < 0).any():
        raise ChexmaskError(f"{where}: a run starts at {int(starts.min()) + 1}; starts are 1-based")
    if (lengths < 1).any():
        raise ChexmaskError(f"{where}: a run of length {int(lengths.min())}; lengths are at least 1")
    ends = starts + lengths  # exclusive
    if ends.max() > size:
        raise ChexmaskError(f"{where}: a run ends at pixel {int(ends.max())}, beyond the "
                            f"{height} x {width} (height x width) = {size} pixels of the mask")
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if overlap.size:
        i = int(overlap[0])
        raise ChexmaskError(f"{where}: overlapping runs (pixels {starts[i] + 1}-{ends[i]} and "
                            f"{starts[i + 1] + 1}-{ends[i + 1]})")
    # +1 where a run starts, -1 one past its end: the running sum is 1 inside the runs.
    steps = np.zeros(size + 1, dtype=np.int8)
    steps[starts] += 1
    steps[ends] -= 1
    return np.cumsum(steps[:-1], dtype=np.int8).astype(bool).reshape(height, width)


def from_preprocessed(mask, size):
    """A mask of the Preprocessed variant (the image padded to a centred square, then resized
    to 1024 x 1024) mapped back onto the (height, width) image: nearest neighbour at the pixel
    centres of the padded square, then the padding cut off."""
    height, width = size
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2  # CheXmask pads floor-half before
    scale = mask.shape[0] / side

    def index(n, offset, limit):
        return np.minimum(((np.arange(n) + offset + 0.5) * scale).astype(np.int64), limit - 1)

    return mask[index(height, top, mask.shape[0])][:, index(width, left, mask.shape[1])]


# --------------------------------------------------------------------------------------------
# Rows and matching them to images
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    csv: str
    line: int
    image_id: str
    dice_mean: float | None
    dice_max: float | None
    height: int
    width: int
    rles: dict = field(repr=False)  # organ -> encoding
    id_column: str = ""

    @property
    def where(self):
        return f"{self.csv} line {self.line} ({self.image_id})"

    def quality(self, min_dice):
        """None when the masks may be used, else why not."""
        if min_dice <= 0:
            return None
        if self.dice_mean is None:
            return f"no {DICE_MEAN} value, below --min-mask-dice {min_dice:g}"
        if self.dice_mean < min_dice:
            return f"{DICE_MEAN} {self.dice_mean:.3f} < --min-mask-dice {min_dice:g}"
        return None

    def variant(self, size):
        """'original' when the row covers the image's size, 'preprocessed' for a 1024 x 1024
        row of an image of another size; anything else is an error naming both sizes."""
        if (self.height, self.width) == tuple(size):
            return "original"
        if (self.height, self.width) == (PREPROCESSED_SIZE, PREPROCESSED_SIZE):
            if self.id_column in CROPPED_BEFORE_PADDING:
                # CheXmask cut these collections' dark border before padding: undoing only
                # the padding would shift and scale the masks without a word.
                raise ChexmaskError(
                    f"{self.where}: a Preprocessed row of {CROPPED_BEFORE_PADDING[self.id_column]}, "
                    "whose images CheXmask cropped to their content before padding; that crop "
                    "cannot be undone from the CSV: use the collection's OriginalResolution CSV")
            return "preprocessed"
        raise ChexmaskError(
            f"{self.where}: the masks cover {self.height} x {self.width} pixels (height x width) but "
            f"the image is {size[0]} x {size[1]}; CheXmask's OriginalResolution masks need the "
            "images at their original size (resized copies: use the Preprocessed CSV, which is "
            "mapped onto any size)")

    def masks(self, size):
        """{"lungs", "heart", "sides": {"right", "left"}} bool (H, W) masks of the image of
        `size` = (H, W), and {"variant", "sides_swapped"}."""
        variant = self.variant(size)
        organs = {}
        for organ, column in ORGANS.items():
            mask = decode_rle(self.rles[organ], self.height, self.width, f"{self.where}, column {column!r}")
            organs[organ] = mask if variant == "original" else from_preprocessed(mask, size)
        right, left = organs["right_lung"], organs["left_lung"]
        # On a PA film the patient's right lung lies on the image's left; the other way round
        # means a mirrored film (or an AP film stored mirrored): the sides stay CheXmask's.
        swapped = bool(right.any() and left.any()
                       and np.nonzero(right)[1].mean() > np.nonzero(left)[1].mean())
        return ({"lungs": right | left, "heart": organs["heart"], "sides": {"right": right, "left": left}},
                {"variant": variant, "sides_swapped": swapped})


def _strip(name):
    """A file name without a known image suffix (ids may lack it: MIMIC's dicom_id)."""
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def id_parts(path):
    """Path components, the last one without its image suffix; backslashes as separators."""
    parts = [p for p in PurePosixPath(str(path).replace("\\", "/")).parts if p not in ("/", ".")]
    return tuple(parts[:-1]) + (_strip(parts[-1]),) if parts else ()


def _common_suffix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def open_text(path):
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", newline="", encoding="utf-8") if gzipped else open(path, newline="", encoding="utf-8")


def _number(text, kind, where):
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ChexmaskError(f"{where}: {kind} {text!r} is not a number") from None
    return None if math.isnan(value) else value


def _header(path, columns, id_column):
    """The id column of a CSV's header, after checking the organ columns are there."""
    if not columns:
        raise ChexmaskError(f"--chexmask {path}: empty file, no header")
    missing = [c for c in ORGANS.values() if c not in columns]
    if missing:
        raise ChexmaskError(f"--chexmask {path}: no {', '.join(repr(c) for c in missing)} column; "
                            f"not a CheXmask CSV (its columns: {', '.join(columns)})")
    if id_column:
        if id_column not in columns:
            raise ChexmaskError(f"--chexmask-id-column {id_column!r} is not a column of {path} "
                                f"(its columns: {', '.join(columns)})")
        return id_column
    found = next((c for c in ID_COLUMNS if c in columns), None)
    if found is None:
        raise ChexmaskError(f"--chexmask {path}: none of the known image-id columns "
                            f"({', '.join(ID_COLUMNS)}); name it with --chexmask-id-column "
                            f"(its columns: {', '.join(columns)})")
    return found


def records(path, id_column=None):
    """(line, image id, {column: text}, id column) of each row of a CheXmask CSV, streamed."""
    if not Path(path).is_file():
        raise ChexmaskError(f"--chexmask {path}: no such file")
    if sys.maxsize > csv.field_size_limit():  # a full-resolution encoding is megabytes long
        csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    with open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            column = _header(path, reader.fieldnames, id_column)
            for record in reader:
                yield reader.line_num, (record.get(column) or "").strip(), record, column
        except (csv.Error, UnicodeDecodeError, EOFError, OSError) as error:
            raise ChexmaskError(f"--chexmask {path}: unreadable CSV near line "
                                f"{reader.line_num} ({error})") from error


def read_rows(csv_paths, images, id_column=None):
    """{image key: Row} for the `images`, [(key, path as listed)], found in the CSVs by id.

    An id matches an image when its file name (without an image suffix) equals the image's;
    several rows of the same name (CheXpert's view1_frontal.jpg) are told apart by the longest
    run of equal folders before it, and a tie is an error. Only matching rows are kept, so a
    CSV of 200,000 rows costs one pass, not its size in memory."""
    wanted = {}
    for key, path in images:
        wanted.setdefault(id_parts(path)[-1], []).append((key, id_parts(path)))
    best = {}  # key -> (score, Row, rows that match as well)
    for path in csv_paths:
        for line, image_id, record, column in records(path, id_column):
            parts = id_parts(image_id)
            candidates = wanted.get(parts[-1]) if parts else None
            if not candidates:
                continue
            row = row_from_record(path, line, image_id, record, column)
            for key, image_parts in candidates:
                score = _common_suffix(image_parts, parts)
                held = best.get(key)
                if held is None or score > held[0]:
                    best[key] = (score, row, [])
                elif score == held[0]:
                    held[2].append(row)
    for key, (_, row, ties) in best.items():
        if ties:
            raise ChexmaskError(f"image {key}: several CheXmask rows match it equally well "
                                f"({row.where}; {ties[0].where}); give ids with their folders or "
                                "one CSV per collection")
    return {key: row for key, (_, row, _) in best.items()}


def row_from_record(path, line, image_id, record, id_column=""):
    where = f"{path} line {line} ({image_id})"
    size = []
    for name in ("Height", "Width"):
        value = _number(record.get(name), name, where) if name in record else PREPROCESSED_SIZE
        if value is None or value < 1 or value != int(value):
            raise ChexmaskError(f"{where}: {name} {record.get(name)!r} is not a positive integer")
        size.append(int(value))
    return Row(csv=str(path), line=line, image_id=image_id,
               dice_mean=_number(record.get(DICE_MEAN), DICE_MEAN, where),
               dice_max=_number(record.get(DICE_MAX), DICE_MAX, where),
               height=size[0], width=size[1], rles={o: record.get(c) for o, c in ORGANS.items()},
               id_column=id_column)
