"""Datasets of labelled chest X-rays: COVIDx list files, CSV files, folder-per-class trees and
the public data sets' own lists (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG: cxr/public_lists.py).

List formats (paths are relative to the image folder and may not leave it):
    covidx  `patient_id filename label [source]`, whitespace separated (COVIDx train/test lists)
    csv     a header with `filename,label` columns and an optional `patient_id` column (without
            it every image is its own patient, with a warning); several findings of one film
            are joined by '|' in the label column ("Cardiomegaly|Effusion")
    folder  `<image folder>/<label>/<image>`; the label is the sub-folder name
    nih, chexpert, mimic  the data sets' own split and label files, as they ship

Multi-label lists (the public formats, and any list with a '|' label) keep each film's findings:
`classes` are then the finding combinations of the list (what a flattening user would get),
`findings` the single findings, and `finding_matrix()` the films x findings table that relevance,
the PK sampler and the losses use.

    train_set = ImageListDataset("data/train", "train_split.txt", transform=train_transform)
    test_set = ImageListDataset("data/test", "test_split.txt", classes=train_set.classes, ...)

Every problem is reported before training starts, with the list file and line: a missing list,
an empty list, a malformed line, an unknown label (or two spellings of one, 'Normal' beside
'normal'), paths leaving the image folder, and missing images (all counted, the first few
named). `check_images` finds unreadable files up front (or drops them: --skip-bad-images);
an image that still cannot be decoded fails at load time with its path and list line. 16-bit
images are scaled by one bit depth per data set, DICOM files through their LUTs (cxr/images.py).
"""
import copy
import csv
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import Dataset
from torchvision import transforms

from cxr import public_lists
from cxr.images import IMAGE_SUFFIXES, depth_of, inspect_image, load_image
from cxr.progress import progress as progress_of
from cxr.public_lists import NO_FINDING, PUBLIC_FORMATS

LIST_FORMATS = ("covidx", "csv", "folder", *PUBLIC_FORMATS)
SHIPPED_LAYOUT = {"nih": "images/ or images_001/images/ ...", "chexpert": "CheXpert-v1.0-small/ (or CheXpert-v1.0/)",
                  "mimic": "files/p10/ ... p19/"}


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


# Every list-format error ends with this: one --dataset governs the lists unless a list has its own flag.
OTHER_FORMAT = ("; if this list is in another format, set its format: --dataset, or --gallery-dataset "
                "(test.py) / --val-dataset (train.py) for a gallery or validation list that differs")


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
                                   f"got {line.strip()!r}{OTHER_FORMAT}")
            if len(fields) == 3:
                filename, label = fields[1], fields[2]
            else:
                filename, label = " ".join(fields[1:-2]), fields[-2]
            entries.append((_check_relative(filename, where), label, number, fields[0]))
    return entries


def read_csv_list(list_file):
    """[(filename, label, line_number, patient_id)] from a CSV file with `filename` and `label`
    columns; an optional `patient_id` column groups images of one patient (else each image is
    its own patient, and a warning says so once)."""
    entries = []
    with open(list_file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filename", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{list_file}:1: CSV header must have columns 'filename' and 'label' "
                               f"(missing: {', '.join(sorted(missing))}; found: {reader.fieldnames}){OTHER_FORMAT}")
        if "patient_id" not in reader.fieldnames:
            warnings.warn(f"{list_file} has no 'patient_id' column, so every image counts as its own "
                          "patient: follow-up films of one patient can then retrieve each other and sit on "
                          "both sides of a split. Add a patient_id column", stacklevel=2)
        for row in reader:
            where = f"{list_file}:{reader.line_num}"
            if not row["filename"] or not row["label"]:
                raise DatasetError(f"{where}: empty filename or label")
            filename = _check_relative(row["filename"].strip(), where)
            patient = (row.get("patient_id") or "").strip() or filename
            entries.append((filename, row["label"].strip(), reader.line_num, patient))
    return entries


