"""Will this training run fit in memory? An estimate before the first step.

A run too large for the machine used to end in the kernel's out-of-memory kill (exit 137, no
message) minutes into the first epoch. train.py now estimates the peak before training:

    weights + gradients + AdamW's two moments   4 x the parameter bytes (fp32)
    activations kept for the backward pass      measured: one forward pass of 2 images with
                                                autograd's saved-tensor hooks counting every
                                                tensor it keeps, x (batch / 2), x 1.25 for
                                                the temporaries of the backward pass
    what the process holds already              on CPU its resident memory (libraries, data
                                                lists); on CUDA the memory allocated so far

and stops with the flags to change when that exceeds what the device has free (CPU:
MemAvailable of /proc/meminfo, read before the probe and shared by the ranks on the machine;
CUDA: torch.cuda.mem_get_info after emptying the cache). It is an estimate: allocator
fragmentation and loader workers come on top, so the check also warns above 85%.
"""
import os

import torch

from cxr.errors import UserError
from cxr.runtime import autocast

TEMPORARIES = 1.25  # backward-pass temporaries on top of the saved activations
WARN_SHARE = 0.85
GB = 1e9


def available_bytes(device):
    """(bytes the process can still use, what it holds now) on `device`; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, torch.cuda.memory_allocated(device)
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        with open(f"/proc/{os.getpid()}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return int(meminfo["MemAvailable"].split()[0]) * 1024, rss * 1024
    except (OSError, KeyError, StopIteration, ValueError):  # not Linux: no check
        return None, 0


def saved_activation_bytes(model, img_size, device, amp, images=2):
    """Bytes autograd keeps for the backward pass of one forward over `images` images."""
    storages = {}
    # Weights are saved for the backward pass too, but they are the model's, counted once in
    # what the process holds, not per image.
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.eval()  # no BatchNorm statistics updated by this probe (and BN works on 2 images)
    try:
        x = torch.zeros(images, 3, img_size, img_size, device=device)
        with torch.enable_grad(), autocast(device, amp), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(x)
        del output
    finally:
        model.train(was_training)
    return sum(storages.values()) / images


def estimate(model, args, device, processes=1):
    """{"state", "activations", "held", "total", "available"} in bytes for a training batch.
    `processes`: training processes sharing this memory (DDP ranks on one machine's RAM)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # cached blocks are free for the run
    available, held = available_bytes(device)  # before the probe, whose activations are freed after
    parameters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 3 * parameters  # gradients and AdamW's two moments beside the weights (in "held")
    per_image = saved_activation_bytes(model, args.img_size, device, args.amp)
    activations = per_image * args.batch_size * TEMPORARIES
    total = (held + state + activations) * processes
    return {"state": state, "activations": activations, "held": held, "total": total,
            "available": None if available is None else available + held * processes}


def check(model, args, device, log=print, runtime=None):
    """Log the estimate; a UserError naming the flags to change when it does not fit. Under DDP
    every rank checks its own device (ranks on one CPU machine share its RAM) and all stop
    together when one would not fit, rather than the others waiting for it forever."""
    processes = 1
    if device.type != "cuda":
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    numbers = estimate(model, args, device, processes)
    fits = numbers["available"] is None or numbers["total"] <= numbers["available"]
    if runtime is not None and runtime.distributed:
        verdict = torch.tensor([0.0 if fits else 1.0], device=device)
        torch.distributed.all_reduce(verdict)
        if verdict.item() and fits:
            raise UserError("another training process's memory estimate does not fit its device "
                                  "(see its log); --no-memory-check skips the estimate")
    if numbers["available"] is None:
        return numbers
    where = "GPU" if device.type == "cuda" else "RAM"
    ranks = f" for {processes} processes" if processes > 1 else ""
    line = (f"memory estimate{ranks}: {numbers['total'] / GB:.1f} GB of {numbers['available'] / GB:.1f} GB {where} "
            f"(held {numbers['held'] / GB:.1f}, gradients + AdamW {numbers['state'] / GB:.1f}, "
            f"activations of {args.batch_size} images at {args.img_size} px {numbers['activations'] / GB:.1f})")
    log(line)
    if numbers["total"] > numbers["available"]:
        raise UserError(
            f"this run would need about {numbers['total'] / GB:.1f} GB but {numbers['available'] / GB:.1f} GB "
            f"of {where} is available ({line.split('(', 1)[1].rstrip(')')}). Use --setup small "
            "(the demo's small backbones at 64 px, for CPUs), or lower --img-size or -k, or add "
            "--grad-checkpointing (and --amp bf16 on a GPU); --no-memory-check skips this estimate")
    if numbers["total"] > WARN_SHARE * numbers["available"]:
        log(f"warning: the estimate is over {WARN_SHARE:.0%} of the available memory; loader workers "
            "and fragmentation come on top")
    return numbers
