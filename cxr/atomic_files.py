"""Files written so that a crash, kill, power cut or full disk leaves either the old file or
the new one, never a half-written one."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def fsync_dir(folder):
    """Make a rename or a new file in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, fsync it, rename it over `path`, fsync
    the folder: a crash, kill, power cut or full disk leaves either the old file or the new one,
    never a half-written one. HYBRID_SAVE_PAUSE_S (seconds) holds the finished temporary file
    before the rename, so the fault-injection test can kill inside that window."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("HYBRID_SAVE_PAUSE_S"):
            import time
            time.sleep(float(os.environ["HYBRID_SAVE_PAUSE_S"]))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, data):
    """Atomic JSON write (see atomic_write)."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


@contextlib.contextmanager
def new_folder(out_dir):
    """A hidden sibling folder of out_dir to write a whole data set into, renamed to out_dir (absent
    or empty) when the block ends and deleted when it fails: an interrupted run never leaves a half
    data set that looks complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():  # an empty folder: replace it
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