PATIENTS_FILE = "patients.csv"


def scan_folder(image_root):
    """[(relative path, label, 0, patient)] for `<image_root>/<label>/<image>`. The patient of
    each image comes from a `patients.csv` (columns `filename`, `patient_id`) in image_root
    (file names relative to it, e.g. normal/a.png) or in its parent folder (relative to that,
    e.g. train/normal/a.png, one file for both splits); an image it does not name is its own
    patient."""
    image_root = Path(image_root)
    patients = {}
    for folder, prefix in ((image_root.parent, Path(image_root.name)), (image_root, Path())):
        if (folder / PATIENTS_FILE).is_file():
            for filename, (patient, line) in read_patients(folder / PATIENTS_FILE).items():
                if not (folder / filename).is_file():  # a typo would silently make it its own patient
                    raise DatasetError(f"{folder / PATIENTS_FILE}:{line}: {filename} is not a file under "
                                       f"{folder}; file names are relative to the patients file's folder")
                if Path(filename).parts[:len(prefix.parts)] == prefix.parts:
                    patients[str(Path(filename).relative_to(prefix))] = patient
    entries = []
    for class_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                relative = str(image.relative_to(image_root))
                entries.append((relative, class_dir.name, 0, patients.get(relative, relative)))
    return entries


def read_patients(csv_file):
    """{file name: (patient id, line)} from a CSV file with `filename` and `patient_id` columns."""
    with open(csv_file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filename", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_file}:1: the patients file needs columns 'filename' and "
                               f"'patient_id' (missing: {', '.join(sorted(missing))}; found: {reader.fieldnames})")
        patients = {}
        for row in reader:
            filename, patient = (row["filename"] or "").strip(), (row["patient_id"] or "").strip()
            if not filename or not patient:
                raise DatasetError(f"{csv_file}:{reader.line_num}: empty filename or patient_id")
            patients[str(Path(_check_relative(filename, f"{csv_file}:{reader.line_num}")))] = (patient, reader.line_num)
    return patients


def read_entries(image_root, list_file, list_format, folder_flag=None, options=None):
    """(entries, source) of a list; folder_flag: the program's flag for image_root and what it
    holds, named in the errors (e.g. "--dataset-dir, the folder holding train/ and test/");
    options: the public formats' {"views", "uncertain", "label_file", "split"}."""
    if list_format not in LIST_FORMATS:
        raise DatasetError(f"unknown list format '{list_format}'; choose one of {', '.join(LIST_FORMATS)}")
    if not Path(image_root).is_dir():
        raise DatasetError(f"image folder not found: {image_root} (check {folder_flag or 'the image folder given'})")
    if list_format == "folder":
        entries = scan_folder(image_root)
        source = image_root
    else:
        if list_file is None or not Path(list_file).is_file():
            raise DatasetError(f"image list not found: {list_file} (check --train-image-list / "
                               "--test-image-list)")
        try:
            entries = read_list(image_root, list_file, list_format, options or {})
        except public_lists.ListError as error:
            raise DatasetError(str(error)) from error
        source = list_file
    if not entries:
        expected = {"covidx": "'patient_id filename label [source]' lines (--dataset covid or demo)",
                    "csv": "a CSV with filename and label columns (--dataset csv)",
                    "folder": "<folder>/<label>/<image> files (--dataset folder)",
                    "nih": "NIH image names, one a line (--dataset nih)",
                    "chexpert": "a CheXpert CSV with frontal films (--dataset chexpert; --views all for "
                                "the laterals)",
                    "mimic": "the films of one split of MIMIC-CXR-JPG's split file (--dataset mimic)"}[list_format]
        raise DatasetError(f"{source}: no images found, read as {expected}{OTHER_FORMAT}")
    return entries, source


