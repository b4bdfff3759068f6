"""Datasets of labelled chest X-rays: COVIDx list files, CSV files and folder-per-class trees.

List formats (paths are relative to the image folder and may not leave it):
    covidx  `patient_id filename label [source]`, whitespace separated (COVIDx train/test lists)
    csv     a header with `filename,label` columns (other columns ignored)
    folder  `<image folder>/<label>/<image>`; the label is the sub-folder name

    train_set = ImageListDataset("data/train", "train_split.txt", transform=train_transform)
    test_set = ImageListDataset("data/test", "test_split.txt", classes=train_set.classes, ...)

Every problem is reported before training starts, with the list file and line: a missing list,
an empty list, a malformed line, an unknown label, paths leaving the image folder, and missing
images (all counted, the first few named). Images that cannot be decoded fail at load time with
their path. Grayscale images of any bit depth are scaled by their bit depth (see load_image).
"""
import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from model import IMAGENET_MEAN, IMAGENET_STD

LIST_FORMATS = ("covidx", "csv", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAYSCALE_BIT_DEPTHS = (8, 10, 12, 14, 16)


class DatasetError(ValueError):
    """A problem with a list file or an image folder; the message says where and what to do."""


# --------------------------------------------------------------------------------------------
# List files
# --------------------------------------------------------------------------------------------
def _check_relative(path_text, where):
    normalised = os.path.normpath(path_text)
    if os.path.isabs(normalised) or normalised == ".." or normalised.startswith(".." + os.sep):
        raise DatasetError(f"{where}: image path '{path_text}' leaves the image folder; "
                           "list paths relative to the image folder (--dataset-dir)")
    return normalised


def read_covidx_list(list_file):
    """[(filename, label, line_number)] from `patient_id filename label [source]` lines.

    Three fields: id, file, label. Four or more: the last two are label and source and the
    file name is everything between (a few COVIDx file names contain spaces).
    """
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{list_file}:{number}"
            if len(fields) < 3:
                raise DatasetError(f"{where}: expected 'patient_id filename label [source]', "
                                   f"got {line.strip()!r}")
            if len(fields) == 3:
                filename, label = fields[1], fields[2]
            else:
                filename, label = " ".join(fields[1:-2]), fields[-2]
            entries.append((_check_relative(filename, where), label, number))
    return entries


def read_csv_list(list_file):
    """[(filename, label, line_number)] from a CSV file with `filename` and `label` columns."""
    entries = []
    with open(list_file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filename", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{list_file}:1: CSV header must have columns 'filename' and 'label' "
                               f"(missing: {', '.join(sorted(missing))}; found: {reader.fieldnames})")
        for row in reader:
            where = f"{list_file}:{reader.line_num}"
            if not row["filename"] or not row["label"]:
                raise DatasetError(f"{where}: empty filename or label")
            entries.append((_check_relative(row["filename"].strip(), where),
                            row["label"].strip(), reader.line_num))
    return entries


def scan_folder(image_root):
    """[(relative path, label, 0)] for `<image_root>/<label>/<image>`."""
    entries = []
    for class_dir in sorted(p for p in Path(image_root).iterdir() if p.is_dir()):
        for image in sorted(class_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((str(image.relative_to(image_root)), class_dir.name, 0))
    return entries


def read_entries(image_root, list_file, list_format):
    if list_format not in LIST_FORMATS:
        raise DatasetError(f"unknown list format '{list_format}'; choose one of {', '.join(LIST_FORMATS)}")
    if not Path(image_root).is_dir():
        raise DatasetError(f"image folder not found: {image_root} (check --dataset-dir / --test-dataset-dir)")
    if list_format == "folder":
        entries = scan_folder(image_root)
        source = image_root
    else:
        if list_file is None or not Path(list_file).is_file():
            raise DatasetError(f"image list not found: {list_file} (check --train-image-list / "
                               "--test-image-list)")
        entries = read_covidx_list(list_file) if list_format == "covidx" else read_csv_list(list_file)
        source = list_file
    if not entries:
        raise DatasetError(f"{source}: no images listed; check the file and --dataset")
    return entries, source


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def _to_8bit(array):
    """Scale a grayscale array by its bit depth: 12-bit data in a 16-bit PNG (values up to
    4095) becomes the same picture as its 8-bit version, not a nearly black (or, clipped, a
    white) one. PNG files rarely carry their significant bits, so the depth is the smallest of
    8/10/12/14/16 bits that holds the image's maximum."""
    is_float = np.issubdtype(array.dtype, np.floating)
    array = array.astype(np.float64)
    if array.min() < 0:
        array = array - array.min()
    peak = array.max()
    if is_float and peak <= 1.0:
        full_scale = 1.0  # float images in [0, 1]
    else:
        full_scale = next((2.0 ** b - 1 for b in GRAYSCALE_BIT_DEPTHS if peak <= 2 ** b - 1), peak)
    return np.clip(np.rint(array / full_scale * 255.0), 0, 255).astype(np.uint8)


def load_image(path):
    """Decode any common X-ray export to an 8-bit RGB PIL image."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return Image.fromarray(_to_8bit(np.asarray(image)), mode="L").convert("RGB")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette: through RGBA so transparency is honoured
        return image.convert("RGB")


def build_transform(img_size, train, rand_resize=False, hflip=True):
    """Seed pipeline: resize to img_size * 1.125, then a random-resized or centre crop."""
    steps = [transforms.Resize(int(img_size * 1.125),
                               interpolation=transforms.InterpolationMode.BICUBIC)]
    if train and rand_resize:
        steps.append(transforms.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.85, 1.15)))
    else:
        steps.append(transforms.CenterCrop(img_size))
    if train and hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class ImageListDataset(Dataset):
    """Labelled images; `classes` fixes the label order (pass the training set's to the test set).

    Items are (image tensor (3, H, W), label id). `paths` and `targets` give every image's path
    and label id without loading it.
    """

    def __init__(self, image_root, list_file=None, list_format="covidx", classes=None,
                 transform=None, max_named_missing=5):
        entries, source = read_entries(image_root, list_file, list_format)
        labels = [label for _, label, _ in entries]
        if classes is None:
            classes = sorted(set(labels))
        self.classes = list(classes)
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        for _, label, line in entries:
            if label not in class_to_idx:
                raise DatasetError(f"{source}:{line}: unknown label '{label}'; the known labels "
                                   f"are {', '.join(self.classes)} (from the training list)")
        self.image_root = Path(image_root)
        self.paths = [self.image_root / filename for filename, _, _ in entries]
        missing = [(p, line) for p, (_, _, line) in zip(self.paths, entries) if not p.is_file()]
        if missing:
            named = "\n".join(f"  {p} (line {line})" for p, line in missing[:max_named_missing])
            raise DatasetError(f"{source}: {len(missing)} of {len(entries)} listed images do not "
                               f"exist under {image_root}, e.g.\n{named}\nCheck --dataset-dir "
                               "(images are read from <dataset-dir>/train and <dataset-dir>/test)")
        self.targets = torch.tensor([class_to_idx[label] for label in labels])
        self.source = source
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = load_image(path)
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for bad files
            raise DatasetError(f"cannot read image {path} (listed in {self.source}): {error}. "
                               "Replace the file or remove it from the list") from error
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
