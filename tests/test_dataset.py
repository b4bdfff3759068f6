import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import demo_dataset, images, train_args
from cxr.images import load_image
from dataset import DatasetError, ImageListDataset, build_transform, read_covidx_list, scan_bit_depth


def write_images(root, names, size=40, value=128):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), value, np.uint8)).save(root / name)


def write_list(path, rows):
    path.write_text("".join(" ".join(row) + "\n" for row in rows))
    return path


@pytest.fixture
def covidx(tmp_path):
    rows = [("P1", "a.png", "normal", "src"), ("P2", "b.png", "COVID-19", "src"),
            ("P3", "c.png", "pneumonia", "src"), ("P4", "d e.png", "normal", "src")]
    write_images(tmp_path / "train", [r[1] for r in rows])
    return tmp_path, write_list(tmp_path / "train.txt", rows)


def test_covidx_list_loads_with_fixed_class_order(covidx):
    root, list_file = covidx
    dataset = ImageListDataset(root / "train", list_file, transform=build_transform(32, False))
    assert dataset.classes == ["COVID-19", "normal", "pneumonia"]
    assert dataset.targets.tolist() == [1, 0, 2, 1]
    assert dataset.paths[3].name == "d e.png"  # file names with spaces (four or more fields)
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label.item() == 0
    test = ImageListDataset(root / "train", list_file, classes=["normal", "pneumonia", "COVID-19"])
    assert test.targets.tolist() == [0, 2, 1, 0]


def test_three_field_lines_and_comments(tmp_path):
    list_file = write_list(tmp_path / "l.txt", [("# comment",), ("P1", "x.png", "positive")])
    assert read_covidx_list(list_file) == [("x.png", "positive", 2, "P1")]


def test_csv_and_folder_formats(tmp_path):
    write_images(tmp_path / "img", ["n/1.png", "n/2.png", "p/3.png"])
    (tmp_path / "list.csv").write_text("filename,label,age\nn/1.png,normal,3\np/3.png,pneumonia,4\n")
    csv_set = ImageListDataset(tmp_path / "img", tmp_path / "list.csv", "csv")
    assert csv_set.classes == ["normal", "pneumonia"] and len(csv_set) == 2
    folder_set = ImageListDataset(tmp_path / "img", list_format="folder")
    assert folder_set.classes == ["n", "p"] and folder_set.targets.tolist() == [0, 0, 1]
    (tmp_path / "bad.csv").write_text("path,label\nn/1.png,normal\n")
    with pytest.raises(DatasetError, match="bad.csv:1: CSV header must have columns"):
        ImageListDataset(tmp_path / "img", tmp_path / "bad.csv", "csv")


def test_missing_images_are_all_counted_and_the_first_named(tmp_path):
    write_images(tmp_path / "train", ["ok.png"])
    rows = [("P", "ok.png", "normal")] + [("P", f"gone{i}.png", "normal") for i in range(8)]
    with pytest.raises(DatasetError, match=r"8 of 9 listed images do not exist") as error:
        ImageListDataset(tmp_path / "train", write_list(tmp_path / "l.txt", rows))
    assert "gone0.png (line 2)" in str(error.value) and "gone7.png" not in str(error.value)


@pytest.mark.parametrize("rows, message", [
    ([("P", "a.png", "normal"), ("P", "a.png", "tumour")], r"l.txt:2: unknown label 'tumour'"),
    ([], "no images found, read as"),
    ([("P", "a.png")], r"l.txt:1: expected 'patient_id filename label"),
    ([("P", "../secret.png", "normal")], "leaves the image folder"),
    ([("P", "/etc/a.png", "normal")], "leaves the image folder"),
])
def test_bad_lists_name_file_and_line(tmp_path, rows, message):
    write_images(tmp_path / "train", ["a.png"])
    with pytest.raises(DatasetError, match=message):
        ImageListDataset(tmp_path / "train", write_list(tmp_path / "l.txt", rows),
                         classes=["normal"] if rows and rows[-1][-1] == "tumour" else None)


def test_missing_list_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="image folder not found"):
        ImageListDataset(tmp_path / "nope", tmp_path / "l.txt")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="image list not found.*--train-image-list"):
        ImageListDataset(tmp_path / "train", tmp_path / "l.txt")


