import numpy as np
import pytest
import torch
from PIL import Image

from dataset import DatasetError, ImageListDataset, build_transform, load_image, read_covidx_list


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
    ([], "no images listed"),
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
