"""CheXmask CSVs: run-length decoding, matching rows to images, quality filter, the
Preprocessed variant, and explain.py's region statistics from them against the PNG masks."""
import csv
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import chexmask
import explain
from conftest import SMALL_MODEL
from cxr import chexmask_csv, demo_dataset, phantom, regions
from cxr.errors import UserError
from model import build_model

HEADER = ["Dice RCA (Mean)", "Dice RCA (Max)", "Landmarks", "Left Lung", "Right Lung", "Heart", "Height", "Width"]


# ---------------------------------------------------------------- an independent reference
def reference_encode(mask):
    """CheXmask's encoding written out pixel by pixel: walk the image row by row, left to
    right, numbering pixels from 1; each run of foreground gives 'start length'."""
    height, width = mask.shape
    runs, start = [], None
    for index in range(height * width):
        inside = bool(mask[index // width, index % width])
        if inside and start is None:
            start = index + 1
        if not inside and start is not None:
            runs += [start, index + 1 - start]
            start = None
    if start is not None:
        runs += [start, height * width + 1 - start]
    return " ".join(map(str, runs))


def to_preprocessed(mask):
    """The Preprocessed variant of a mask: padded to a centred square (the extra row or column
    after), resized to 1024 x 1024 (nearest neighbour)."""
    height, width = mask.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side), dtype=np.uint8)
    square[top:top + height, left:left + width] = mask * 255
    return np.asarray(Image.fromarray(square).resize((1024, 1024), Image.Resampling.NEAREST)) > 127


def split_lungs(lungs):
    """(patient right, patient left) lung of a two-lung mask: its two largest parts, the one
    on the image's left being the patient's right (PA film); stray bits join the nearer one."""
    labels, count = ndimage.label(lungs)
    assert count >= 2, "the phantom's lungs touch"
    sizes = ndimage.sum(lungs, labels, range(1, count + 1))
    cols = [np.nonzero(labels == k)[1].mean() for k in range(1, count + 1)]
    a, b = np.argsort(sizes)[::-1][:2]
    middle = (cols[a] + cols[b]) / 2
    on_right = np.array([c < middle for c in cols])  # image left = patient right
    right = np.isin(labels, np.flatnonzero(on_right) + 1)
    return right, lungs & ~right


def write_csv(path, rows, id_column="dicom_id", header=HEADER, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([id_column, *header])
        writer.writerows(rows)
    return path


def chexmask_row(image_id, lungs, heart, dice=0.9, preprocessed=False):
    right, left = split_lungs(lungs)
    if preprocessed:
        right, left, heart = (to_preprocessed(m) for m in (right, left, heart))
    height, width = heart.shape
    return [image_id, dice, min(dice + 0.05, 1.0), "[]", reference_encode(left), reference_encode(right),
            reference_encode(heart), height, width]


# ---------------------------------------------------------------- run-length encoding
def test_decoding_a_hand_made_encoding():
    # 2 x 3 image, pixels numbered 1..6 row by row: "2 2" = row 0, columns 1-2; "6 1" = row 1, column 2
    mask = chexmask_csv.decode_rle("2 2 6 1", 2, 3)
    assert mask.tolist() == [[False, True, True], [False, False, True]]
    assert chexmask_csv.decode_rle("", 2, 3).sum() == 0
    assert chexmask_csv.decode_rle("3 2", 2, 3).tolist() == [[False, False, True], [True, False, False]]  # wraps a row


def test_encoding_round_trips_and_matches_the_reference():
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (5, 7), (1, 9), (16, 16)):
        for density in (0.1, 0.5, 0.9):
            mask = rng.random(shape) < density
            mask[0, 0], mask[-1, -1] = True, True  # runs at both ends of the image
            assert chexmask_csv.encode_rle(mask) == reference_encode(mask)
            np.testing.assert_array_equal(chexmask_csv.decode_rle(reference_encode(mask), *shape), mask)
    assert chexmask_csv.encode_rle(np.zeros((3, 3), bool)) == ""