def test_unreadable_and_truncated_images_fail_with_their_path(tmp_path):
    write_images(tmp_path / "train", ["good.png"], size=256)
    (tmp_path / "train" / "bad.png").write_bytes(b"not a png")
    data = (tmp_path / "train" / "good.png").read_bytes()
    (tmp_path / "train" / "cut.png").write_bytes(data[: len(data) // 2])
    rows = [("P", "bad.png", "normal"), ("P", "cut.png", "normal")]
    dataset = ImageListDataset(tmp_path / "train", write_list(tmp_path / "l.txt", rows))
    for index, name in enumerate(["bad.png", "cut.png"]):
        with pytest.raises(DatasetError, match=f"cannot read image .*{name}"):
            dataset[index]


def test_sixteen_bit_png_loads_like_its_eight_bit_version(tmp_path):
    rng = np.random.default_rng(0)
    twelve_bit = rng.integers(0, 4096, size=(48, 48)).astype(np.uint16)
    twelve_bit[0, 0] = 4095
    Image.fromarray(twelve_bit).save(tmp_path / "x16.png")
    eight_bit = np.rint(twelve_bit / 4095 * 255).astype(np.uint8)
    Image.fromarray(eight_bit).save(tmp_path / "x8.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    a, b = np.asarray(load_image(tmp_path / "x16.png")), np.asarray(load_image(tmp_path / "x8.png"))
    assert a.shape == (48, 48, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert a.mean() < 200  # not clipped to white
    full = (twelve_bit.astype(np.uint32) * 16).astype(np.uint16)  # a true 16-bit image
    Image.fromarray(full).save(tmp_path / "full16.png")
    c = np.asarray(load_image(tmp_path / "full16.png"))
    assert np.abs(c.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "RGB", "1"])
def test_other_modes_give_rgb(tmp_path, mode):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(gray).convert(mode).save(tmp_path / "x.png")
    image = np.asarray(load_image(tmp_path / "x.png"))
    assert image.shape == (64, 64, 3)
    if mode != "1":
        assert np.abs(image[..., 0].astype(int) - gray).max() <= 4


def test_train_transform_is_random_and_test_transform_is_not():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80), np.uint8)).convert("RGB")
    test = build_transform(64, train=False)
    torch.testing.assert_close(test(image), test(image))
    train = build_transform(64, train=True, rand_resize=True)
    assert not torch.equal(train(image), train(image))
    assert train(image).shape == (3, 64, 64)


def test_split_by_patient_keeps_patients_whole_and_stratifies(tmp_path):
    from dataset import split_by_patient
    rows, rng = [], np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    gray = Image.fromarray(np.zeros((8, 8), np.uint8))
    for patient in range(60):  # 1-4 images per patient, one label per patient
        label = ("normal", "pneumonia", "COVID-19")[patient % 3]
        for image in range(int(rng.integers(1, 5))):
            name = f"p{patient}_{image}.png"
            gray.save(tmp_path / "train" / name)
            rows.append((f"P{patient}", name, label))
    dataset = ImageListDataset(tmp_path / "train", write_list(tmp_path / "l.txt", rows))
    train_idx, val_idx = split_by_patient(dataset, 0.2, seed=0)
    assert sorted(train_idx + val_idx) == list(range(len(dataset)))
    train_patients = {dataset.patients[i] for i in train_idx}
    val_patients = {dataset.patients[i] for i in val_idx}
    assert not train_patients & val_patients  # no patient on both sides
    for label in range(3):  # about 20% of every class, give or take one patient
        total = int((dataset.targets == label).sum())
        held = int((dataset.targets[val_idx] == label).sum())
        assert 0.2 * total <= held <= 0.2 * total + 4
    assert split_by_patient(dataset, 0.2, seed=1) != (train_idx, val_idx)  # seeded
    assert split_by_patient(dataset, 0.2, seed=0) == (train_idx, val_idx)
    # one big patient: the class stays in training; validation never takes more than half
    big = ImageListDataset(tmp_path / "train", write_list(tmp_path / "b.txt", [
        ("BIG", rows[0][1], "normal"), ("BIG", rows[1][1], "normal"), ("BIG", rows[2][1], "normal"),
        ("BIG", rows[3][1], "normal"), *[(f"S{i}", rows[4 + i][1], "pneumonia") for i in range(10)]]))
    for seed in range(5):
        kept, held = split_by_patient(big, 0.1, seed)
        assert int((big.targets[kept] == big.classes.index("normal")).sum()) == 4
        assert int((big.targets[held] == big.classes.index("pneumonia")).sum()) == 2
    part = dataset.subset(val_idx)
    assert len(part) == len(val_idx) and part.classes == dataset.classes
    assert part.targets.tolist() == dataset.targets[val_idx].tolist()


