"""Helpers shared by train.py, test.py and bench.py: distributed setup, checkpoint I/O,
mixed precision, embedding extraction and logging. Nothing else belongs here."""
import datetime
import hashlib
import json
import os
import random
import sys
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

CHECKPOINT_FORMAT_VERSION = 1


class UserError(RuntimeError):
    """A mistake in the command line or its files (a missing checkpoint, no GPU, weights that
    do not fit): run_cli prints its message as one `error:` line."""


class RunStopped(RuntimeError):
    """A run that stopped itself with its files intact (a failed save, a non-finite loss):
    run_cli prints its message as one `error:` line and exits with code 1."""
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Devices and distributed runs
# --------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup_runtime(device_arg="auto"):
    """Pick the device and, under torchrun (RANK/WORLD_SIZE set), join the process group:
    NCCL on CUDA, gloo on CPU. A plain `python train.py` stays single-process."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_arg} asked for, but no CUDA GPU is visible; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Runtime(torch.device(device_arg))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Runtime(device, rank, world_size, local_rank)


def cleanup_runtime(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime):
    if runtime.distributed:
        dist.barrier()


def all_gather_varlen(tensor, runtime):
    """Concatenate tensors of different lengths (dim 0) from all ranks, in rank order."""
    if not runtime.distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(runtime.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def average_buffers(module, runtime):
    """Average floating-point buffers (BatchNorm running statistics) over the ranks. Each rank
    updates them from its own batches, so without this the ranks would evaluate slightly
    different models, and the checkpoint (rank 0's) would not be the model that was evaluated."""
    if not runtime.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= runtime.world_size
        else:
            dist.broadcast(buffer, src=0)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    # numpy's key array goes in as a tensor: weights_only loads accept tensors, not ndarrays.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------
def resolve_amp(amp, device="auto"):
    """'auto' -> bf16 on CUDA GPUs of compute capability 8 or newer (A100, H100, RTX 30xx+),
    fp16 (with the gradient scaler) on older ones, where bf16 is emulated and slow (V100, T4),
    none on CPU. Other values pass through."""
    if amp != "auto":
        return amp
    if device == "cpu" or not torch.cuda.is_available():
        return "none"
    index = torch.device(device).index if device.startswith("cuda") else None
    major, _ = torch.cuda.get_device_capability(index)
    return "bf16" if major >= 8 else "fp16"


def autocast(device, amp):
    """One autocast context for every forward pass; `amp` is none, bf16 or fp16."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def extract_embeddings(model, loader, runtime, amp="none", channels_last=False, progress=True,
                       branch_features=False):
    """(embeddings (N, D) float32, labels (N,)) of a whole loader, on the runtime's device.
    With branch_features (hybrid models), a third item: {branch: (N, C) float32} pooled
    features of each branch from the same forward pass (for branch attribution).

    Under DDP the loader holds this rank's shard (see eval_sampler) and the shards are gathered
    back into the dataset's order on every rank.
    """
    model.eval()
    embeddings, labels, features = [], [], {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    bar = tqdm(loader, desc="embed", leave=False, disable=not (progress and runtime.is_main))
    for images, targets in bar:
        images = images.to(runtime.device, non_blocking=True, memory_format=memory_format)
        with autocast(runtime.device, amp):
            if branch_features:
                parts, _ = model.branch_features(images)
                embeddings.append(model.fuse(parts).float())
                for name, value in parts.items():
                    features.setdefault(name, []).append(value.float())
            else:
                embeddings.append(model(images).float())
        labels.append(targets.to(runtime.device))
    embeddings = torch.cat(embeddings)
    labels = torch.cat(labels)
    features = {name: torch.cat(values) for name, values in features.items()}
    if runtime.distributed:
        order = torch.as_tensor(list(iter(loader.sampler)), device=runtime.device)
        order = all_gather_varlen(order, runtime)
        embeddings = all_gather_varlen(embeddings, runtime)
        labels = all_gather_varlen(labels, runtime)
        features = {name: all_gather_varlen(value, runtime) for name, value in features.items()}
        # Distributed eval samplers interleave indices across ranks; restore dataset order.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        embeddings, labels = embeddings[inverse], labels[inverse]
        features = {name: value[inverse] for name, value in features.items()}
    if branch_features:
        return embeddings, labels, features
    return embeddings, labels


def has_branches(model):
    """True for a model with a per-branch fusion (the hybrid)."""
    return hasattr(model, "branch_features") and hasattr(model, "fuse")


@torch.inference_mode()
def mean_branch_shares(model, features, neighbours, gallery_embeddings, gallery_features, chunk_size=4096):
    """{branch: percent of the query-to-neighbour similarity that branch carries}, the mean
    over the queries (model.branch_attribution against the gallery's mean features); queries
    whose drops are both 0 are left out. neighbours: (Q,) gallery index of each query's top-1."""
    means = {b: f.mean(0) for b, f in gallery_features.items()}
    neighbours = torch.as_tensor(neighbours, device=gallery_embeddings.device)
    sums, count = {b: 0.0 for b in features}, 0
    for start in range(0, len(neighbours), chunk_size):
        chunk = {b: f[start:start + chunk_size] for b, f in features.items()}
        out = model.branch_attribution(chunk, gallery_embeddings[neighbours[start:start + chunk_size]], means)
        valid = ~torch.isnan(out[f"{next(iter(features))}_share"])
        count += int(valid.sum())
        for b in features:
            sums[b] += float(out[f"{b}_share"][valid].sum())
    if count == 0:
        return None
    return {b: round(100.0 * sums[b] / count, 2) for b in features}


class ShardSampler(torch.utils.data.Sampler):
    """Rank r takes images r, r + W, r + 2W, ...: every image exactly once across ranks
    (DistributedSampler pads with repeats, which would put duplicates into the metrics)."""

    def __init__(self, num_items, runtime):
        self.indices = list(range(runtime.rank, num_items, runtime.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


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


def save_checkpoint(state, path):
    """Write a checkpoint atomically (see atomic_write). A failed write (a full disk, a lost
    mount) raises RunStopped naming the file; what was on disk before is intact."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as error:
        raise RunStopped(f"could not write checkpoint {path} ({error}); the checkpoints already in "
                         f"{Path(path).parent} are intact. Free space (or fix the folder) and run "
                         "again (train.py: --resume auto continues from the newest checkpoint)") from error


def load_checkpoint(path, flag="--resume"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such checkpoint file")
    advice = ("take an earlier checkpoint (train.py --resume auto takes the newest readable one "
              "in --save-dir)")
    if path.stat().st_size == 0:
        raise UserError(f"{flag} {path}: the file is empty (0 bytes), cut off before anything "
                        f"was written (a full disk or an interrupted copy); {advice}")
    if path.suffix == ".safetensors":  # weights exported by export.py
        from export import load_safetensors
        return load_safetensors(path, flag)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory at the end
            why = f"{path.stat().st_size:,} bytes without the archive directory a complete checkpoint ends with"
        else:
            why = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        raise UserError(f"{flag} {path}: cannot load checkpoint, the file is truncated, corrupt or "
                        f"not a PyTorch checkpoint ({why}); {advice}") from error


def digest(strings):
    """SHA-256 of a sequence of strings (e.g. the image paths of a split)."""
    h = hashlib.sha256()
    for text in strings:
        h.update(text.encode() + b"\0")
    return h.hexdigest()


def model_fingerprint(config, state_dict):
    """SHA-256 of a model config and every weight: equal only for the same model. Files that
    belong to one model (an OOD detector, a retrieval index) store it and refuse another."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key, tensor in state_dict.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_trained_model(path, device):
    """(model in eval mode on device, checkpoint dict, fingerprint) from a train.py checkpoint:
    the model is rebuilt from the checkpoint's own config."""
    from model import build_model  # here: model imports timm, which utils' other users need not

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise UserError(f"{path} has no model config: give a checkpoint written by train.py")
    model = build_model(**checkpoint["model_config"], pretrained=False)
    load_model_weights(model, state_dict_of(checkpoint), path)
    fingerprint = model_fingerprint(checkpoint["model_config"], model.state_dict())
    return model.to(device).eval(), checkpoint, fingerprint


def class_prototypes(embeddings, labels, num_classes, chunk_size=65536):
    """(num_classes, D) normalised mean embedding of each class (zeros for a class without
    images), on the embeddings' device; summed chunk by chunk in float32, so a float16 numpy
    index of millions is never copied whole."""
    embeddings, labels = torch.as_tensor(embeddings), torch.as_tensor(labels)
    sums = torch.zeros(num_classes, embeddings.shape[1], device=embeddings.device)
    for start in range(0, len(embeddings), chunk_size):
        sums.index_add_(0, labels[start:start + chunk_size].to(embeddings.device),
                        embeddings[start:start + chunk_size].float())
    return torch.nn.functional.normalize(sums, dim=1)


def data_bit_depth(checkpoint):
    """The bit depth train.py scaled its 16-bit images by (an int), or None: 8-bit training data,
    or a checkpoint saved before the depth was recorded. Every program that embeds images for a
    checkpoint scales by it, so a film is as bright at test time as in training."""
    depth = checkpoint.get("bit_depth") if isinstance(checkpoint, dict) else None
    return depth if isinstance(depth, int) else None


def refuse_distributed(program):
    """ood.py and retrieve.py run in one process; under torchrun each rank would embed
    everything and the gather would duplicate it."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(f"{program} runs in a single process; start it with python, not torchrun "
                        "(test.py and train.py are the programs that use several)")


def state_dict_of(checkpoint):
    """The model weights of a full checkpoint, a bare state dict, or a state_dict wrapper."""
    for key in ("model", "state_dict", "state-dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def strip_wrapper_prefixes(state_dict):
    """The state dict with DDP ('module.') and torch.compile ('_orig_mod.') prefixes removed."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_model_weights(model, state_dict, source):
    """Strict load that names what does not fit. DDP ('module.') and torch.compile
    ('_orig_mod.') prefixes of weights saved elsewhere are stripped."""
    cleaned = strip_wrapper_prefixes(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(cleaned) if expected[k].shape != cleaned[k].shape)
    if missing or unexpected or mismatched:
        def listing(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {listing(unexpected)}")
        if mismatched:
            problems.append("shape mismatch: " + listing(
                [f"{k} {tuple(cleaned[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]))
        raise UserError(f"checkpoint {source} does not fit the model ({'; '.join(problems)}). "
                           "Check --model, --embedding-dim, --convnext-name, --vit-name, --img-size and --neck")
    model.load_state_dict(cleaned)


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
def log(runtime, *message):
    if runtime.is_main:
        print(*message, flush=True)


def log_record(runtime, path, record):
    """Print a metrics record and append it to a JSON-lines file (main process only), flushed
    to disk before the epoch's checkpoint is written."""
    if runtime.is_main:
        line = json.dumps(record)
        print(line, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path, data):
    """Atomic JSON write (see atomic_write)."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def run_cli(main, *args):
    """main(*args) for a command-line program: a user mistake (UserError, a dataset or
    pretrained-weights problem, a SystemExit with a message) ends in one `error: ...` line on
    stderr and exit code 2, as argparse does; a run that stopped itself (RunStopped, a
    non-finite loss) in one such line and exit code 1. --debug (anywhere on the command line)
    or HYBRID_DEBUG=1 shows the traceback instead."""
    from dataset import DatasetError  # here, not at the top: dataset imports torchvision
    from model import PretrainedWeightsError

    debug = os.environ.get("HYBRID_DEBUG", "0").lower() not in ("0", "", "false", "no")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        debug = True
    hint = "(--debug or HYBRID_DEBUG=1 shows the traceback)"
    try:
        return main(*args)
    except SystemExit as error:
        if isinstance(error.code, str) and not debug:
            print(error.code if error.code.startswith("error:") else f"error: {error.code}",
                  file=sys.stderr)
            sys.exit(2)
        raise
    except (UserError, DatasetError, PretrainedWeightsError) as error:
        if debug:
            raise
        print(f"error: {error}\n{hint}", file=sys.stderr)
        sys.exit(2)
    except (RunStopped, FloatingPointError) as error:
        if debug:
            raise
        print(f"error: {error}\n{hint}", file=sys.stderr)
        sys.exit(1)


def add_debug_flag(parser):
    """--debug in a program's --help; run_cli acts on it (and removes it) before parsing."""
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one 'error:' line "
                        "(or set HYBRID_DEBUG=1)")
    return parser


def print_args(args, runtime):
    log(runtime, "arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
