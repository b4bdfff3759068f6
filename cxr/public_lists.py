"""Readers of the public chest X-ray data sets' own list files: NIH ChestX-ray14, CheXpert and
MIMIC-CXR-JPG, as they ship. Each returns dataset.py's entries, (path relative to the data set's
folder, findings joined by '|', line of the list, patient id), so the films are multi-label:
relevance, sampling and the losses use the findings (see cxr/multilabel_metrics.py, sampler.py).

    nih       list: train_val_list.txt / test_list.txt (one image name a line); labels, patient
              and view from Data_Entry_2017.csv beside it (or the label file given); images under
              <dataset folder>/images/ or <dataset folder>/images_NNN/images/
    chexpert  list: train.csv / valid.csv / the test labels' CSV; `Path` relative to the folder
              holding CheXpert-v1.0(-small); patient from the path (patientNNNNN)
    mimic     list: mimic-cxr-2.0.0-split.csv(.gz), the films of one split (`split` option:
              train, validate or test); labels per study from mimic-cxr-2.0.0-chexpert.csv(.gz)
              and views from mimic-cxr-2.0.0-metadata.csv(.gz) beside it; images at
              files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg; patient = subject_id

CheXpert-style labels (CheXpert, MIMIC): 1 positive, 0 or blank negative, -1 uncertain (negative
with uncertain="zeros", the default; positive with "ones"). The findings are the positive
observations other than "Support Devices" (not a pathology: CheXpert's own "No Finding" allows
devices, and as a finding it would make every film with a line or tube relevant to every other);
a film without one is "No Finding". Views: "frontal" (the default: PA and AP films), "lateral"
or "all". MIMIC-CXR studies missing from the label file are left out, with one warning.
"""
import csv
import gzip
import os
import re
import warnings
from pathlib import Path

NO_FINDING = "No Finding"
PUBLIC_FORMATS = ("nih", "chexpert", "mimic")
VIEWS = ("frontal", "lateral", "all")
UNCERTAIN_POLICIES = ("zeros", "ones")
MIMIC_SPLITS = ("train", "validate", "test")
# The 14 observations of CheXpert and MIMIC-CXR-JPG's CheXpert labeller ("No Finding" among them).
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices")
NOT_FINDINGS = ("Support Devices",)  # observations that are not findings (see above)
NIH_LABEL_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
MIMIC_LABEL_FILE = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
FRONTAL_POSITIONS = {"PA", "AP"}
LATERAL_POSITIONS = {"LATERAL", "LL", "RL", "XTABLE LATERAL"}


def default_lists(dataset, dataset_dir):
    """(training list, test list) of a public data set in its folder, as it ships."""
    root = Path(dataset_dir)
    if dataset == "nih":
        return str(root / "train_val_list.txt"), str(root / "test_list.txt")
    if dataset == "chexpert":
        folder = next((root / name for name in ("CheXpert-v1.0-small", "CheXpert-v1.0") if (root / name).is_dir()),
                      root / "CheXpert-v1.0-small")
        return str(folder / "train.csv"), str(folder / "valid.csv")
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    split = split if split.is_file() else root / "mimic-cxr-2.0.0-split.csv"
    return str(split), str(split)


class ListError(ValueError):
    """A problem with a public list or label file; the message names file and line."""


def check_options(views, uncertain, split=None):
    if views not in VIEWS:
        raise ListError(f"unknown view '{views}' (--views); choose one of {', '.join(VIEWS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ListError(f"unknown uncertain-label policy '{uncertain}' (--uncertain); choose one of "
                        f"{', '.join(UNCERTAIN_POLICIES)}")
    if split is not None and split not in MIMIC_SPLITS:
        raise ListError(f"unknown MIMIC-CXR split '{split}'; choose one of {', '.join(MIMIC_SPLITS)}")


def view_kept(view, views):
    """Whether a film of view 'frontal', 'lateral' or 'other' is kept under the --views choice."""
    return views == "all" or view == views