def test_transforms_keep_the_whole_portrait_radiograph():
    # A portrait film whose top and bottom 10% are white (the apices and the costophrenic
    # angles): the evaluation transform and the default training transform keep both.
    array = np.zeros((200, 160), np.uint8)
    array[:20], array[-20:] = 255, 255
    image = Image.fromarray(array).convert("RGB")
    for transform in (build_transform(64, train=False), build_transform(64, train=True, hflip=False)):
        out = transform(image)[0]
        assert out.shape == (64, 64)
        assert out[0].mean() > 1.5 and out[-1].mean() > 1.5, "top or bottom of the chest cut off"
        assert out[32].mean() < 0  # the middle stays dark


# --------------------------------------------------------------------------------------------
# Hostile files, bit depth per data set, DICOM
# --------------------------------------------------------------------------------------------
def png_header_only(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb: tiny on disk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def hostile(tmp_path):
    """good.png plus one file of every bad kind, all listed (the bad ones from line 2 on)."""
    root = tmp_path / "train"
    write_images(root, ["good.png", "good2.png"], size=256)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (256, 256), np.uint8)  # noise: a large, incompressible file
    Image.fromarray(noisy).save(root / "full.png")
    Image.fromarray(noisy).save(root / "full.jpg", quality=95)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("<html>404 Not Found</html>\n")
    (root / "cut.png").write_bytes((root / "full.png").read_bytes()[:3000])
    (root / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:3000])
    png_header_only(root / "bomb.png", 11_000, 10_000)  # 110 M pixels: above our limit
    png_header_only(root / "huge.png", 20_000, 20_000)  # 400 M pixels: Pillow's own limit too
    names = ["good.png", "empty.png", "text.png", "cut.png", "cut.jpg", "bomb.png", "huge.png", "good2.png"]
    return root, write_list(tmp_path / "l.txt", [("P", name, "normal") for name in names]), names


def test_every_bad_file_fails_with_its_name_and_list_line(hostile):
    root, list_file, names = hostile
    dataset = ImageListDataset(root, list_file, transform=build_transform(32, False))
    assert dataset[0][0].shape == (3, 32, 32)
    reasons = {"empty.png": "empty \\(0 bytes\\)", "text.png": "not an image file",
               "cut.png": "truncated|broken|error", "cut.jpg": "truncated|broken|error",
               "bomb.png": "above the limit of 100,000,000", "huge.png": "limit"}
    for index, name in enumerate(names[1:-1], start=1):
        with pytest.raises(DatasetError, match=f"cannot read image .*{name} \\(line {index + 1} of .*l.txt\\): "
                                               f"(.*)({reasons[name]})"):
            dataset[index]


def test_header_check_names_bad_files_before_training(hostile):
    root, list_file, _ = hostile
    dataset = ImageListDataset(root, list_file)
    with pytest.raises(DatasetError) as error:
        dataset.check_images(progress=False)
    message = str(error.value)
    # the header check finds empty, non-image and oversized files (truncation needs a decode)
    assert "4 of 8 images cannot be read" in message and "--skip-bad-images" in message
    for name, line in (("empty.png", 2), ("text.png", 3), ("bomb.png", 6), ("huge.png", 7)):
        assert f"{name} (line {line} of" in message


def test_skip_bad_images_decodes_everything_and_drops_the_bad_ones(hostile):
    root, list_file, _ = hostile
    dataset = ImageListDataset(root, list_file, transform=build_transform(32, False))
    dropped = dataset.check_images(skip_bad=True, workers=2, progress=False)
    assert sorted(path.name for path, _, _ in dropped) == sorted(
        ["empty.png", "text.png", "cut.png", "cut.jpg", "bomb.png", "huge.png"])
    assert sorted(line for _, line, _ in dropped) == [2, 3, 4, 5, 6, 7]
    assert [p.name for p in dataset.paths] == ["good.png", "good2.png"] and dataset.lines == [1, 8]
    assert len(dataset.targets) == 2 and all(dataset[i][0].shape == (3, 32, 32) for i in range(2))


def test_skip_bad_images_in_train_writes_the_list_and_trains(tmp_path):
    import train
    root = tmp_path / "demo"
    demo_dataset.write_demo_dataset(root, train_per_class=6, test_per_class=3, size=64, seed=0)
    lines = (root / "train_split.txt").read_text().splitlines()
    broken = lines[3].split()[1]
    (root / "train" / broken).write_bytes((root / "train" / broken).read_bytes()[:200])  # truncated
    args = ["--dataset", "covid", "--convnext-name", "convnextv2_atto", "--vit-name", "vit_tiny_patch16_224",
            "--img-size", "32", "--embedding-dim", "8", "--no-pretrained", "-p", "5", "-k", "2",
            "--workers", "0", "--batches-per-epoch", "1", "--device", "cpu", "--dataset-dir", str(root),
            "--train-image-list", str(root / "train_split.txt"), "--test-image-list",
            str(root / "test_split.txt"), "--epochs", "1"]
    with pytest.raises(DatasetError, match=f"{broken} \\(line 4 of"):  # without the flag: at its first load
        train.main(train_args.parse_args([*args, "--save-dir", str(tmp_path / "a"), "--batches-per-epoch", "6",
                                     "--val-fraction", "0"]))
    train.main(train_args.parse_args([*args, "--save-dir", str(tmp_path / "b"), "--skip-bad-images"]))
    listed = (tmp_path / "b" / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(root / "train" / broken) + "\t4\t")


