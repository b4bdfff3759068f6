"""Weights-only checkpoints: what a trained model needs to embed, without the training state.

    python export.py runs/x/covid_..._best_ckpt.pth --out model.safetensors   # + model.json

A train.py checkpoint holds the optimiser's moments and the RNG states beside the weights: the
paper configuration's is 2.1 GB, its weights alone 0.71 GB. `export.py` writes the weights as a
safetensors file (no pickle: safe to load from a stranger) whose metadata, and a JSON file beside
it, hold what every program reads besides the weights: the model config, the classes, the bit
depth the 16-bit images were scaled by, the run's arguments and how the checkpoint was selected.
test.py, retrieve.py, explain.py and ood.py take the .safetensors file wherever they take a
checkpoint (utils.load_checkpoint reads it) and give the same embeddings; train.py --resume takes
it only as a warm start (new optimiser, schedule and epoch count; it says so).

train.py's best checkpoint is the epoch checkpoint itself (a hard link) while that epoch file
exists, and becomes weights_only_state's .pth (model, config, classes, selection; no optimiser)
when the epoch file is pruned, so a run folder holds at most --keep-checkpoints full states.
"""
import argparse
import json
import os
from pathlib import Path


import utils

# What a weights-only checkpoint keeps of train.py's state: enough to rebuild, evaluate and
# explain the model and to know which run and selection it came from.
WEIGHTS_ONLY_KEYS = ("format_version", "model", "model_config", "classes", "epoch", "criterion",
                     "branch_criteria", "args", "best_metric", "best_epoch", "selection", "split",
                     "bit_depth", "param_grouping", "metrics")
# Of those, what the safetensors file's metadata carries as JSON (the weights are its tensors).
METADATA_KEYS = ("format_version", "model_config", "classes", "epoch", "args", "best_metric",
                 "best_epoch", "selection", "split", "bit_depth", "metrics")
METADATA_KEY = "hybrid_checkpoint"


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
        utils.save_checkpoint(weights_only_state(state), best_file)


def detach_best(best_file, epoch_file):
    """Before epoch_file is deleted: when best_file is that same file (a hard link), rewrite
    best_file as a weights-only checkpoint, so the pruned epoch's optimiser state goes with it."""
    best_file = Path(best_file)
    if best_file.exists() and os.path.samefile(best_file, epoch_file):
        state = utils.load_checkpoint(epoch_file)
        utils.save_checkpoint(weights_only_state(state), best_file)


def export_safetensors(checkpoint, out):
    """Write checkpoint's model weights to `out` (.safetensors) and its description to
    out.with_suffix('.json'); returns the two paths. Both are written atomically."""
    from safetensors.torch import save  # timm's dependency: always installed with it

    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint or "model" not in checkpoint:
        raise utils.UserError("export.py needs a checkpoint written by train.py (with its model config)")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise utils.UserError(f"--out {out}: name the file *.safetensors")
    sidecar = out.with_suffix(".json")
    if sidecar.name == "args.json":  # a run folder's own record: never overwritten by an export
        raise utils.UserError(f"--out {out}: its JSON would overwrite the run's args.json; choose another name")
    description = {key: checkpoint[key] for key in METADATA_KEYS if key in checkpoint}
    # Numbers from numpy or torch become Python numbers; anything else would be a silent string.
    text = json.dumps(description, default=lambda value: value.item() if hasattr(value, "item") else str(value))
    # safetensors refuses tensors that share memory; a copy of each is the simple way round.
    tensors = {key: value.detach().cpu().contiguous().clone()
               for key, value in utils.strip_wrapper_prefixes(checkpoint["model"]).items()}
    blob = save(tensors, metadata={METADATA_KEY: text})
    utils.atomic_write(out, lambda f: f.write(blob))
    utils.write_json(sidecar, json.loads(text))
    return out, sidecar


def load_safetensors(path, flag="--resume"):
    """The dict utils.load_checkpoint returns for a train.py checkpoint, from an exported file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise utils.UserError(f"{flag} {path}: cannot read the safetensors file ({error}); export "
                              "it again with export.py") from error
    if METADATA_KEY not in metadata:
        raise utils.UserError(f"{flag} {path}: a safetensors file without this repository's model "
                              "description; write it with export.py from a train.py checkpoint")
    checkpoint = json.loads(metadata[METADATA_KEY])
    checkpoint.update(model=weights, weights_only=True)
    return checkpoint


def main(args):
    checkpoint = utils.load_checkpoint(args.checkpoint, flag="export.py")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
    weights, sidecar = export_safetensors(checkpoint, out)
    size = weights.stat().st_size
    print(f"wrote {weights} ({size / 1e9:.2f} GB, {len(checkpoint['model'])} tensors) and {sidecar}")
    return weights


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write a checkpoint's weights as safetensors + JSON")
    parser.add_argument("checkpoint", help="a train.py checkpoint (.pth)")
    parser.add_argument("--out", help="output file (default: the checkpoint's name with .safetensors)")
    return utils.add_debug_flag(parser)


if __name__ == "__main__":
    utils.run_cli(lambda: main(get_args_parser().parse_args()))