@pytest.mark.parametrize("rle, message", [
    ("1 2 5", "odd count"),
    ("1 2 5 3", "beyond the 2 x 3"),
    ("1 3 2 2", "overlapping runs"),
    ("0 2", "1-based"),
    ("1 0", "length 0"),
    ("1 2.5", "not a run-length encoding"),
])
def test_malformed_encodings_name_the_row(tmp_path, rle, message):
    path = write_csv(tmp_path / "bad.csv", [["a", 0.9, 0.9, "[]", "", "", "", 2, 3],
                                            ["b", 0.9, 0.9, "[]", rle, "", "", 2, 3]])
    rows = chexmask_csv.read_rows([path], [("b.png", "b.png")])
    with pytest.raises(chexmask_csv.ChexmaskError, match=rf"bad.csv line 3 \(b\), column 'Left Lung': .*{message}"):
        rows["b.png"].masks((2, 3))


def test_preprocessed_rows_map_back_through_the_padding():
    rng = np.random.default_rng(1)
    for shape in ((90, 60), (60, 90), (77, 77), (1100, 900)):
        mask = ndimage.binary_opening(rng.random(shape) < 0.6, iterations=2)
        back = chexmask_csv.from_preprocessed(to_preprocessed(mask), shape)
        if max(shape) <= 1024:  # upsampled to 1024 and back: exact
            np.testing.assert_array_equal(back, mask)
        else:  # a film larger than 1024 lost detail on the way down: edges only
            assert (back != mask).mean() < 0.005


# ---------------------------------------------------------------- reading and matching
def test_rows_match_images_by_file_name_stem_and_folders(tmp_path):
    empty = ["0.9", "0.9", "[]", "", "", "", 4, 4]
    path = write_csv(tmp_path / "chexpert.csv.gz", [
        ["CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg", *empty],
        ["CheXpert-v1.0/train/patient2/study1/view1_frontal.jpg", *empty],
        ["abc-def", *empty],  # an id without a suffix (MIMIC's dicom_id)
        ["unrelated.png", *empty],
    ], id_column="Path", gz=True)
    images = [("train/patient2/study1/view1_frontal.png", "train/patient2/study1/view1_frontal.png"),
              ("p10/abc-def.jpg", "p10/abc-def.jpg"), ("missing.png", "missing.png")]
    rows = chexmask_csv.read_rows([path], images)
    assert rows["train/patient2/study1/view1_frontal.png"].image_id.split("/")[2] == "patient2"
    assert rows["p10/abc-def.jpg"].line == 4 and "missing.png" not in rows
    # the same file name and no folders to tell the rows apart: an error, never a guess
    with pytest.raises(chexmask_csv.ChexmaskError, match="view1_frontal.jpg: several CheXmask rows"):
        chexmask_csv.read_rows([path], [("view1_frontal.jpg", "view1_frontal.jpg")])


def test_id_columns_known_named_and_missing(tmp_path):
    row = ["x.png", "0.9", "0.9", "[]", "", "", "", 4, 4]
    for column in ("dicom_id", "ImageID", "Image Index", "Path", "image_id"):
        assert chexmask_csv.read_rows([write_csv(tmp_path / "a.csv", [row], column)], [("x.png", "x.png")])
    path = write_csv(tmp_path / "b.csv", [row], "my_id")
    with pytest.raises(chexmask_csv.ChexmaskError, match="--chexmask-id-column"):
        chexmask_csv.read_rows([path], [("x.png", "x.png")])
    assert chexmask_csv.read_rows([path], [("x.png", "x.png")], id_column="my_id")
    with pytest.raises(chexmask_csv.ChexmaskError, match="'other' is not a column"):
        chexmask_csv.read_rows([path], [("x.png", "x.png")], id_column="other")
    with pytest.raises(chexmask_csv.ChexmaskError, match="no 'Heart' column"):
        chexmask_csv.read_rows([write_csv(tmp_path / "c.csv", [row[:-3]], header=HEADER[:5])], [("x.png", "x.png")])