def test_bit_depth_is_decided_per_data_set_not_per_image(tmp_path):
    # Two 12-bit films of one scanner: one uses the full range, one is darker (max 1000).
    # Scaled per image, the dark one would come out 4x brighter; per data set both keep their
    # relative brightness.
    bright = np.full((32, 32), 2000, np.uint16)
    bright[0, 0] = 4095
    dark = np.full((32, 32), 500, np.uint16)
    dark[0, 0] = 1000
    write_images(tmp_path / "img", [])
    Image.fromarray(bright).save(tmp_path / "img" / "bright.png")
    Image.fromarray(dark).save(tmp_path / "img" / "dark.png")
    rows = [("P1", "bright.png", "normal"), ("P2", "dark.png", "normal")]
    dataset = ImageListDataset(tmp_path / "img", write_list(tmp_path / "l.txt", rows))
    assert dataset.bit_depth == 12 and scan_bit_depth(dataset.paths) == 12
    def to_pixels(i):
        return np.asarray(load_image(dataset.paths[i], dataset.bit_depth))[..., 0].astype(int)
    assert to_pixels(0)[5, 5] == round(2000 / 4095 * 255) and to_pixels(1)[5, 5] == round(500 / 4095 * 255)
    assert np.asarray(load_image(dataset.paths[1]))[5, 5, 0] == round(500 / 1023 * 255)  # per image: 10-bit
    # a fixed depth (--bit-depth 16) and the 0..65535 range
    fixed = ImageListDataset(tmp_path / "img", tmp_path / "l.txt", bit_depth=16)
    assert fixed.bit_depth == 16
    assert np.asarray(load_image(fixed.paths[0], 16))[5, 5, 0] == round(2000 / 65535 * 255)
    full = np.full((32, 32), 30000, np.uint16)
    full[0, 0] = 65535
    Image.fromarray(full).save(tmp_path / "img" / "full.png")
    assert scan_bit_depth([tmp_path / "img" / "full.png", *dataset.paths]) == 16
    # an image brighter than the data set's depth is clipped, with a warning that names it
    with pytest.warns(UserWarning, match="full.png has values up to 65535.*--bit-depth 16"):
        assert np.asarray(load_image(tmp_path / "img" / "full.png", 12))[5, 5, 0] == 255
    # 8-bit data sets have no depth to decide
    write_images(tmp_path / "eight", ["a.png"])
    assert ImageListDataset(tmp_path / "eight", write_list(tmp_path / "e.txt", [("P", "a.png", "x")])).bit_depth is None


def test_labels_that_differ_only_by_case_or_spacing_are_an_error(tmp_path):
    write_images(tmp_path / "train", ["a.png", "b.png", "c.png"])
    rows = [("P1", "a.png", "normal"), ("P2", "b.png", "Normal"), ("P3", "c.png", "COVID-19")]
    with pytest.raises(DatasetError, match=r"l.txt: labels that differ only by case or spacing .*"
                       r"'normal' \(1 images, first on line 1\) vs 'Normal' \(1 images, first on line 2\)"):
        ImageListDataset(tmp_path / "train", write_list(tmp_path / "l.txt", rows))
    (tmp_path / "t.csv").write_text("filename,label\na.png,Normal_\n")
    with pytest.raises(DatasetError, match=r"unknown label 'Normal_' \(did you mean 'normal'\?\)"):
        ImageListDataset(tmp_path / "train", tmp_path / "t.csv", "csv", classes=["normal", "COVID-19"])


def test_small_classes_are_named_in_the_warning():
    from sampler import PKSampler
    with pytest.warns(UserWarning, match=r"effusion \(1\)"):
        PKSampler([0, 0, 0, 1], p=2, k=2, label_names=["normal", "effusion"])


