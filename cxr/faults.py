"""Fault tolerance of a training run, kept out of train.py so that it reads top to bottom.

- Clean stops: SIGTERM (a pre-empted job) or Ctrl-C stop the run at the next step; the last
  completed epoch's checkpoint is on disk and the command that continues it is printed. A
  second signal stops at once.
- `--resume auto`: the newest readable epoch checkpoint of this run in --save-dir (unreadable
  ones are named and passed over); none yet: a new run.
- metrics.jsonl after a resume holds exactly one line per epoch up to the checkpoint's (a kill
  between the metrics line and the checkpoint would otherwise leave a duplicate or a gap).
- The save folder is tested (a write, the free space) before any training.
- NonFiniteGuard: a NaN/Inf loss or gradient stops the run naming the step, the batch's files
  and the last good checkpoint, or with --skip-nonfinite skips that step and counts it.

Checkpoints themselves are written atomically and durably by atomic_files.atomic_write.
"""
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from cxr.atomic_files import atomic_write
from cxr.checkpoints import load_checkpoint
from cxr.errors import RunStopped, UserError
from cxr.runtime import log


# --------------------------------------------------------------------------------------------
# Clean stops on SIGTERM / Ctrl-C
# --------------------------------------------------------------------------------------------
class StopRequested(Exception):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


_requested = []  # signal numbers received while stop_on_signals is active


@contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """While active, the first SIGTERM or SIGINT only sets a flag that check_stop turns into
    StopRequested at the next step; the second one acts as it would have without us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        if _requested:
            old = previous[signum]
            if callable(old):
                old(signum, frame)  # Python's own Ctrl-C handler: KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _requested.append(signum)
        print(f"\n{signal.Signals(signum).name} received: stopping after this step; the last "
              "completed epoch is kept (send it again to stop at once)", file=sys.stderr, flush=True)

    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    _requested.clear()
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _requested.clear()


def check_stop(runtime, step=None, every=1):
    """Raise StopRequested when a stop signal came. Under DDP every rank must stop at the same
    step, so there the flag is all-reduced, every `every` steps (and whenever step is None)."""
    if runtime.distributed:
        if step is not None and (step + 1) % every:
            return
        flag = torch.tensor([_requested[0] if _requested else 0], device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    else:
        signum = _requested[0] if _requested else 0
    if signum:
        raise StopRequested(signum)


def resume_command(argv=None):
    """The command line that continues this run: the same flags, --resume auto."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).name != "train.py":
        return "python train.py <the same flags> --resume auto"
    kept, skip_next = [], False
    for arg in argv[1:]:
        if skip_next:
            skip_next = False
        elif arg == "--resume":
            skip_next = True
        elif not (arg.startswith("--resume=") or arg == "--overwrite"):
            kept.append(arg)
    launcher = "torchrun <the same launcher options>" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "python"
    return f"{launcher} {shlex.join([argv[0], *kept, '--resume', 'auto'])}"


def report_stop(stop, save_dir, pattern, runtime):
    """Say where the run stopped and how to continue it (main process)."""
    newest = newest_checkpoint(save_dir, pattern)
    if newest is None:
        where = "no epoch was completed, so there is no checkpoint yet"
    else:
        where = f"the last completed epoch, {newest[1]}, is saved in {newest[0]}"
    log(runtime, f"stopped by {stop}: {where}. Continue with:\n  {resume_command()}")


# --------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------
def _epoch_of(path):
    match = re.search(r"_epoch_(\d+)_ckpt\.pth$", path.name)
    return int(match.group(1)) if match else None


def epoch_checkpoints(save_dir, pattern):
    """[(path, epoch)] of the files matching `pattern` (a glob with the epoch as '*'), newest first."""
    found = [(p, _epoch_of(p)) for p in Path(save_dir).glob(pattern)]
    return sorted(((p, e) for p, e in found if e is not None), key=lambda item: -item[1])


def newest_checkpoint(save_dir, pattern):
    """(path, epoch) of the newest epoch checkpoint on disk, or None (not opened)."""
    found = epoch_checkpoints(save_dir, pattern)
    return found[0] if found else None


