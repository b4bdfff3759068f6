"""Weights-only export: what a trained model needs to embed, without the training state.

    python export.py runs/x/covid_..._best_ckpt.pth --out model.safetensors   # + model.json
    python export.py runs/x/covid_..._best_ckpt.pth --onnx model.onnx         # for onnxruntime

Writes the weights as a safetensors file (no pickle: safe to load from a stranger) whose
metadata, and model.json beside it, hold the model config, the classes, the bit depth, the run's
arguments and how the checkpoint was selected (cxr/checkpoints.py). test.py, retrieve.py,
explain.py and ood.py take the .safetensors file wherever they take a checkpoint and give the
same embeddings; train.py --resume takes it only as a warm start. The OOD detector ood.py fitted
for the checkpoint (<checkpoint stem>_ood.pth) is copied beside the export (<out stem>_ood.pth),
where test.py and retrieve.py look for it: it belongs to the same weights (its fingerprint).
"""
import argparse
from pathlib import Path

from cxr.atomic_files import atomic_write, write_json
from cxr.checkpoints import data_bit_depth, describe, export_safetensors, load_checkpoint, load_trained_model
from cxr.cli import add_debug_flag, run_cli
from cxr.errors import UserError
from cxr.onnx_export import OPSET, export_onnx, preprocessing
from cxr.ood_detector import default_detector_path


def main(args):
    """The safetensors export (--out, the default) and/or the ONNX one (--onnx); returns the
    first file written."""
    checkpoint = load_checkpoint(args.checkpoint, flag="export.py")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise UserError("export.py needs a checkpoint written by train.py (with its model config)")
    extra = {"preprocessing": preprocessing(checkpoint["model_config"], data_bit_depth(checkpoint))}
    written = []
    if args.out or not args.onnx:
        out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
        weights, sidecar = export_safetensors(checkpoint, out, extra)
        size = weights.stat().st_size
        print(f"wrote {weights} ({size / 1e9:.2f} GB, {len(checkpoint['model'])} tensors) and {sidecar}")
        copy_detector(args.checkpoint, weights)
        written.append(weights)
    if args.onnx:
        written.append(write_onnx(args.checkpoint, checkpoint, Path(args.onnx), extra))
    return written[0]


def write_onnx(path, checkpoint, out, extra):
    model, _, fingerprint = load_trained_model(path, "cpu")
    description = {**describe(checkpoint), **extra, "fingerprint": fingerprint}
    export_onnx(model, description, out)
    sidecar = out.with_suffix(".json")
    if sidecar.name == "args.json":
        raise UserError(f"--onnx {out}: its JSON would overwrite the run's args.json; choose another name")
    write_json(sidecar, description)
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, ONNX opset {OPSET}, dynamic batch) and {sidecar}; "
          "onnxruntime alone runs it (see its preprocessing in either file)")
    return out


def copy_detector(checkpoint_path, weights):
    """The OOD detector fitted for the checkpoint, beside the exported weights."""
    detector = default_detector_path(checkpoint_path)
    if detector.is_file():
        copy = default_detector_path(weights)
        atomic_write(copy, lambda f: f.write(detector.read_bytes()))
        print(f"copied the OOD detector {detector} to {copy}")
    else:
        print(f"no OOD detector {detector} to copy: test.py and retrieve.py on {weights} will have none "
              f"(fit one with python ood.py --resume {checkpoint_path}, then export again)")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write a checkpoint's weights as safetensors + JSON")
    parser.add_argument("checkpoint", help="a train.py checkpoint (.pth)")
    parser.add_argument("--out", help="safetensors file (default: the checkpoint's name with .safetensors; "
                        "not written when only --onnx is given)")
    parser.add_argument("--onnx", help="also (or only) write the embedding model as this ONNX file (+ its "
                        ".json), for onnxruntime without PyTorch")
    return add_debug_flag(parser)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
