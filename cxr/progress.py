"""Progress of long loops, as the output wants it: a tqdm bar on a terminal; on a file or a
pipe (a cluster job's log) plain timestamped lines, one at the end of each phase and at most one
every LOG_EVERY_S seconds within it, so a log holds no carriage-return redraws.

Programs set the mode once from their --progress flag (set_mode); library loops call progress().
"""
import os
import sys
import time

from tqdm import tqdm

MODES = ("auto", "bar", "log", "none")
LOG_EVERY_S = 30.0
_mode = "auto"


def set_mode(mode):
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode


def current_mode():
    """The mode in force: auto is a bar when stderr is a terminal, else log lines."""
    if _mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return _mode


def timestamp():
    return time.strftime("%Y-%m-%d %H:%M:%S")


class _LogLines:
    """The log-mode stand-in for a tqdm bar: iterates, takes set_postfix, prints lines to stdout."""

    def __init__(self, iterable, desc, total):
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = {}

    def set_postfix(self, **values):
        self.postfix = values

    def _line(self, done, start):
        elapsed = time.perf_counter() - start
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        rate = f", {done / elapsed:.2f} it/s" if elapsed > 0 and done else ""
        print(f"{timestamp()} {self.desc}: {done}{of} in {elapsed:.0f} s{rate}{extra}", flush=True)

    def __iter__(self):
        start = last = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            if time.perf_counter() - last >= LOG_EVERY_S:
                self._line(done, start)
                last = time.perf_counter()
        self._line(done, start)


class _Silent(_LogLines):
    def __iter__(self):
        yield from self.iterable


def progress(iterable, desc, total=None, enabled=True):
    """`iterable` with its progress shown as the mode says (nothing when not enabled, nor on any
    torchrun rank but the first: one log, not one per process)."""
    mode = current_mode() if enabled and int(os.environ.get("RANK", 0)) == 0 else "none"
    if mode == "bar":
        return tqdm(iterable, desc=desc, total=total, leave=False)
    if mode == "log":
        return _LogLines(iterable, desc, total)
    return _Silent(iterable, desc, total)
