"""A pre-resized image cache: decode each radiograph once, read a small copy afterwards.

    cache = ImageCache("cache/", img_size=384)       # train.py / test.py / ... --cache-dir cache/
    image = cache.load("data/train/a.png", bit_depth=12)   # 8-bit PIL image ("L" when grey), 432 x 432

Decoding and resizing a 1024 px radiograph costs 20-35 ms per core (BENCHMARKS.md), every epoch; the training
transform then throws most of those pixels away. The cache stores each image once, after
images.load_image (so bit depth, DICOM windowing and inversion are exactly today's) and a
resize to `SCALE` x img_size square (the transform squashes the film to a square anyway; never
enlarged), as a .npy file (memory-mappable; read whole, it is small). The transform (resize to
img_size, random crop, flip) then runs on that small copy: the same pixels as the uncached
pipeline up to one extra bicubic resampling (tests/test_image_cache.py bounds the difference).

Entries are keyed by the file's resolved path, size and modification time and by the settings
(cache size, bit depth, format version), so a changed source file or another --img-size gets a
new entry and a stale one is never read. Each entry is written to a temporary name and renamed
into place (atomic on POSIX): concurrent DDP ranks may both write the same entry and either
copy is whole, and a run killed mid-build leaves only temporary files, removed by the next run,
never a partial entry under a real name. An entry that does not read back (a truncated file after
a crash) is rebuilt. The cache fills lazily, in the loader workers, during the first epoch.
"""
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.errors import UserError
from cxr.images import load_image

VERSION = 1  # bump when what an entry holds changes, so old entries are not read
SCALE = 1.125  # stored side / --img-size: room for the random resized crop
STALE_TMP_SECONDS = 3600  # temporary files older than this belong to a killed run


def cache_side(img_size, scale=SCALE):
    """The side of a cached (square) image for a model input of img_size."""
    return math.ceil(img_size * scale)


def shrink(image, side):
    """image resized (bicubic) to side x side; an image no larger than that, as it is.

    Square, not aspect-preserving: build_transform squashes the whole film to img_size x
    img_size anyway, so squashing first changes nothing in the geometry, while keeping the
    aspect would leave a portrait film's short side below img_size (upsampled later, detail lost).
    """
    if max(image.size) <= side:
        return image
    return image.resize((side, side), Image.Resampling.BICUBIC)


class ImageCache:
    def __init__(self, folder, img_size, scale=SCALE):
        self.folder = Path(folder)
        self.side = cache_side(img_size, scale)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--cache-dir {folder}: cannot create the cache folder ({error}); "
                                  "give a writable folder") from error
        self._warned = False
        if int(os.environ.get("RANK", 0)) == 0:  # one process lists the folder, not every rank
            self._remove_stale_temporaries()

    def __repr__(self):
        return f"ImageCache({str(self.folder)!r}, side={self.side})"

    def key(self, path, bit_depth):
        stat = os.stat(path)
        settings = [VERSION, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, self.side,
                    bit_depth]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:40]

    def entry(self, key):
        return self.folder / key[:2] / f"{key}.npy"  # 256 sub-folders: no folder of 100,000 files

    def load(self, path, bit_depth=None):
        """The image as images.load_image(path, bit_depth) returns it, shrunk to the cache size;
        one channel ("L") when its three channels are equal."""
        file = self.entry(self.key(path, bit_depth))
        try:
            return _to_image(np.load(file))
        except FileNotFoundError:
            pass
        except (ValueError, OSError, EOFError):  # cut off by a crash after the rename: rebuild
            pass
        image = shrink(load_image(path, bit_depth), self.side)
        return _to_image(self._write(file, image))

    def _write(self, file, image):
        array = np.asarray(image)
        if array.ndim == 3 and (array == array[..., :1]).all():
            array = array[..., 0]  # a grey radiograph in RGB: one channel, a third of the bytes
        tmp = file.with_name(f".{file.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            file.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, file)
        except OSError as error:  # a full disk or a read-only cache: the run goes on, uncached
            if not self._warned:
                warnings.warn(f"cannot write the image cache entry {file} ({error}); images that are "
                              f"not cached yet are read from their files. Free space in {self.folder} "
                              "or run without --cache-dir", stacklevel=2)
                self._warned = True
        finally:
            if tmp.exists():
                tmp.unlink()
        return array

    def _remove_stale_temporaries(self):
        """Temporary files a killed run left (recent ones may be another rank's, still writing)."""
        now = time.time()
        for tmp in self.folder.glob("*/.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
            except OSError:  # another process removed or renamed it first
                pass

    def summary(self):
        """(entries, bytes) held in the cache folder."""
        files = list(self.folder.glob("*/*.npy"))
        return len(files), sum(f.stat().st_size for f in files)


def _to_image(array):
    """uint8 (H, W) -> an "L" image, (H, W, 3) -> "RGB". A grey radiograph stays one channel:
    resizing one channel instead of three identical ones is most of the cache's speed-up, and
    dataset.build_transform makes the tensor three channels after the resize."""
    return Image.fromarray(array)


def add_argument(parser):
    """--cache-dir, the same on every program that reads images."""
    parser.add_argument("--cache-dir", default=None,
                        help="pre-resized image cache: each image is decoded once and stored at "
                        f"{SCALE}x --img-size square in DIR, later epochs and runs read that "
                        "(entries follow the file's path, size and modification time; safe to share "
                        "between runs and DDP ranks)")