def write_dicom(path, stored, photometric, window=None, slope=1.0, intercept=0.0, bits=12):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "P1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def png_export(stored, photometric, window=None, slope=1.0, intercept=0.0):
    """What a DICOM-to-PNG export of the study shows, written out independently of images.py:
    modality rescale, the LINEAR window of PS3.3 C.11.2.1.2 (else the value range), inverted
    for MONOCHROME1."""
    values = stored.astype(np.float64) * slope + intercept
    if window is None:
        out = (values - values.min()) / (values.max() - values.min())
    else:
        centre, width = window
        out = np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    out = np.rint(out * 255).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("window, slope, intercept", [(None, 1.0, 0.0), ((1500.0, 2000.0), 1.0, 0.0),
                                                      ((-200.0, 3000.0), 2.0, -2048.0), (None, 2.0, -2048.0)])
def test_dicom_matches_the_png_export_of_the_same_study(tmp_path, photometric, window, slope, intercept):
    pytest.importorskip("pydicom")  # listed in requirements_hybrid.txt; the message without it is tested below
    rng = np.random.default_rng(0)
    stored = np.clip(rng.normal(1800, 700, (48, 40)), 0, 4095).astype(np.uint16)
    stored[:8] = np.linspace(0, 4095, 40).astype(np.uint16)  # the whole range, so the window clips
    write_dicom(tmp_path / "study.dcm", stored, photometric, window, slope, intercept)
    Image.fromarray(png_export(stored, photometric, window, slope, intercept)).save(tmp_path / "study.png")
    from_dicom = np.asarray(load_image(tmp_path / "study.dcm"))
    from_png = np.asarray(load_image(tmp_path / "study.png"))
    assert from_dicom.shape == (48, 40, 3)
    assert np.abs(from_dicom.astype(int) - from_png.astype(int)).max() <= 1
    bone_bright = from_dicom[..., 0][stored > 3000].mean() > from_dicom[..., 0][stored < 1000].mean()
    assert bone_bright == (photometric == "MONOCHROME2")  # MONOCHROME1 stores white as low values


def test_dicom_in_lists_and_folders_and_without_pydicom(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    (tmp_path / "img" / "normal").mkdir(parents=True)
    write_dicom(tmp_path / "img" / "normal" / "a.dcm", stored, "MONOCHROME2", (2048.0, 4096.0))
    write_images(tmp_path / "img", ["normal/b.png"])
    folder = ImageListDataset(tmp_path / "img", list_format="folder", transform=build_transform(32, False))
    assert sorted(p.name for p in folder.paths) == ["a.dcm", "b.png"] and folder[0][0].shape == (3, 32, 32)
    assert folder.check_images(skip_bad=True, progress=False) == []
    (tmp_path / "img" / "normal" / "empty.dcm").write_bytes(b"")
    listed = ImageListDataset(tmp_path / "img", write_list(tmp_path / "l.txt", [
        ("P1", "normal/a.dcm", "normal"), ("P2", "normal/empty.dcm", "normal")]))
    with pytest.raises(DatasetError, match=r"empty.dcm \(line 2 of .*l.txt\): the file is empty"):
        listed[1]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(DatasetError, match=r"a.dcm \(line 1 of .*l.txt\): reading DICOM files needs "
                                           r"pydicom 3 or newer: pip install pydicom"):
        listed[0]
    assert "pip install pydicom" in images.check_image(tmp_path / "img" / "normal" / "a.dcm")


def test_folder_layout_takes_patients_from_a_patients_csv(tmp_path):
    for split, label, name in (("train", "normal", "a.png"), ("train", "normal", "b.png"),
                               ("train", "pneumonia", "c.png"), ("test", "normal", "d.png")):
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / split / label / name)
    # One file for both splits, beside them; c.png is not named: its own patient.
    (tmp_path / "patients.csv").write_text("filename,patient_id\ntrain/normal/a.png,p1\n"
                                           "train/normal/b.png,p1\ntest/normal/d.png,p2\n")
    train = ImageListDataset(tmp_path / "train", list_format="folder")
    assert train.patients == ["p1", "p1", "pneumonia/c.png"]
    assert ImageListDataset(tmp_path / "test", list_format="folder").patients == ["p2"]
    (tmp_path / "patients.csv").write_text("filename,patient_id\ndata/train/normal/a.png,p1\n")  # wrong prefix
    with pytest.raises(DatasetError, match=r"patients.csv:2: data/train/normal/a.png is not a file under"):
        ImageListDataset(tmp_path / "train", list_format="folder")
    (tmp_path / "patients.csv").unlink()
    (tmp_path / "train" / "patients.csv").write_text("filename,patient\nnormal/a.png,p9\n")
    with pytest.raises(DatasetError, match=r"patients.csv:1: the patients file needs columns"):
        ImageListDataset(tmp_path / "train", list_format="folder")
