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
from pathlib import Path

from cxr.checkpoints import export_safetensors, load_checkpoint
from cxr.cli import add_debug_flag, run_cli


def main(args):
    checkpoint = load_checkpoint(args.checkpoint, flag="export.py")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
    weights, sidecar = export_safetensors(checkpoint, out)
    size = weights.stat().st_size
    print(f"wrote {weights} ({size / 1e9:.2f} GB, {len(checkpoint['model'])} tensors) and {sidecar}")
    return weights


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write a checkpoint's weights as safetensors + JSON")
    parser.add_argument("checkpoint", help="a train.py checkpoint (.pth)")
    parser.add_argument("--out", help="output file (default: the checkpoint's name with .safetensors)")
    return add_debug_flag(parser)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
