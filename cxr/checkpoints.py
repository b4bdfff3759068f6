"""Checkpoints: train.py's full states and the weights-only ones, written atomically, loaded
with errors that name what does not fit; the safetensors export every program reads; and the
fingerprint that ties an OOD detector or a retrieval index to one model.

A train.py checkpoint holds the optimiser's moments and the RNG states beside the weights: the
paper configuration's is 2.1 GB, its weights alone 0.71 GB. The safetensors export (export.py)
holds the weights (no pickle: safe to load from a stranger) and, in its metadata and a JSON file
beside it, what every program reads besides the weights: the model config, the classes, the bit
depth the 16-bit images were scaled by, the run's arguments and how the checkpoint was selected.
load_checkpoint reads both kinds, so test.py, retrieve.py, explain.py and ood.py take either.

train.py's best checkpoint is the epoch checkpoint itself (a hard link) while that epoch file
exists, and becomes weights_only_state's .pth (model, config, classes, selection; no optimiser)
when the epoch file is pruned, so a run folder holds at most --keep-checkpoints full states.
"""
import hashlib
import json
import os
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError  # timm's dependency: always installed with it
from safetensors.torch import load_file, safe_open, save

from cxr.atomic_files import atomic_write, write_json
from cxr.errors import RunStopped, UserError
from model import build_model

CHECKPOINT_FORMAT_VERSION = 1

# What a weights-only checkpoint keeps of train.py's state: enough to rebuild, evaluate and
# explain the model and to know which run and selection it came from.
WEIGHTS_ONLY_KEYS = ("format_version", "model", "model_config", "classes", "findings", "epoch", "criterion",
                     "branch_criteria", "args", "best_metric", "best_epoch", "selection", "split",
                     "bit_depth", "param_grouping", "metrics")


# Of those, what the safetensors file's metadata carries as JSON (the weights are its tensors).
METADATA_KEYS = ("format_version", "model_config", "classes", "findings", "epoch", "args", "best_metric",
                 "best_epoch", "selection", "split", "bit_depth", "metrics")


METADATA_KEY = "hybrid_checkpoint"


def checkpoint_name(args, tag):
    return f"{args.dataset}_{args.model}_embed_{args.embedding_dim}_seed_{args.seed}_{tag}_ckpt.pth"


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

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise UserError(f"{path} has no model config: give a checkpoint written by train.py")
    model = build_model(**checkpoint["model_config"], pretrained=False)
    load_model_weights(model, state_dict_of(checkpoint), path)
    fingerprint = model_fingerprint(checkpoint["model_config"], model.state_dict())
    return model.to(device).eval(), checkpoint, fingerprint


def data_bit_depth(checkpoint):
    """The bit depth train.py scaled its 16-bit images by (an int), or None: 8-bit training data,
    or a checkpoint saved before the depth was recorded. Every program that embeds images for a
    checkpoint scales by it, so a film is as bright at test time as in training."""
    depth = checkpoint.get("bit_depth") if isinstance(checkpoint, dict) else None
    return depth if isinstance(depth, int) else None


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


def weights_only_state(state):
    """A train.py state without the optimiser, scheduler, scaler and RNG states."""
    kept = {key: state[key] for key in WEIGHTS_ONLY_KEYS if key in state}
    kept["weights_only"] = True
    return kept


def is_weights_only(checkpoint):
    return isinstance(checkpoint, dict) and bool(checkpoint.get("weights_only"))


def link_best(epoch_file, best_file, state):
    """Make best_file the epoch checkpoint just written: a hard link (no second copy on disk),
    put in place atomically; where the file system has no hard links, a weights-only copy."""
    epoch_file, best_file = Path(epoch_file), Path(best_file)
    tmp = best_file.with_name(f".{best_file.name}.link.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(epoch_file, tmp)
        os.replace(tmp, best_file)
    except OSError:
        if tmp.exists():
            tmp.unlink()
        save_checkpoint(weights_only_state(state), best_file)


def detach_best(best_file, epoch_file):
    """Before epoch_file is deleted: when best_file is that same file (a hard link), rewrite
    best_file as a weights-only checkpoint, so the pruned epoch's optimiser state goes with it."""
    best_file = Path(best_file)
    if best_file.exists() and os.path.samefile(best_file, epoch_file):
        state = load_checkpoint(epoch_file)
        save_checkpoint(weights_only_state(state), best_file)


def prune_checkpoints(save_dir, args, epoch):
    """Delete this run's epoch checkpoints beyond the newest --keep-checkpoints. Only epochs up
    to the current one count as this run's: files of an earlier run with higher epochs (left in
    the folder with --overwrite) are never pruned in place of the new ones."""
    if args.keep_checkpoints <= 0:
        return
    def epoch_of(path):
        return int(path.name.split("_epoch_")[1].split("_")[0])
    ours = sorted((p for p in save_dir.glob(checkpoint_name(args, "epoch_*")) if epoch_of(p) <= epoch),
                  key=epoch_of)
    for old in ours[: -args.keep_checkpoints]:
        detach_best(save_dir / checkpoint_name(args, "best"), old)
        old.unlink()


def describe(checkpoint):
    """What an exported file carries besides the weights: METADATA_KEYS of the checkpoint, as JSON-able values."""
    description = {key: checkpoint[key] for key in METADATA_KEYS if key in checkpoint}
    # Numbers from numpy or torch become Python numbers; anything else would be a silent string.
    return json.loads(json.dumps(description,
                                 default=lambda value: value.item() if hasattr(value, "item") else str(value)))


def export_safetensors(checkpoint, out, extra=None):
    """Write checkpoint's model weights to `out` (.safetensors) and its description to
    out.with_suffix('.json') (with `extra`, e.g. the preprocessing, in the JSON only); returns the
    two paths. Both are written atomically."""

    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint or "model" not in checkpoint:
        raise UserError("export.py needs a checkpoint written by train.py (with its model config)")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name the file *.safetensors")
    sidecar = out.with_suffix(".json")
    if sidecar.name == "args.json":  # a run folder's own record: never overwritten by an export
        raise UserError(f"--out {out}: its JSON would overwrite the run's args.json; choose another name")
    text = json.dumps(describe(checkpoint))
    # safetensors refuses tensors that share memory; a copy of each is the simple way round.
    tensors = {key: value.detach().cpu().contiguous().clone()
               for key, value in strip_wrapper_prefixes(checkpoint["model"]).items()}
    blob = save(tensors, metadata={METADATA_KEY: text})
    atomic_write(out, lambda f: f.write(blob))
    write_json(sidecar, {**json.loads(text), **(extra or {})})
    return out, sidecar


def load_safetensors(path, flag="--resume"):
    """The dict load_checkpoint returns for a train.py checkpoint, from an exported file."""

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot read the safetensors file ({error}); export "
                              "it again with export.py") from error
    if METADATA_KEY not in metadata:
        raise UserError(f"{flag} {path}: a safetensors file without this repository's model "
                              "description; write it with export.py from a train.py checkpoint")
    checkpoint = json.loads(metadata[METADATA_KEY])
    checkpoint.update(model=weights, weights_only=True)
    return checkpoint