def test_quality_filter_and_size_check():
    row = chexmask_csv.Row(csv="m.csv", line=2, image_id="x", dice_mean=0.65, dice_max=0.8, height=30,
                       width=20, rles={"right_lung": "", "left_lung": "", "heart": ""})
    assert "0.650 < --min-mask-dice 0.7" in row.quality(0.7) and row.quality(0.6) is None
    assert row.quality(0) is None
    with pytest.raises(chexmask_csv.ChexmaskError,
                       match=r"m.csv line 2 \(x\): the masks cover 30 x 20 .* image is 40 x 20"):
        row.masks((40, 20))
    assert row.masks((30, 20))[1]["variant"] == "original"


# ---------------------------------------------------------------- against the PNG masks
@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Phantoms made non-square (padded unevenly: a centring mistake shows), their PNG masks,
    and CheXmask CSVs of the original and of the Preprocessed variant written from them."""
    root = tmp_path_factory.mktemp("chexmask")
    source = demo_dataset.write_demo_dataset(root / "demo", train_per_class=1, test_per_class=2, size=128, seed=4)
    lines = (source / "test_split.txt").read_text().splitlines()
    images, masks = root / "images", root / "masks"
    for folder in (images, masks / "lungs", masks / "heart"):
        folder.mkdir(parents=True)
    original, preprocessed = [], []
    for i, line in enumerate(lines):
        name = line.split()[1]
        pad = ((9, 23), (0, 0)) if i % 2 else ((0, 0), (4, 30))  # taller or wider than square
        image = np.pad(np.asarray(Image.open(source / "test" / name).convert("L")), pad)
        Image.fromarray(image).save(images / name)
        organs = {}
        for kind in ("lungs", "heart"):
            organs[kind] = np.pad(regions.load_mask(source / "masks" / kind / name), pad)
            Image.fromarray(organs[kind].astype(np.uint8) * 255).save(masks / kind / name)
        stem = name[:-4]  # ids without the suffix, as MIMIC's dicom_id
        original.append(chexmask_row(stem, organs["lungs"], organs["heart"]))
        preprocessed.append(chexmask_row(stem, organs["lungs"], organs["heart"], preprocessed=True))
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    write_csv(root / "original.csv", original)
    write_csv(root / "preprocessed.csv.gz", preprocessed, id_column="Image Index", gz=True)
    return root, source, [line.split()[1] for line in lines]


def smooth_map(shape, seed):
    """A saliency-like map: a few blobs anywhere on the film."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape) ** 8, sigma=shape[0] / 20)


@pytest.mark.parametrize("variant", ["original.csv", "preprocessed.csv.gz"])
def test_chexmask_gives_the_png_masks_statistics(films, variant):
    root, _, names = films
    rows = chexmask_csv.read_rows([root / variant], [(n, n) for n in names])
    assert sorted(rows) == sorted(names)
    for i, name in enumerate(names):
        lungs = regions.load_mask(root / "masks" / "lungs" / name)
        heart = regions.load_mask(root / "masks" / "heart" / name)
        organs, info = rows[name].masks(lungs.shape)
        assert info["variant"] == variant.split(".")[0] and not info["sides_swapped"]
        # the decoded masks are the PNG masks, pixel for pixel (an off-by-one fails here)
        np.testing.assert_array_equal(organs["lungs"], lungs)
        np.testing.assert_array_equal(organs["heart"], heart)
        saliency = smooth_map(lungs.shape, i)
        png = regions.region_statistics(saliency, lungs, heart)
        ours = regions.region_statistics(saliency, organs["lungs"], organs["heart"], sides=organs["sides"])
        assert ours["ctr"] == pytest.approx(png["ctr"], abs=0.005)
        for zone in regions.ZONES:
            assert ours["zones"][zone] == pytest.approx(png["zones"][zone], abs=0.01), (name, zone)


