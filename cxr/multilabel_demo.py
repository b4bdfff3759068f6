"""Multi-label phantoms, written in the layout of a public data set, so every reader (and
training on several findings a film) can be tried without the real data (demo_data.py
--multilabel is its command):

    write_multilabel_demo(out_dir, list_format="nih", train_films=1000, test_films=400, ...)

The films: a share `pair_share` carries two findings at once, drawn with the rates of
PAIR_WEIGHTS (cardiomegaly with an effusion most often, as in NIH ChestX-ray14), the others
one finding each, uniformly; a share `followup_share` is a later film of the previous film's
patient (same findings, a new picture); a share `lateral_share` of the studies adds a lateral
view (a phantom turned on its side: every reader leaves it out by default); in the CheXpert
and MIMIC layouts a share `uncertain_share` of the films marks one finding they do not have
as uncertain (-1), which the default policy (--uncertain zeros) reads as negative.

Layouts (list_format):
    nih       images/<name>.png, Data_Entry_2017.csv, train_val_list.txt, test_list.txt
    chexpert  CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg,
              CheXpert-v1.0-small/train.csv and valid.csv (valid.csv holds the test films)
    mimic     files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg, mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz
    csv       train/ and test/ PNGs with train.csv and test.csv (filename,label,patient_id; the
              findings joined by '|') and lung / heart / lesion masks under masks/
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cxr import phantom
from cxr.atomic_files import new_folder
from cxr.demo_dataset import map_in_processes
from cxr.public_lists import CHEXPERT_OBSERVATIONS, NO_FINDING

LAYOUTS = ("nih", "chexpert", "mimic", "csv")
SINGLE = ("normal", "pneumonia", "COVID-19", "effusion", "cardiomegaly")
PAIR_WEIGHTS = {"cardiomegaly|effusion": 0.5, "effusion|pneumonia": 0.3, "COVID-19|effusion": 0.2}
# The phantom findings under the names each data set uses (COVID-19's ground glass is NIH's
# "Infiltration" and CheXpert's "Lung Opacity": neither data set has a COVID-19 label).
NIH_NAMES = {"normal": NO_FINDING, "pneumonia": "Pneumonia", "COVID-19": "Infiltration", "effusion": "Effusion",
             "cardiomegaly": "Cardiomegaly"}
CHEXPERT_NAMES = {"normal": NO_FINDING, "pneumonia": "Pneumonia", "COVID-19": "Lung Opacity",
                  "effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly"}
META_NAME = "multilabel_meta.json"


def draw_films(train_films, test_films, seed, pair_share, followup_share, lateral_share, uncertain_share):
    """[{"split", "index", "findings", "patient", "study", "view", "uncertain"}] in list order;
    patients never cross the split."""
    rng = np.random.default_rng([seed, 7])
    films, patient = [], -1
    pairs, weights = list(PAIR_WEIGHTS), np.array(list(PAIR_WEIGHTS.values()))
    for split, count in (("train", train_films), ("test", test_films)):
        previous, study = None, 0
        for _ in range(count):
            if previous is not None and rng.random() < followup_share:
                findings, study = previous["findings"], study + 1
            else:
                patient, study = patient + 1, 1
                if rng.random() < pair_share:
                    findings = pairs[rng.choice(len(pairs), p=weights / weights.sum())]
                else:
                    findings = SINGLE[rng.integers(len(SINGLE))]
            absent = [f for f in SINGLE[1:] if f not in findings.split("|")]
            uncertain = absent[rng.integers(len(absent))] if rng.random() < uncertain_share else None
            film = {"split": split, "findings": findings, "patient": patient, "study": study, "view": "frontal",
                    "uncertain": uncertain}
            films.append(film)
            previous = film
            if rng.random() < lateral_share:
                films.append({**film, "view": "lateral"})
    for index, film in enumerate(films):
        film["index"] = index
    return films


def _render(size, seed, film):
    """(8-bit image, masks) of one film; a lateral view is the phantom turned on its side."""
    rng = np.random.default_rng([seed, 8, film["index"]])
    image, masks, _ = phantom.make_phantom_with_info(rng, film["findings"], size)
    image = np.round(image * 255).astype(np.uint8)
    if film["view"] == "lateral":
        image = np.ascontiguousarray(np.rot90(image))
    return image, {name: mask.astype(np.uint8) * 255 for name, mask in masks.items()}


def write_multilabel_demo(out_dir, list_format="nih", train_films=1000, test_films=400, size=128, seed=0,
                          pair_share=0.2, followup_share=0.15, lateral_share=0.1, uncertain_share=0.1) -> Path:
    """Write the films into out_dir (which must not exist or be empty) in `list_format`'s layout;
    written in a hidden sibling folder and renamed into place. Same arguments -> same files."""
    if list_format not in LAYOUTS:
        raise ValueError(f"unknown layout '{list_format}'; choose one of {', '.join(LAYOUTS)}")
    for name, share in (("pair_share", pair_share), ("followup_share", followup_share),
                        ("lateral_share", lateral_share), ("uncertain_share", uncertain_share)):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    if min(train_films, test_films) < 1:
        raise ValueError("train_films and test_films must be at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or choose another folder")
    films = draw_films(train_films, test_films, seed, pair_share, followup_share, lateral_share, uncertain_share)
    rendered = map_in_processes(functools.partial(_render, size, seed), films)
    with new_folder(out_dir) as tmp:
        {"nih": _write_nih, "chexpert": _write_chexpert, "mimic": _write_mimic, "csv": _write_csv}[list_format](
            tmp, films, rendered)
        params = dict(list_format=list_format, train_films=train_films, test_films=test_films, size=size, seed=seed,
                      pair_share=pair_share, followup_share=followup_share, lateral_share=lateral_share,
                      uncertain_share=uncertain_share)
        (tmp / META_NAME).write_text(json.dumps({"params": params, "films": films}, indent=1) + "\n")
    return out_dir


def _save(image, path, jpeg=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if jpeg:
        Image.fromarray(image).save(path, quality=95)
    else:
        Image.fromarray(image).save(path, compress_level=1)


def _names(findings, table):
    return sorted(table[f] for f in findings.split("|"))


def _write_nih(root, films, rendered):
    rows, lists = [], {"train": [], "test": []}
    for film, (image, _) in zip(films, rendered):
        name = f"{film['patient'] + 1:08d}_{film['study'] - 1:03d}{'_lat' if film['view'] == 'lateral' else ''}.png"
        _save(image, root / "images" / name)
        rows.append({"Image Index": name, "Finding Labels": "|".join(_names(film["findings"], NIH_NAMES)),
                     "Follow-up #": film["study"] - 1, "Patient ID": film["patient"] + 1, "Patient Age": 50,
                     "Patient Gender": "F", "View Position": "LL" if film["view"] == "lateral" else "PA",
                     "OriginalImage[Width": image.shape[1], "Height]": image.shape[0],
                     "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143})
        lists[film["split"]].append(name)
    _write_csv_file(root / "Data_Entry_2017.csv", rows)
    (root / "train_val_list.txt").write_text("".join(f"{name}\n" for name in lists["train"]))
    (root / "test_list.txt").write_text("".join(f"{name}\n" for name in lists["test"]))


def _chexpert_values(film):
    values = dict.fromkeys(CHEXPERT_OBSERVATIONS, "")
    if film["index"] % 4 == 0:  # devices on some films, as in the real files: not a finding
        values["Support Devices"] = "1.0"
    for name in _names(film["findings"], CHEXPERT_NAMES):
        values[name] = "1.0"
    if film["uncertain"]:
        values[CHEXPERT_NAMES[film["uncertain"]]] = "-1.0"
    for name in CHEXPERT_OBSERVATIONS:  # blanks and zeros both occur in the real files
        if not values[name] and (film["index"] + len(name)) % 3 == 0:
            values[name] = "0.0"
    return values


def _write_chexpert(root, films, rendered):
    base = "CheXpert-v1.0-small"
    rows = {"train": [], "test": []}
    for film, (image, _) in zip(films, rendered):
        folder = "train" if film["split"] == "train" else "valid"
        view = film["view"]
        study = f"{base}/{folder}/patient{film['patient'] + 1:05d}/study{film['study']}"
        path = f"{study}/view{1 + (view == 'lateral')}_{view}.jpg"
        _save(image, root / path, jpeg=True)
        rows[film["split"]].append({"Path": path, "Sex": "Female", "Age": 50, "Frontal/Lateral": view.capitalize(),
                                    "AP/PA": "PA" if view == "frontal" else "", **_chexpert_values(film)})
    _write_csv_file(root / base / "train.csv", rows["train"])
    _write_csv_file(root / base / "valid.csv", rows["test"])


def _write_mimic(root, films, rendered):
    labels, metadata, split = {}, [], []
    for film, (image, _) in zip(films, rendered):
        subject, study = 10000000 + film["patient"], 50000000 + 100 * film["patient"] + film["study"]
        dicom = f"{film['index']:08x}-{subject:08d}"
        _save(image, root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", jpeg=True)
        labels[(subject, study)] = {"subject_id": subject, "study_id": study, **_chexpert_values(film)}
        metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                         "ViewPosition": "LATERAL" if film["view"] == "lateral" else "PA",
                         "Rows": image.shape[0], "Columns": image.shape[1]})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": film["split"]})
    _write_csv_file(root / "mimic-cxr-2.0.0-chexpert.csv.gz", list(labels.values()))
    _write_csv_file(root / "mimic-cxr-2.0.0-metadata.csv.gz", metadata)
    _write_csv_file(root / "mimic-cxr-2.0.0-split.csv.gz", split)


def _write_csv(root, films, rendered):
    rows = {"train": [], "test": []}
    for film, (image, masks) in zip(films, rendered):
        if film["view"] == "lateral":  # a CSV list is the user's own: frontal films only
            continue
        name = f"film_{film['index']:05d}.png"
        _save(image, root / film["split"] / name)
        for mask_name, mask in masks.items():
            _save(mask, root / "masks" / mask_name / name)
        rows[film["split"]].append({"filename": name, "label": film["findings"],
                                    "patient_id": f"P{film['patient']:05d}"})
    _write_csv_file(root / "train.csv", rows["train"])
    _write_csv_file(root / "test.csv", rows["test"])


def _write_csv_file(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every time
            f.write(text.getvalue().encode())
    else:
        path.write_text(text.getvalue())