def open_text(path):
    """A text file, read through gzip when it ends in .gz (MIMIC ships its CSVs compressed)."""
    path = Path(path)  # utf-8-sig: a file re-saved by a spreadsheet starts with a byte-order mark
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="") if path.suffix == ".gz" else \
        open(path, encoding="utf-8-sig", newline="")


def csv_rows(path, required, what):
    """(reader rows with their line numbers) of a CSV that must hold the `required` columns."""
    with open_text(path) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [column for column in required if column not in fields]
        if missing:
            raise ListError(f"{path}:1: {what} needs the column(s) {', '.join(repr(c) for c in missing)} "
                            f"(found: {', '.join(fields) or 'no header'})")
        return [(row, reader.line_num) for row in reader]


def beside(list_file, names, given=None, flag="--label-file"):
    """The first of the files `names` (or name.gz) in the list file's folder, or `given`; an error
    when absent."""
    names = (names,) if isinstance(names, str) else names
    if given:
        if not Path(given).is_file():
            raise ListError(f"label file not found: {given} (check {flag})")
        return Path(given)
    for name in names:
        for candidate in (Path(list_file).parent / name, Path(list_file).parent / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise ListError(f"{list_file}: the labels are read from {' or '.join(names)}(.gz) beside the list, which is "
                    f"not in {Path(list_file).parent}; put it there or give it with {flag}")


def row_findings(row, columns, where, uncertain):
    """'A|B' of a CheXpert-style label row: the positive observations that are findings (not
    NOT_FINDINGS), 'No Finding' for none."""
    positive = []
    for column in columns:
        value = (row.get(column) or "").strip()
        if value in ("", "0", "0.0", "0.00"):
            continue
        if value in ("1", "1.0", "1.00"):
            positive.append(column)
        elif value in ("-1", "-1.0", "-1.00"):
            if uncertain == "ones":
                positive.append(column)
        else:
            raise ListError(f"{where}: column '{column}' holds {value!r}; CheXpert-style labels are "
                            "1 (positive), 0 or blank (negative) and -1 (uncertain)")
    positive = [name for name in positive if name != NO_FINDING and name not in NOT_FINDINGS]
    return "|".join(sorted(positive)) if positive else NO_FINDING


# --------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------------
def nih_image_index(image_root):
    """{image name: path relative to image_root} over images/ and images_NNN/images/."""
    index = {}
    for folder in sorted(Path(image_root).glob("images*")):
        inner = folder / "images" if (folder / "images").is_dir() else folder
        if inner.is_dir():
            for entry in os.scandir(inner):
                index.setdefault(entry.name, str(Path(os.path.relpath(entry.path, image_root))))
    return index


def read_nih_list(list_file, image_root, label_file=None, views="frontal"):
    check_options(views, "zeros")
    label_path = beside(list_file, NIH_LABEL_FILES, label_file)
    rows = csv_rows(label_path, ("Image Index", "Finding Labels", "Patient ID"), "the NIH label file")
    labels = {row["Image Index"].strip(): (row, line) for row, line in rows}
    index = nih_image_index(image_root)
    entries = []
    with open(list_file, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if name not in labels:
                raise ListError(f"{list_file}:{number}: {name} is not in the label file {label_path}; "
                                "list only films the label file holds (or give the right --label-file)")
            row, label_line = labels[name]
            view = view_of_position(row.get("View Position", "PA"))
            if not view_kept(view, views):
                continue
            findings = [part.strip() for part in row["Finding Labels"].split("|") if part.strip()]
            if not findings:
                raise ListError(f"{label_path}:{label_line}: empty 'Finding Labels' for {name}")
            entries.append((index.get(name, str(Path("images") / name)), "|".join(sorted(set(findings))),
                            number, row["Patient ID"].strip()))
    return entries


def view_of_position(position):
    position = (position or "").strip().upper()
    if position in FRONTAL_POSITIONS:
        return "frontal"
    return "lateral" if position in LATERAL_POSITIONS else "other"


# --------------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------------
def read_chexpert_list(list_file, views="frontal", uncertain="zeros"):
    check_options(views, uncertain)
    rows = csv_rows(list_file, ("Path",), "a CheXpert list")
    columns = [c for c in CHEXPERT_OBSERVATIONS if c in (rows[0][0] if rows else {})]
    if rows and not columns:
        raise ListError(f"{list_file}:1: no CheXpert observation column (e.g. 'Cardiomegaly', 'No Finding') "
                        "in the header; is this CheXpert's train.csv / valid.csv?")
    entries = []
    for row, line in rows:
        where = f"{list_file}:{line}"
        path = row["Path"].strip()
        patient = re.search(r"(patient\d+)", path)
        if patient is None:
            raise ListError(f"{where}: no patient id (patientNNNNN) in the path {path!r}")
        side = (row.get("Frontal/Lateral") or "").strip().lower()
        if not side:  # the test labels' CSV has no view column: the file name says it
            side = "lateral" if "lateral" in Path(path).name.lower() else "frontal"
        if side not in ("frontal", "lateral"):
            raise ListError(f"{where}: 'Frontal/Lateral' holds {row['Frontal/Lateral']!r}; expected Frontal or Lateral")
        if view_kept(side, views):
            entries.append((path, row_findings(row, columns, where, uncertain), line, patient.group(1)))
    return entries


# --------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# --------------------------------------------------------------------------------------------
def read_mimic_list(split_file, split="train", views="frontal", uncertain="zeros", label_file=None,
                    metadata_file=None):
    check_options(views, uncertain, split)
    label_path = beside(split_file, MIMIC_LABEL_FILE, label_file)
    metadata_path = beside(split_file, MIMIC_METADATA_FILE, metadata_file, "--metadata-file")
    label_rows = csv_rows(label_path, ("subject_id", "study_id"), "the MIMIC-CXR CheXpert label file")
    columns = [c for c in CHEXPERT_OBSERVATIONS if c in (label_rows[0][0] if label_rows else {})]
    studies = {(row["subject_id"].strip(), row["study_id"].strip()): (row, line) for row, line in label_rows}
    positions = {row["dicom_id"].strip(): row.get("ViewPosition", "")
                 for row, _ in csv_rows(metadata_path, ("dicom_id", "ViewPosition"), "the MIMIC-CXR metadata file")}
    entries, unlabelled = [], []
    for row, line in csv_rows(split_file, ("dicom_id", "study_id", "subject_id", "split"), "the MIMIC-CXR split file"):
        if row["split"].strip() != split:
            continue
        dicom, study, subject = row["dicom_id"].strip(), row["study_id"].strip(), row["subject_id"].strip()
        where = f"{split_file}:{line}"
        if dicom not in positions:
            raise ListError(f"{where}: {dicom} is not in the metadata file {metadata_path}")
        if not view_kept(view_of_position(positions[dicom]), views):
            continue
        if (subject, study) not in studies:  # a few studies of the release have no labels
            unlabelled.append(f"s{study} of p{subject} (line {line})")
            continue
        label_row, label_line = studies[(subject, study)]
        findings = row_findings(label_row, columns, f"{label_path}:{label_line}", uncertain)
        path = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        entries.append((str(path), findings, line, subject))
    if unlabelled:
        warnings.warn(f"{split_file}: {len(unlabelled)} films of split '{split}' belong to studies the label file "
                      f"{label_path} does not hold and are left out, e.g. {unlabelled[0]}", stacklevel=2)
    return entries


def shares_a_finding(label, other):
    """Whether two label names are relevant to each other under relevance "any": equal, or
    finding combinations ("Cardiomegaly|Effusion") with a finding in common. Pictures and pages
    mark a neighbour right or wrong with it."""
    return label == other or bool(set(label.split("|")) & set(other.split("|")))