def read_list(image_root, list_file, list_format, options):
    if list_format == "covidx":
        return read_covidx_list(list_file)
    if list_format == "csv":
        return read_csv_list(list_file)
    views, uncertain = options.get("views") or "frontal", options.get("uncertain") or "zeros"
    if list_format == "nih":
        return public_lists.read_nih_list(list_file, image_root, options.get("label_file"), views)
    if list_format == "chexpert":
        return [(_check_relative(path, f"{list_file}:{line}"), label, line, patient)
                for path, label, line, patient in public_lists.read_chexpert_list(list_file, views, uncertain)]
    return public_lists.read_mimic_list(list_file, options.get("split") or "train", views, uncertain,
                                        options.get("label_file"), options.get("metadata_file"))


def canonical_findings(label, where):
    """'A|B' with its findings stripped, deduplicated and sorted: one spelling per combination;
    an empty finding or "No Finding" beside a finding is an error."""
    findings = sorted({part.strip() for part in label.split("|")})
    if "" in findings:
        raise DatasetError(f"{where}: empty finding in the label {label!r}; join findings with '|', "
                           "e.g. Cardiomegaly|Effusion")
    if NO_FINDING in findings and len(findings) > 1:
        raise DatasetError(f"{where}: '{NO_FINDING}' beside findings in {label!r}; a film has findings or "
                           f"is '{NO_FINDING}'")
    return "|".join(findings)


# --------------------------------------------------------------------------------------------
# Images (decoding lives in cxr/images.py)
# --------------------------------------------------------------------------------------------
def _parallel(function, items, workers, desc, progress=True):
    """[function(item)] over a thread pool with a progress bar; Pillow and zlib decode outside
    the GIL, so threads use the cores."""
    workers = max(1, min(workers or os.cpu_count() or 1, 16))
    with ThreadPoolExecutor(workers) as pool:
        return list(progress_of(pool.map(function, items), desc, total=len(items),
                                enabled=progress and len(items) >= 200))