def resolve_resume(args, pattern, runtime):
    """The checkpoint dict that --resume names, or None for a new run. `--resume auto` takes the
    newest readable epoch checkpoint matching `pattern` in --save-dir and sets args.resume to
    it; with none (a first start, or a run killed before its first checkpoint) it starts a new
    run, clearing the metrics.jsonl of that start."""
    if args.resume != "auto":
        return load_checkpoint(args.resume) if args.resume else None
    save_dir = Path(args.save_dir)
    unreadable = []
    for path, _ in epoch_checkpoints(save_dir, pattern):
        try:
            checkpoint = load_checkpoint(path)
        except UserError as error:
            unreadable.append(str(error))
            continue
        for problem in unreadable:
            log(runtime, f"warning: --resume auto passes over {problem}")
        args.resume = str(path)
        log(runtime, f"--resume auto: continuing from {path}")
        return checkpoint
    if unreadable:
        raise UserError(f"--resume auto: none of the {len(unreadable)} checkpoints in {save_dir} "
                              f"can be read: {unreadable[0]}. Delete them to start again, or pass --overwrite")
    metrics_log = save_dir / "metrics.jsonl"
    # A run that never saved a checkpoint has logged epoch 0, at most epoch 1 too (a kill between
    # its metrics line and its save); more is another run (another seed or model): keep it.
    finished = [r["epoch"] for r in _read_records(metrics_log) if isinstance(r.get("epoch"), int)]
    if finished and max(finished) > 1:
        raise UserError(f"--resume auto: {save_dir} holds a run (metrics.jsonl up to epoch "
                              f"{max(finished)}) but no checkpoint named like {pattern}; check "
                              "--dataset, --model, --embedding-dim and --seed, choose another "
                              "--save-dir, or pass --overwrite")
    log(runtime, f"--resume auto: no checkpoint in {save_dir} yet; starting a new run")
    args.resume = None
    if runtime.is_main and metrics_log.exists():
        metrics_log.unlink()  # the lines of a start that never saved a checkpoint
    return None


