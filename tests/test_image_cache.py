"""The pre-resized image cache: same pixels up to resampling, entries that follow their source
file, and no partial entry ever read (image_cache.py)."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import train
from cxr import image_cache, images
from cxr.image_cache import ImageCache
from dataset import ImageListDataset, build_transform
from test_train import phantoms, tiny_args  # noqa: F401  (the phantoms fixture)


def radiograph(size=(1024, 896), peak=255, seed=0):
    """A smooth chest-like grey image with fine texture, as uint8 or (peak > 255) uint16."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) + 0.2 * np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) * 30)
    texture = rng.normal(0, 0.02, size=(h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    values = np.clip(base + texture, 0, 1) * peak
    return values.astype(np.uint16 if peak > 255 else np.uint8)


def write_png(path, array):
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("peak, bit_depth", [(255, None), (4095, 12)])
def test_cached_pixels_match_the_uncached_pipeline_up_to_resampling(tmp_path, peak, bit_depth):
    path = write_png(tmp_path / "film.png", radiograph(peak=peak))
    transform = build_transform(128, train=False)
    plain = transform(images.load_image(path, bit_depth))
    cache = ImageCache(tmp_path / "cache", img_size=128)
    first = transform(cache.load(path, bit_depth))  # built now
    again = transform(cache.load(path, bit_depth))  # read back from the entry
    assert torch.equal(first, again)
    # In grey levels (0-255): one extra bicubic step, never a shift or a transposition.
    grey = (again - plain).abs() * 0.226 * 255  # undo the ImageNet std (~0.226) of Normalize
    assert grey.mean() < 1.0 and grey.max() < 12
    assert np.corrcoef(again.flatten(), plain.flatten())[0, 1] > 0.999
    entry = next((tmp_path / "cache").glob("*/*.npy"))
    stored = np.load(entry)
    assert stored.dtype == np.uint8 and stored.ndim == 2  # grey: one channel
    assert stored.shape == (image_cache.cache_side(128),) * 2 == (144, 144)  # squashed, as the transform does


def test_a_portrait_film_with_fine_detail_keeps_its_resolution(tmp_path):
    """A 1000 x 1300 film with texture of about one input pixel (8 px blocks at 128 px input): the
    cache must not store its short side below the input size. An aspect-kept copy (111 x 144)
    gives correlation 0.948 and 11.6 grey levels here, the square one 0.980 and 7.4."""
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 256, size=(1300 // 8 + 1, 1000 // 8 + 1)).repeat(8, 0).repeat(8, 1)[:1300, :1000]
    path = write_png(tmp_path / "portrait.png", texture.astype(np.uint8))
    transform = build_transform(128, train=False)
    plain = transform(images.load_image(path))
    cached = transform(ImageCache(tmp_path / "cache", img_size=128).load(path))
    grey = (cached - plain).abs() * 0.226 * 255
    assert np.corrcoef(cached.flatten(), plain.flatten())[0, 1] > 0.97, grey.mean()
    assert grey.mean() < 9.0


def test_a_cache_that_cannot_be_written_warns_once_and_reads_the_files(tmp_path, monkeypatch):
    path = write_png(tmp_path / "film.png", radiograph((200, 200)))
    cache = ImageCache(tmp_path / "cache", img_size=64)

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(image_cache.np, "save", full_disk)
    with pytest.warns(UserWarning, match="cannot write the image cache entry"):
        first = np.asarray(cache.load(path))
    assert np.array_equal(np.asarray(cache.load(path)), first)  # still served, from the file
    assert cache.summary()[0] == 0 and not list((tmp_path / "cache").glob("*/.*.tmp"))


def test_a_second_read_does_not_decode_the_source(tmp_path, monkeypatch):
    path = write_png(tmp_path / "film.png", radiograph((300, 300)))
    cache = ImageCache(tmp_path / "cache", img_size=64)
    first = np.asarray(cache.load(path))

    def no_decode(*_):
        raise AssertionError("the source was decoded again")
    monkeypatch.setattr(image_cache, "load_image", no_decode)
    assert np.array_equal(np.asarray(ImageCache(tmp_path / "cache", img_size=64).load(path)), first)
    assert ImageCache(tmp_path / "cache", img_size=64).summary()[0] == 1


def test_small_images_are_not_enlarged_and_colour_is_kept(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0] = 200  # a colour image stays colour
    path = write_png(tmp_path / "small.png", rgb)
    image = ImageCache(tmp_path / "cache", img_size=64).load(path)
    assert image.size == (50, 40) and np.array_equal(np.asarray(image), rgb)


def test_a_changed_file_another_size_or_depth_gets_a_new_entry(tmp_path):
    path = write_png(tmp_path / "film.png", radiograph((200, 200), peak=4095))
    cache = ImageCache(tmp_path / "cache", img_size=64)
    before = np.asarray(cache.load(path, 12))
    assert not np.array_equal(np.asarray(cache.load(path, 16)), before)  # another depth: darker
    write_png(path, 4095 - radiograph((200, 200), peak=4095))  # the file replaced by its negative
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later modification time
    after = np.asarray(cache.load(path, 12))
    assert np.corrcoef(after.ravel().astype(float), before.ravel().astype(float))[0, 1] < -0.9
    ImageCache(tmp_path / "cache", img_size=96).load(path, 12)
    assert cache.summary()[0] == 4


def test_a_cut_off_entry_is_rebuilt_and_old_temporaries_removed(tmp_path):
    path = write_png(tmp_path / "film.png", radiograph((200, 200)))
    cache = ImageCache(tmp_path / "cache", img_size=64)
    good = np.asarray(cache.load(path))
    entry = cache.entry(cache.key(path, None))
    entry.write_bytes(entry.read_bytes()[:100])  # a crash cut the file after its rename
    stale = entry.with_name(f".{entry.stem}.123.abcd.tmp")  # a killed writer's leftover
    stale.write_bytes(b"partial")
    old = time.time() - 2 * image_cache.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    fresh = entry.with_name(f".{entry.stem}.456.ef01.tmp")  # another rank still writing
    fresh.write_bytes(b"partial")
    cache = ImageCache(tmp_path / "cache", img_size=64)
    assert not stale.exists() and fresh.exists()
    assert np.array_equal(np.asarray(cache.load(path)), good)
    assert np.array_equal(np.load(entry), good)  # rewritten whole


def test_concurrent_writers_of_one_entry_all_read_a_whole_image(tmp_path):
    path = write_png(tmp_path / "film.png", radiograph((400, 400)))
    expected = np.asarray(ImageCache(tmp_path / "reference", img_size=64).load(path))

    def load(_):  # a fresh cache object each, as separate DDP ranks or loader workers would have
        return np.asarray(ImageCache(tmp_path / "cache", img_size=64).load(path))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load, range(16)))
    assert all(np.array_equal(r, expected) for r in results)
    assert not list((tmp_path / "cache").glob("*/.*.tmp"))


def test_an_unwritable_cache_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception, match="--cache-dir .*cannot create the cache folder"):
        ImageCache(blocker / "cache", img_size=64)


