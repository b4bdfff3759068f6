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
import copy
import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

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
    """[(filename, label, line_number, patient_id)] from `patient_id filename label [source]` lines.

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
            entries.append((_check_relative(filename, where), label, number, fields[0]))
    return entries


def read_csv_list(list_file):
    """[(filename, label, line_number, patient_id)] from a CSV file with `filename` and `label`
    columns; an optional `patient_id` column groups images of one patient (else each image is
    its own patient)."""
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
            filename = _check_relative(row["filename"].strip(), where)
            patient = (row.get("patient_id") or "").strip() or filename
            entries.append((filename, row["label"].strip(), reader.line_num, patient))
    return entries


def scan_folder(image_root):
    """[(relative path, label, 0, relative path)] for `<image_root>/<label>/<image>`; every
    image is its own patient."""
    entries = []
    for class_dir in sorted(p for p in Path(image_root).iterdir() if p.is_dir()):
        for image in sorted(class_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                relative = str(image.relative_to(image_root))
                entries.append((relative, class_dir.name, 0, relative))
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
    """Resize the whole radiograph to img_size x img_size; for training optionally a random
    crop of 70-100% of it (--rand-resize) and a horizontal flip.

    Never a centre crop: resizing the short side and cropping the centre (the seed's pipeline)
    cuts about 14% off the top and bottom of a portrait film, costophrenic angles included,
    where an effusion shows. Squashing the aspect ratio a little is the same for every image
    and keeps the whole chest.
    """
    bicubic = transforms.InterpolationMode.BICUBIC
    steps = [transforms.Resize((img_size, img_size), interpolation=bicubic)]
    if train and rand_resize:  # random position and scale, so no border is cut systematically
        steps.append(transforms.RandomResizedCrop(img_size, scale=(0.7, 1.0), ratio=(0.85, 1.15),
                                                  interpolation=bicubic))
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
        labels = [entry[1] for entry in entries]
        if classes is None:
            classes = sorted(set(labels))
        self.classes = list(classes)
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        for _, label, line, _ in entries:
            if label not in class_to_idx:
                raise DatasetError(f"{source}:{line}: unknown label '{label}'; the known labels "
                                   f"are {', '.join(self.classes)} (from the training list)")
        self.image_root = Path(image_root)
        self.paths = [self.image_root / entry[0] for entry in entries]
        self.patients = [entry[3] for entry in entries]
        missing = [(p, entry[2]) for p, entry in zip(self.paths, entries) if not p.is_file()]
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

    def subset(self, indices, transform=None):
        """A copy holding only `indices` (same classes), with its own transform."""
        part = copy.copy(self)
        part.paths = [self.paths[i] for i in indices]
        part.patients = [self.patients[i] for i in indices]
        part.targets = self.targets[torch.as_tensor(indices, dtype=torch.long)]
        part.transform = transform
        return part

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


def split_by_patient(dataset, fraction, seed=0):
    """(train indices, validation indices): about `fraction` of each class's images held out,
    drawn patient by patient, so no patient is on both sides (near-identical films of one
    patient on both sides would make validation optimistic).

    Written by hand rather than with scikit-learn's StratifiedGroupKFold, whose fold sizes
    follow 1 / n_splits and cannot hit a fraction such as 0.15. A patient counts for the class
    of their first image.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    images_of = {}  # patient -> image indices, in list order
    for index, patient in enumerate(dataset.patients):
        images_of.setdefault(patient, []).append(index)
    rng = np.random.default_rng(seed)
    targets = dataset.targets.tolist()
    held_out = []
    for label in range(len(dataset.classes)):
        patients = [p for p, idx in images_of.items() if targets[idx[0]] == label]
        total = sum(len(images_of[p]) for p in patients)
        # At most half of a class, so it stays in training; at least 2 images where patients
        # allow, so a validation query has a relevant item.
        cap = total // 2
        wanted = min(max(2, round(fraction * total)), cap)
        taken = 0
        for position in rng.permutation(len(patients)):
            if taken >= wanted:
                break
            images = images_of[patients[position]]
            if taken + len(images) > cap:  # a patient too large for what is left: skip
                continue
            held_out += images
            taken += len(images)
    held = set(held_out)
    return [i for i in range(len(dataset)) if i not in held], sorted(held)