def _read_records(path):
    """The records of a JSON-lines file; a line cut off by a kill is ignored."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def trim_metrics(path, epoch, record=None):
    """Make metrics.jsonl hold one line per epoch up to `epoch` (the resumed checkpoint's):
    lines of later epochs (logged just before a kill, their checkpoint never written) and cut-off
    lines go; the checkpoint's own record fills its epoch if that line is missing."""
    path = Path(path)
    if not path.exists():
        return
    by_epoch = {}
    for r in _read_records(path):
        if isinstance(r.get("epoch"), int) and r["epoch"] <= epoch:
            by_epoch[r["epoch"]] = r  # the last line of an epoch logged twice
    if record is not None:
        by_epoch[epoch] = record
    lines = "".join(json.dumps(by_epoch[e]) + "\n" for e in sorted(by_epoch))
    if lines != path.read_text(encoding="utf-8"):
        atomic_write(path, lambda f: f.write(lines.encode("utf-8")))


def remove_stale_temporaries(save_dir):
    """Delete the temporary files of saves that a kill interrupted; returns how many."""
    stale = [p for p in Path(save_dir).glob(".*.tmp*") if re.search(r"\.(pth|json|jsonl)\.tmp\d+$", p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# --------------------------------------------------------------------------------------------
# The save folder
# --------------------------------------------------------------------------------------------
def check_save_dir(save_dir):
    """A test write in --save-dir before anything else: an unwritable folder fails in seconds."""
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write_test.tmp{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        raise UserError(f"--save-dir {save_dir} cannot be written ({error}); choose a "
                              "writable folder") from error


def check_free_space(save_dir, checkpoint_bytes):
    """Refuse to start when --save-dir cannot hold the next checkpoints: an atomic save needs
    room for the new file beside the old one, and a best checkpoint beside the epoch one."""
    needed = 2 * checkpoint_bytes + 64 * 2 ** 20
    free = shutil.disk_usage(save_dir).free
    if free < needed:
        raise UserError(f"--save-dir {save_dir} has {free / 2 ** 30:.2f} GiB free, but a "
                              f"checkpoint of this run takes about {checkpoint_bytes / 2 ** 30:.2f} GiB "
                              f"and saving needs about {needed / 2 ** 30:.2f} GiB; free space or choose "
                              "another folder")


def checkpoint_bytes(model, optimizer):
    """About the size of a checkpoint: the weights and the optimiser's per-parameter state."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    state = [v for s in optimizer.state.values() for v in s.values()]
    moments = len(optimizer.param_groups[0].get("betas", ())) or 2  # Adam(W): two moments
    params = size(p for g in optimizer.param_groups for p in g["params"])
    return size(model.state_dict().values()) + max(size(state), moments * params)


def check_images(datasets, args, runtime):
    """Before training, every image of every split: its header (a DatasetError names the
    unreadable files), or with --skip-bad-images a full decode that drops the bad ones (a count,
    and the list in <save-dir>/bad_images.txt), so no epoch fails on one file. The full decode
    also measures the bit depth on every image (--bit-depth auto). Rank 0 checks; the other ranks
    take its verdict, so every rank drops the same images."""
    verdict = [None]
    if runtime.is_main:
        verdict = [[d.find_bad_images(args.skip_bad_images, args.workers) for d in datasets]]
    if runtime.distributed:
        dist.broadcast_object_list(verdict, src=0)
    dropped = []
    for dataset, (bad, _) in zip(datasets, verdict[0]):
        dropped += dataset.check_images(args.skip_bad_images, bad=bad)
    depths = [d.bit_depth for d in datasets if isinstance(d.bit_depth, int)] + [
        depth for _, depth in verdict[0] if depth is not None]
    if args.bit_depth == "auto" and depths:
        for dataset in datasets:
            dataset.bit_depth = max(depths)
    if dropped:
        log(runtime, f"warning: --skip-bad-images dropped {len(dropped)} unreadable images "
                           f"(listed in {Path(args.save_dir) / 'bad_images.txt'}), e.g. {dropped[0][0]}: "
                           f"{dropped[0][2]}")
        if runtime.is_main:
            text = "".join(f"{path}\t{line}\t{problem}\n" for path, line, problem in dropped)
            atomic_write(Path(args.save_dir) / "bad_images.txt", lambda f: f.write(text.encode("utf-8")))
    if any(isinstance(d.bit_depth, int) and d.bit_depth > 8 for d in datasets):
        log(runtime, f"16-bit images are scaled as {datasets[0].bit_depth}-bit data "
                           "(--bit-depth to change)")
    return dropped


# --------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# --------------------------------------------------------------------------------------------
class NonFiniteError(RunStopped, FloatingPointError):
    """The loss or a gradient became NaN or Inf; the checkpoints on disk are from before."""


class NonFiniteGuard:
    """Finds the first step of an epoch whose loss or gradient is NaN or Inf.

    Without skip there is no host sync per step: the step number lives on the device and is read
    at check(), which train.py calls every --print-freq steps and at the end of the epoch, before
    anything is logged or saved. With skip (--skip-nonfinite) every optimiser step is checked
    (one sync) and a non-finite one is not applied; `skipped` counts them. Gradients are not
    checked under fp16 loss scaling, whose scaler skips overflowing steps itself.
    """

    def __init__(self, runtime, skip=False, check_grads=True):
        self.skip, self.check_grads, self.runtime = skip, check_grads, runtime
        self.device = runtime.device
        self.start_epoch()

    def start_epoch(self):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.group_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.skipped = 0

    def observe_loss(self, step, loss):
        """Every micro-batch's loss (a 0-dim tensor)."""
        bad = ~torch.isfinite(loss)
        self.group_bad = self.group_bad | bad
        if not self.skip:
            self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def allow_step(self, step, parameters, grad_norm=None):
        """At an optimiser step: False when it must be skipped (skip mode only)."""
        bad = self.group_bad
        if self.check_grads:
            if grad_norm is None:
                grads = [p.grad for p in parameters if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            bad = bad | ~torch.isfinite(grad_norm)
        self.group_bad = torch.zeros_like(self.group_bad)
        if not self.skip:
            self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
            return True
        if self.runtime.distributed:  # the ranks must agree (gradients agree; losses may not)
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        if bool(bad):
            self.skipped += 1
            return False
        return True

    def check(self, epoch, loader, save_dir, pattern):
        first_bad = self.first_bad
        if self.runtime.distributed:  # every rank stops together (the losses of ranks differ)
            never = torch.iinfo(torch.long).max
            first_bad = torch.where(first_bad < 0, never, first_bad).clone()
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad = torch.where(first_bad == never, -1, first_bad)
        first = int(first_bad)  # the host sync
        if first < 0:
            return
        files = batch_files(loader, first)
        named = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        newest = newest_checkpoint(save_dir, pattern)
        good = (f"the last good checkpoint is {newest[0]} (epoch {newest[1]}); nothing after it was saved"
                if newest else "no checkpoint was saved yet")
        resume = f"--resume {newest[0]}" if newest else "the same command"
        raise NonFiniteError(
            f"the training loss or a gradient is not finite (NaN or Inf) at epoch {epoch}, step "
            f"{first + 1} of {len(loader)}" + (f"; that batch holds {named}" if named else "")
            + f". Stopping: {good}. Lower --lr, use --amp bf16 or none, set --clip-grad 1.0, look "
            f"at those images, or pass --skip-nonfinite to skip such steps; then continue with {resume}")


def batch_files(loader, step):
    """The image files of batch `step` of a PK loader (its batches are a pure function of the
    seed, epoch and rank, so they can be drawn again); [] when the loader cannot say."""
    sampler, dataset = getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)
    if sampler is None or not hasattr(dataset, "paths"):
        return []
    batch = next(itertools.islice(iter(sampler), step, None), [])
    where = getattr(dataset, "where", lambda i: str(dataset.paths[i]))
    return [where(i) for i in dict.fromkeys(batch)]
