"""Devices and distributed runs (torchrun: NCCL on CUDA, gloo on CPU), random states, mixed
precision, and the main process's log lines."""
import datetime
import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cxr.errors import UserError
from cxr.progress import timestamp

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


def distributed_module(module, runtime):
    """`module` under DDP, its gradients views of the all-reduce buckets (gradient_as_bucket_view):
    no copy of every gradient into its bucket each step, less memory, and no stride mismatch
    between a gradient and its bucket (PyTorch's "grad strides do not match bucket view strides")."""
    return DistributedDataParallel(module, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


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


class ShardSampler(torch.utils.data.Sampler):
    """Rank r takes images r, r + W, r + 2W, ...: every image exactly once across ranks
    (DistributedSampler pads with repeats, which would put duplicates into the metrics)."""

    def __init__(self, num_items, runtime):
        self.indices = list(range(runtime.rank, num_items, runtime.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def refuse_distributed(program):
    """ood.py and retrieve.py run in one process; under torchrun each rank would embed
    everything and the gather would duplicate it."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(f"{program} runs in a single process; start it with python, not torchrun "
                        "(test.py and train.py are the programs that use several)")


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
def log(runtime, *message):
    if runtime.is_main:
        print(*message, flush=True)


def readable(record):
    """A metrics record as one log line: a timestamp, then key value pairs with floats rounded to
    4 significant digits (the JSON-lines file keeps every digit)."""
    def value(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{timestamp()} " + "  ".join(f"{k} {value(v)}" for k, v in record.items())


def log_record(runtime, path, record):
    """Print a metrics record as a readable line and append it, in full precision, to a JSON-lines
    file (main process only), flushed to disk before the epoch's checkpoint is written."""
    if runtime.is_main:
        print(readable(record), flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
