"""Tests for demo_data.py, the synthetic chest X-ray phantom dataset (CPU, a few seconds)."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_data
from conftest import ROOT as REPO
from cxr import demo_dataset, phantom, regions
from cxr.phantom import CLASSES, ZONES

SMALL = dict(train_per_class=3, test_per_class=2, size=64, seed=0)


def phantoms(label, n=6, size=128, seed=0):
    """n phantoms of one class with their info, from independent seeded generators."""
    return [phantom.make_phantom_with_info(np.random.default_rng([seed, i]), label, size) for i in range(n)]


def lung_midline(lungs):
    cols = np.flatnonzero(lungs.any(axis=0))
    return (cols[0] + cols[-1] + 1) / 2


def read_list(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return demo_dataset.write_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", **SMALL)


# ---------------------------------------------------------------- phantoms
def test_classes_in_documented_order():
    assert CLASSES == ("normal", "pneumonia", "COVID-19", "effusion", "cardiomegaly")


@pytest.mark.parametrize("label", CLASSES)
def test_phantom_types_ranges_and_masks(label):
    img, masks = phantom.make_phantom(np.random.default_rng(1), label, 96)
    assert img.shape == (96, 96) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    assert set(masks) == {"lungs", "heart", "lesion"}
    for mask in masks.values():
        assert mask.shape == (96, 96) and mask.dtype == bool
    assert masks["lungs"].sum() > 0.1 * 96 * 96 and masks["heart"].sum() > 0
    assert not (masks["lungs"] & masks["heart"]).any()  # lung fields exclude the heart
    assert masks["lesion"].any() == (label not in ("normal", "cardiomegaly"))


def test_phantom_is_deterministic_per_seed():
    a_img, a_masks, a_info = phantom.make_phantom_with_info(np.random.default_rng(7), "effusion", 80)
    b_img, b_masks, b_info = phantom.make_phantom_with_info(np.random.default_rng(7), "effusion", 80)
    c_img, _ = phantom.make_phantom(np.random.default_rng(8), "effusion", 80)
    assert np.array_equal(a_img, b_img) and a_info == b_info
    assert all(np.array_equal(a_masks[k], b_masks[k]) for k in a_masks)
    assert not np.array_equal(a_img, c_img)


def test_unknown_label_raises():
    with pytest.raises(ValueError, match="unknown label"):
        phantom.make_phantom(np.random.default_rng(0), "fracture", 64)


def test_ctr_separates_normal_from_cardiomegaly():
    for label, lo, hi in (("normal", 0.33, 0.5), ("cardiomegaly", 0.55, 0.75)):
        for _, masks, info in phantoms(label):
            ctr = regions.cardiothoracic_ratio(masks["lungs"], masks["heart"])
            assert info["ctr"] == pytest.approx(ctr)
            assert lo < ctr < hi, (label, ctr)


def test_anatomy_is_shown_as_a_pa_film():
    """Heart mostly on the image right; right hemidiaphragm (image left) higher on average
    (a single film may be tilted a little)."""
    drops = []
    for _, masks, _ in phantoms("normal", n=10):
        lungs, heart = masks["lungs"], masks["heart"]
        mid = lung_midline(lungs)
        assert (np.nonzero(heart)[1] >= mid).mean() > 0.55
        rows, cols = np.nonzero(lungs)
        drops.append(rows[cols >= mid].max() - rows[cols < mid].max())  # > 0: image-left base higher
    assert np.mean(drops) > 1.0


@pytest.mark.parametrize("label", ["pneumonia", "COVID-19", "effusion"])
def test_lesions_lie_in_the_lungs_and_sides_match_the_mask(label):
    for _, masks, info in phantoms(label, n=8, seed=3):
        lesion, lungs = masks["lesion"], masks["lungs"]
        assert (lesion & lungs).sum() >= 0.9 * lesion.sum() > 0
        mid = lung_midline(lungs)
        cols = np.nonzero(lesion)[1]
        # image left = patient right
        sides = [s for s, share in (("right", (cols < mid).mean()), ("left", (cols >= mid).mean())) if share >= 0.1]
        assert info["lesion_sides"] == sides
        assert len(info["lesion_zones"]) == len(sides) and set(info["lesion_zones"]) <= set(ZONES)
        if label == "pneumonia":
            assert len(sides) == 1
        if label == "COVID-19":
            assert sides == ["right", "left"]
        if label in ("COVID-19", "effusion"):
            assert set(info["lesion_zones"]) == {"lower"}


def test_pneumonia_visits_every_zone_and_both_sides():
    infos = [info for _, _, info in phantoms("pneumonia", n=30, size=64, seed=11)]
    assert {info["lesion_zones"][0] for info in infos} == set(ZONES)
    assert {info["lesion_sides"][0] for info in infos} == {"right", "left"}


def test_findings_raise_lung_density_where_the_mask_says():
    """The lesion region is brighter than the rest of the lung on average."""
    for label in ("pneumonia", "effusion"):
        for img, masks, _ in phantoms(label, n=4, seed=5):
            inside = img[masks["lesion"]].mean()
            rest = img[masks["lungs"] & ~masks["lesion"]].mean()
            assert inside > rest + 0.03, label


# ---------------------------------------------------------------- dataset on disk
def test_lists_counts_and_unique_names(small_dataset):
    names = []
    for split, per_class in (("train", SMALL["train_per_class"]), ("test", SMALL["test_per_class"])):
        rows = read_list(small_dataset / f"{split}_split.txt")
        assert all(len(row) == 4 and row[3] == "phantom" and row[0].startswith("P") for row in rows)
        assert Counter(row[2] for row in rows) == {label: per_class for label in CLASSES}
        labels = [row[2] for row in rows]
        assert labels != sorted(labels, key=CLASSES.index)  # shuffled, classes interleaved
        for _, name, _, _ in rows:
            assert (small_dataset / split / name).is_file()
        names += [row[1] for row in rows]
    assert len(names) == len(set(names)) == 5 * (SMALL["train_per_class"] + SMALL["test_per_class"])
    pids = [row[0] for split in ("train", "test") for row in read_list(small_dataset / f"{split}_split.txt")]
    assert len(pids) == len(set(pids))


def test_images_and_masks_on_disk(small_dataset):
    meta = json.loads((small_dataset / "demo_meta.json").read_text())
    assert meta["params"]["size"] == SMALL["size"] and meta["params"]["seed"] == SMALL["seed"]
    for split in ("train", "test"):
        for _, name, label, _ in read_list(small_dataset / f"{split}_split.txt"):
            with Image.open(small_dataset / split / name) as im:
                assert im.mode == "L" and im.size == (64, 64)
            masks = {}
            for key in ("lungs", "heart", "lesion"):
                with Image.open(small_dataset / "masks" / key / name) as im:
                    assert im.mode == "L" and im.size == (64, 64)
                    masks[key] = np.asarray(im)
                assert set(np.unique(masks[key])) <= {0, 255}
            entry = meta["images"][name]
            assert entry["label"] == label and entry["split"] == split
            assert masks["lesion"].any() == (label not in ("normal", "cardiomegaly"))
            assert entry["ctr"] == pytest.approx(
                regions.cardiothoracic_ratio(masks["lungs"] > 0, masks["heart"] > 0), abs=1e-3
            )
            assert len(entry["lesion_sides"]) == len(entry["lesion_zones"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_dataset):
    again = demo_dataset.write_demo_dataset(tmp_path / "again", **SMALL)
    assert all_files(again) == all_files(small_dataset)
    other = demo_dataset.write_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = all_files(small_dataset), all_files(other)
    assert sorted(a) == sorted(b)
    assert a["train/phantom_train_00000.png"] != b["train/phantom_train_00000.png"]


def test_sixteen_bit_pngs_hold_12_bit_values(tmp_path):
    out = demo_dataset.write_demo_dataset(tmp_path / "ds16", 1, 1, size=64, seed=0, sixteen_bit=True)
    for split in ("train", "test"):
        for _, name, _, _ in read_list(out / f"{split}_split.txt"):
            with Image.open(out / split / name) as im:
                assert im.mode in ("I;16", "I")
                values = np.asarray(im)
            assert 255 < values.max() <= 4095
            with Image.open(out / "masks" / "lungs" / name) as im:
                assert im.mode == "L"  # masks stay 8-bit


def test_refuses_non_empty_out_dir_but_accepts_empty(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        demo_dataset.write_demo_dataset(busy, 1, 1, size=64)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (demo_dataset.write_demo_dataset(empty, 1, 1, size=64) / "demo_meta.json").is_file()


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real = phantom.make_phantom_with_info

    def flaky(rng, label, size):
        calls.append(label)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(rng, label, size)

    monkeypatch.setattr(phantom, "make_phantom_with_info", flaky)
    with pytest.raises(KeyboardInterrupt):
        demo_dataset.write_demo_dataset(tmp_path / "ds", 2, 1, size=64)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_ensure_generates_then_reuses_then_rejects_other_params(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert demo_dataset.ensure_demo_dataset(out, **SMALL) == out
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0] and "15 train" in printed[0]

    def must_not_generate(*args, **kwargs):
        raise AssertionError("ensure_demo_dataset regenerated an up-to-date dataset")

    monkeypatch.setattr(demo_dataset, "write_demo_dataset", must_not_generate)
    assert demo_dataset.ensure_demo_dataset(out, **SMALL) == out
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="--dataset-dir") as err:
        demo_dataset.ensure_demo_dataset(out, **{**SMALL, "size": 128})
    assert "'size': 64" in str(err.value) and "'size': 128" in str(err.value)


def test_ensure_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(FileExistsError, match="demo_meta.json"):
        demo_dataset.ensure_demo_dataset(tmp_path, **SMALL)


# ---------------------------------------------------------------- CLI
def test_cli_main_writes_dataset_and_preview(tmp_path):
    args = demo_data.get_args_parser().parse_args(
        ["--out", str(tmp_path / "cli"), "--train-per-class", "1", "--test-per-class", "1", "--size", "64",
         "--seed", "3", "--preview", str(tmp_path / "preview.png")]
    )
    demo_data.main(args)
    assert len(read_list(tmp_path / "cli" / "train_split.txt")) == 5
    assert json.loads((tmp_path / "cli" / "demo_meta.json").read_text())["params"]["seed"] == 3
    with Image.open(tmp_path / "preview.png") as im:
        assert im.width > 0 and im.height > 0


def test_cli_runs_as_a_script(tmp_path):
    out = tmp_path / "script"
    cmd = [sys.executable, str(REPO / "demo_data.py"), "--out", str(out), "--train-per-class", "1",
           "--test-per-class", "1", "--size", "48", "--sixteen-bit"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert json.loads((out / "demo_meta.json").read_text())["params"]["sixteen_bit"] is True


def test_digits_are_written_as_a_covidx_list_every_program_reads(tmp_path):
    from sklearn.datasets import load_digits

    from cxr.digits_data import write_digits_dataset
    from dataset import ImageListDataset

    demo_data.main(demo_data.get_args_parser().parse_args(["--real", "digits", "--out", str(tmp_path / "d")]))
    lines = {split: (tmp_path / "d" / f"{split}_split.txt").read_text().splitlines() for split in ("train", "test")}
    assert (len(lines["train"]), len(lines["test"])) == (1198, 599)
    digits = load_digits()
    for split, split_lines in lines.items():
        counts = Counter(line.split()[2] for line in split_lines)
        assert len(counts) == 10
        for line in split_lines[:20]:  # the scan itself, 16 grey levels over 8 bits, at its 8x8
            patient, name, label, _ = line.split()
            index = int(patient[1:])
            pixels = np.asarray(Image.open(tmp_path / "d" / split / name))
            assert label == f"digit_{digits.target[index]}"
            np.testing.assert_array_equal(pixels, np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    test_share = {c: n / (n + Counter(line.split()[2] for line in lines["train"])[c])
                  for c, n in Counter(line.split()[2] for line in lines["test"]).items()}
    assert all(abs(share - 1 / 3) < 0.02 for share in test_share.values())  # stratified by class
    dataset = ImageListDataset(tmp_path / "d" / "test", tmp_path / "d" / "test_split.txt", "covidx")
    assert len(dataset) == 599 and len(set(dataset.patients)) == 599
    write_digits_dataset(tmp_path / "e")  # same seed, same files
    assert (tmp_path / "e" / "test_split.txt").read_bytes() == (tmp_path / "d" / "test_split.txt").read_bytes()
    with pytest.raises(FileExistsError):
        write_digits_dataset(tmp_path / "d")
    for flags in (["--size", "64"], ["--preview", str(tmp_path / "p.png")], ["--multilabel", "nih"]):
        with pytest.raises(SystemExit, match=f"drop {flags[0]}"):  # phantom flags would be silently ignored
            demo_data.main(demo_data.get_args_parser().parse_args(["--real", "digits", "--out",
                                                                   str(tmp_path / "f"), *flags]))