@pytest.fixture(scope="module")
def untrained(films, tmp_path_factory):
    """A checkpoint of a small untrained model: the maps differ from a trained one's, but the
    region statistics are the same function of map and masks either way."""
    config = dict(name="hybrid_convnext_vit", embedding_dim=16, neck="bn", **SMALL_MODEL)
    torch.manual_seed(0)
    model = build_model(**config, pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pth"
    torch.save({"model": model.state_dict(), "model_config": config,
                "classes": sorted(phantom.CLASSES), "args": {"dataset": "demo"}}, path)
    return path


def run_explain(films, checkpoint, out, *extra):
    root, source, _ = films
    return explain.main(explain.get_args_parser().parse_args([
        "--resume", str(checkpoint), "--device", "cpu", "--workers", "0", "--topk", "3",
        "--faithfulness-steps", "0", "--save-overlays", "0",
        "--gallery-image-list", str(source / "train_split.txt"), "--gallery-dataset-dir", str(source / "train"),
        "--image-list", str(root / "list.txt"), "--dataset-dir", str(root / "images"),
        "--out", str(out), *map(str, extra)]))


def test_explain_region_statistics_from_chexmask_equal_the_png_masks(films, untrained, tmp_path):
    root = films[0]
    png = run_explain(films, untrained, tmp_path / "png", "--mask-dir", root / "masks")
    assert "masks" not in png["aggregate"]
    for variant in ("original.csv", "preprocessed.csv.gz"):
        summary = run_explain(films, untrained, tmp_path / variant, "--chexmask", root / variant)
        assert summary["aggregate"]["masks"]["with_masks"] == len(png["images"])
        for ours, theirs in zip(summary["images"], png["images"]):
            assert ours["image"] == theirs["image"] and ours["masks"]["used"]
            assert ours["ctr"] == pytest.approx(theirs["ctr"], abs=0.005)
            for zone, share in theirs["regions"]["zones"].items():
                assert ours["regions"]["zones"][zone] == pytest.approx(share, abs=0.01)
    # the maps are not degenerate: the comparison above compared something
    assert max(max(r["regions"]["zones"].values()) for r in png["images"]) > 0.2


def test_low_quality_masks_give_null_statistics_and_a_count(films, untrained, tmp_path):
    root, _, names = films
    with open(root / "original.csv") as f:
        rows = list(csv.reader(f))
    rows[1][1] = "0.55"  # the first image's Dice RCA (Mean)
    write_csv(tmp_path / "low.csv", rows[1:], header=rows[0][1:])
    summary = run_explain(films, untrained, tmp_path / "out", "--chexmask", tmp_path / "low.csv")
    first = summary["images"][0]
    assert first["ctr"] is None and first["regions"]["zones"] is None and first["masks"]["used"] is False
    assert "0.550 < --min-mask-dice 0.7" in first["masks"]["reason"]
    assert all(r["ctr"] is not None for r in summary["images"][1:])
    counts = json.loads((tmp_path / "out" / "summary.json").read_text())["aggregate"]["masks"]
    assert (counts["below_min_dice"], counts["with_masks"], counts["without_row"]) == (1, len(names) - 1, 0)
    # --min-mask-dice 0.5 keeps it
    summary = run_explain(films, untrained, tmp_path / "kept", "--chexmask", tmp_path / "low.csv",
                          "--min-mask-dice", "0.5")
    assert summary["images"][0]["ctr"] is not None


def test_explain_chexmask_errors(films, untrained, tmp_path):
    root, source, names = films
    with open(root / "original.csv") as f:
        rows = list(csv.reader(f))
    rows[2][-2] = str(int(rows[2][-2]) + 1)  # Height of the second image off by one
    write_csv(tmp_path / "wrong.csv", rows[1:], header=rows[0][1:])
    with pytest.raises(UserError, match=r"wrong.csv line 3 .*the masks cover .* but the image is"):
        run_explain(films, untrained, tmp_path / "a", "--chexmask", tmp_path / "wrong.csv")
    write_csv(tmp_path / "other.csv", [["nothing_like_these", *rows[1][1:]]])
    with pytest.raises(UserError, match="no row of --chexmask .* matches any"):
        run_explain(films, untrained, tmp_path / "b", "--chexmask", tmp_path / "other.csv")
    with pytest.raises(UserError, match="--min-mask-dice 1.5"):
        run_explain(films, untrained, tmp_path / "c", "--chexmask", root / "original.csv", "--min-mask-dice", "1.5")


def test_to_png_writes_the_mask_dir_layout(films, tmp_path, capsys):
    root, _, names = films
    args = chexmask.get_args_parser().parse_args(["to-png", str(root / "preprocessed.csv.gz"), "--out",
                                                  str(tmp_path / "out"), "--dataset-dir", str(root / "images")])
    assert chexmask.to_png(args) == len(names)
    for name in names:
        for kind in ("lungs", "heart"):
            np.testing.assert_array_equal(regions.load_mask(tmp_path / "out" / kind / name),
                                          regions.load_mask(root / "masks" / kind / name))
    # without the images: each row at its own size, named by its id
    args = chexmask.get_args_parser().parse_args(["to-png", str(root / "original.csv"), "--out", str(tmp_path / "ids")])
    assert chexmask.to_png(args) == len(names)
    np.testing.assert_array_equal(regions.load_mask(tmp_path / "ids" / "lungs" / names[0]),
                                  regions.load_mask(root / "masks" / "lungs" / names[0]))
    assert "wrote lungs/ and heart/ masks" in capsys.readouterr().out


def test_explain_one_image_with_chexmask(films, untrained, tmp_path):
    root, source, names = films
    name = names[1]
    record = explain.main(explain.get_args_parser().parse_args([
        "--resume", str(untrained), "--device", "cpu", "--workers", "0", "--topk", "3",
        "--faithfulness-steps", "0", "--figure-neighbours", "0",
        "--gallery-image-list", str(source / "train_split.txt"), "--gallery-dataset-dir", str(source / "train"),
        "--image", str(root / "images" / name), "--chexmask", str(root / "preprocessed.csv.gz"),
        "--out", str(tmp_path / "one")]))
    expected = regions.cardiothoracic_ratio(regions.load_mask(root / "masks" / "lungs" / name),
                                            regions.load_mask(root / "masks" / "heart" / name))
    assert record["masks"]["variant"] == "preprocessed" and record["ctr"] == pytest.approx(expected, abs=1e-9)


def test_to_png_command_line_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    write_csv(tmp_path / "bad.csv", [["a", 0.9, 0.9, "[]", "1 2 3", "", "", 2, 3]])
    result = subprocess.run([sys.executable, str(ROOT / "chexmask.py"), "to-png", str(tmp_path / "bad.csv"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "bad.csv line 2 (a), column 'Left Lung': odd count" in result.stderr


def test_preprocessed_rows_of_collections_cropped_before_padding_are_refused(tmp_path):
    """MIMIC-CXR-JPG (dicom_id) and PadChest (ImageID) were cropped before padding."""
    lungs = np.zeros((20, 30), bool)
    lungs[5:15, 3:12] = lungs[5:15, 18:27] = True
    heart = np.zeros((20, 30), bool)
    heart[8:16, 12:18] = True
    row = chexmask_row("abc", lungs, heart, preprocessed=True)
    for column, name in (("dicom_id", "MIMIC-CXR-JPG"), ("ImageID", "PadChest")):
        rows = chexmask_csv.read_rows([write_csv(tmp_path / f"{column}.csv", [row], id_column=column)],
                                  [("abc.png", "abc.png")])
        with pytest.raises(chexmask_csv.ChexmaskError, match=f"{name}.*OriginalResolution"):
            rows["abc.png"].masks((20, 30))