def test_dataset_reads_through_the_cache(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(4):
        write_png(folder / f"{i}.png", radiograph((256, 256), seed=i))
        lines.append(f"p{i} {i}.png {'normal' if i % 2 else 'pneumonia'} src")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    dataset = ImageListDataset(folder, tmp_path / "list.txt", "covidx", transform=build_transform(64, False))
    dataset.use_cache(ImageCache(tmp_path / "cache", img_size=64))
    part = dataset.subset([1, 2], build_transform(64, False))
    assert part.cache is dataset.cache  # subsets share it
    assert [part[i][0].shape for i in range(2)] == [torch.Size([3, 64, 64])] * 2
    assert dataset.cache.summary()[0] == 2


def test_train_with_cache_dir_decodes_each_image_once(phantoms, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    extra = ["--epochs", "1", "--batches-per-epoch", "20", "--cache-dir", str(cache)]
    train.main(tiny_args(phantoms, tmp_path / "run", *extra))
    listed = sum(len((phantoms / name).read_text().split("\n")) - 1
                 for name in ("train_split.txt", "test_split.txt"))
    assert ImageCache(cache, img_size=32).summary()[0] == listed  # every image, once
    assert json.loads((tmp_path / "run" / "args.json").read_text())["cache_dir"] == str(cache)

    def no_decode(*_):
        raise AssertionError("the source was decoded again")
    monkeypatch.setattr(image_cache, "load_image", no_decode)  # a second run reads only the cache
    train.main(tiny_args(phantoms, tmp_path / "again", *extra))


def test_a_grey_image_gives_the_same_tensor_in_one_channel_as_in_three():
    grey = Image.fromarray(radiograph((300, 260)))
    for train_mode in (False, True):
        torch.manual_seed(0)
        one = build_transform(64, train_mode, rand_resize=True)(grey)
        torch.manual_seed(0)
        three = build_transform(64, train_mode, rand_resize=True)(grey.convert("RGB"))
        assert one.shape == three.shape == (3, 64, 64) and torch.allclose(one, three, atol=1e-6)