def scan_bit_depth(paths, sample=256, workers=None):
    """The bit depth of a data set's grayscale images of more than 8 bits: the smallest of
    8/10/12/14/16 that holds the maximum over (an even sample of up to `sample` of) them, or
    None when there are none. One depth for the whole set, so two films of one scanner keep
    their relative brightness (see cxr/images.py)."""
    paths = list(paths)
    if sample and len(paths) > sample:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, sample).round().astype(int)]
    peaks = [peak for _, peak in _parallel(lambda p: inspect_image(p, decode=False, peak=True),
                                           paths, workers, "bit depth")
             if peak is not None]
    return depth_of(max(peaks)) if peaks else None


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
    steps += [transforms.ToTensor(), three_channels, transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def three_channels(tensor):
    """A one-channel image (the image cache's grey radiographs) as the three equal channels the
    backbones take; a three-channel tensor as it is."""
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def label_key(label):
    """Labels equal up to case, spaces, '_' and '-' share a key ('Normal', 'normal ', 'COVID_19')."""
    return re.sub(r"[\s_-]+", "", label.casefold())


def check_label_spelling(entries, source):
    """A DatasetError when two labels of one list differ only by case or spacing: 'Normal'
    beside 'normal' would otherwise become a class of its own."""
    first_line, count = {}, {}
    for _, label, line, _ in entries:
        first_line.setdefault(label, line)
        count[label] = count.get(label, 0) + 1
    spellings = {}
    for label in first_line:
        spellings.setdefault(label_key(label), []).append(label)
    clashes = [sorted(names, key=first_line.get) for names in spellings.values() if len(names) > 1]
    if clashes:
        described = "; ".join(" vs ".join(f"'{name}' ({count[name]} images, first on line "
                                           f"{first_line[name]})" for name in names) for names in clashes)
        raise DatasetError(f"{source}: labels that differ only by case or spacing would become "
                           f"separate classes: {described}. Write each class one way in the list")


class ImageListDataset(Dataset):
    """Labelled images; `classes` fixes the label order (pass the training set's to the test set).

    Items are (image tensor (3, H, W), label id). `paths`, `lines` and `targets` give every
    image's path, list line and label id without loading it. `bit_depth`: the depth 16-bit
    images are scaled by: "auto" scans the set (see scan_bit_depth), a number fixes it, None
    scales each image by its own maximum.
    """

    def __init__(self, image_root, list_file=None, list_format="covidx", classes=None,
                 transform=None, max_named_missing=5, bit_depth="auto", folder_flag=None,
                 multilabel=False, list_options=None):
        """multilabel: read the list as multi-label even without a '|' label (a test list of a
        multi-label run); classes of a multi-label list are known combinations to keep first
        (the training list's), its new ones follow; list_options: see read_entries."""
        entries, source = read_entries(image_root, list_file, list_format, folder_flag, list_options)
        labels = [entry[1] for entry in entries]
        self.multilabel = bool(multilabel or list_format in PUBLIC_FORMATS or any("|" in label for label in labels))
        if self.multilabel:
            labels = [canonical_findings(label, f"{source}:{line}") for label, (_, _, line, _) in zip(labels, entries)]
            check_label_spelling([(None, finding, line, None) for label, (_, _, line, _) in zip(labels, entries)
                                  for finding in label.split("|")], source)
            known = list(classes or [])
            classes = known + sorted(set(labels) - set(known))
        elif classes is None:
            check_label_spelling(entries, source)
            classes = sorted(set(labels))
        self.classes = list(classes)
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        for label, (_, _, line, _) in zip(labels, entries):
            if label not in class_to_idx:
                similar = [c for c in self.classes if label_key(c) == label_key(label)]
                hint = f" (did you mean '{similar[0]}'?)" if similar else ""
                raise DatasetError(f"{source}:{line}: unknown label '{label}'{hint}; the known labels "
                                   f"are {', '.join(self.classes)} (from the training list)")
        self.image_root = Path(image_root)
        self.paths = [self.image_root / entry[0] for entry in entries]
        self.lines = [entry[2] for entry in entries]
        self.patients = [entry[3] for entry in entries]
        missing = [(p, entry[2]) for p, entry in zip(self.paths, entries) if not p.is_file()]
        if missing and len(missing) == len(entries) and list_format in PUBLIC_FORMATS:
            raise DatasetError(f"{source}: none of the list's {len(entries)} films is under {image_root} "
                               f"(e.g. {missing[0][0]}); give the folder the data set unpacked into, which "
                               f"holds {SHIPPED_LAYOUT[list_format]} (check "
                               f"{folder_flag or 'the folder the list names its images under'})")
        if missing:
            named = "\n".join(f"  {p} (line {line})" for p, line in missing[:max_named_missing])
            raise DatasetError(f"{source}: {len(missing)} of {len(entries)} listed images do not "
                               f"exist under {image_root}, e.g.\n{named}\nCheck "
                               f"{folder_flag or 'the folder the list names its images under'}")
        self.targets = torch.tensor([class_to_idx[label] for label in labels])
        self.source = source
        self.transform = transform
        self.bit_depth = scan_bit_depth(self.paths) if bit_depth == "auto" else bit_depth
        self.cache = None  # an image_cache.ImageCache: see use_cache

    def use_cache(self, cache):
        """Read images through `cache` (an image_cache.ImageCache, or None for none); subsets
        made afterwards share it."""
        self.cache = cache
        return self

    def __len__(self):
        return len(self.paths)

    @property
    def findings(self):
        """The single findings of the list's films, sorted (for a single-label list, its classes
        present)."""
        present = torch.unique(self.targets).tolist() if len(self.targets) else []
        return sorted({finding for t in present for finding in self.findings_of_class(t)})

    def findings_of_class(self, class_index):
        name = self.classes[class_index]
        return name.split("|") if self.multilabel else [name]

    def combination_matrix(self, findings=None):
        """(classes, findings) bool: which findings each class (combination) holds; findings
        default to the list's own, and findings of a class not among them are left out."""
        findings = self.findings if findings is None else list(findings)
        column = {name: i for i, name in enumerate(findings)}
        table = torch.zeros(len(self.classes), len(findings), dtype=torch.bool)
        for c in range(len(self.classes)):
            for finding in self.findings_of_class(c):
                if finding in column:
                    table[c, column[finding]] = True
        return table

    def finding_matrix(self, findings=None):
        """(images, findings) bool: the findings of every film (see combination_matrix)."""
        return self.combination_matrix(findings)[self.targets]

    def where(self, index):
        """'path (list line N)' of one image, for messages."""
        line = f" (line {self.lines[index]} of {self.source})" if self.lines[index] else ""
        return f"{self.paths[index]}{line}"

    def subset(self, indices, transform=None):
        """A copy holding only `indices` (same classes), with its own transform."""
        part = copy.copy(self)
        part.paths = [self.paths[i] for i in indices]
        part.lines = [self.lines[i] for i in indices]
        part.patients = [self.patients[i] for i in indices]
        part.targets = self.targets[torch.as_tensor(indices, dtype=torch.long)]
        part.transform = transform
        return part

    def find_bad_images(self, decode=True, workers=None, progress=True):
        """([(index, problem)] of the images that do not decode (decode=False: whose header does
        not read, which is fast but misses truncated files), the bit depth measured on every
        image (with decode; None when no image has more than 8 bits))."""
        results = _parallel(lambda p: inspect_image(p, decode, peak=decode), self.paths, workers,
                            "checking images", progress)
        peaks = [peak for _, peak in results if peak is not None]
        bad = [(i, problem) for i, (problem, _) in enumerate(results) if problem is not None]
        return bad, (depth_of(max(peaks)) if peaks else None)

    def check_images(self, skip_bad=False, workers=None, progress=True, max_named=5, bad=None):
        """Check every image before training (or take `bad` from find_bad_images): without
        skip_bad the headers, and a DatasetError counts the unreadable files and names the first
        few with their lines; with skip_bad a full decode, and the bad images are dropped.
        Returns [(path, list line, problem)] of the dropped images."""
        if bad is None:
            bad, _ = self.find_bad_images(decode=skip_bad, workers=workers, progress=progress)
        if bad and not skip_bad:
            named = "\n".join(f"  {self.where(i)}: {problem}" for i, problem in bad[:max_named])
            raise DatasetError(f"{self.source}: {len(bad)} of {len(self)} images cannot be read, "
                               f"e.g.\n{named}\nReplace or unlist them, or pass --skip-bad-images "
                               "to drop every unreadable image before training")
        dropped = [(self.paths[i], self.lines[i], problem) for i, problem in bad]
        if bad:
            keep = sorted(set(range(len(self))) - {i for i, _ in bad})
            if not keep:
                raise DatasetError(f"{self.source}: none of the {len(self)} images can be read "
                                   f"(e.g. {self.where(bad[0][0])}: {bad[0][1]})")
            kept = self.subset(keep, self.transform)
            self.paths, self.lines, self.patients, self.targets = (kept.paths, kept.lines,
                                                                   kept.patients, kept.targets)
        return dropped

    def __getitem__(self, index):
        try:
            if self.cache is not None:
                image = self.cache.load(self.paths[index], self.bit_depth)
            else:
                image = load_image(self.paths[index], self.bit_depth)
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for bad files
            raise DatasetError(f"cannot read image {self.where(index)}: {error}. Replace the file "
                               "or remove it from the list (train.py --skip-bad-images drops "
                               "unreadable images before training)") from error
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
    patients_of = {}  # class -> its patients, in list order (grouped once: a multi-label list has
    for patient, indices in images_of.items():  # thousands of finding combinations)
        patients_of.setdefault(targets[indices[0]], []).append(patient)
    held_out = []
    for label in range(len(dataset.classes)):
        patients = patients_of.get(label, [])
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
