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
import json
import os
from pathlib import Path

from cxr.atomic_files import atomic_write, write_json
from cxr.checkpoints import data_bit_depth, describe, export_safetensors, load_checkpoint, load_trained_model
from cxr.cli import add_debug_flag, run_cli
from cxr.errors import UserError
from cxr.model_card import model_card
from cxr.onnx_export import OPSET, export_onnx, preprocessing
from cxr.ood_detector import OODDetector, default_detector_path


def main(args):
    """The safetensors export (--out, the default) and/or the ONNX one (--onnx); returns the
    first file written."""
    checkpoint = load_checkpoint(args.checkpoint, flag="export.py")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise UserError("export.py needs a checkpoint written by train.py (with its model config)")
    model, _, fingerprint = load_trained_model(args.checkpoint, "cpu")
    # The same description beside either export (model.json for model.safetensors and model.onnx alike).
    extra = {"preprocessing": preprocessing(checkpoint["model_config"], data_bit_depth(checkpoint)),
             "fingerprint": fingerprint}
    written = []
    if args.out or not args.onnx:
        out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
        weights, sidecar = export_safetensors(checkpoint, out, extra)
        size = weights.stat().st_size
        print(f"wrote {weights} ({size / 1e9:.2f} GB, {len(checkpoint['model'])} tensors) and {sidecar}")
        copy_detector(args.checkpoint, weights)
        written.append(weights)
    if args.onnx:
        written.append(write_onnx(model, checkpoint, Path(args.onnx), extra))
    write_card(args, checkpoint, written)
    return written[0]


def default_report(checkpoint_path):
    """test.py's report of the checkpoint: its default name, else report.json beside it (make demo's)."""
    checkpoint_path = Path(checkpoint_path)
    for candidate in (checkpoint_path.with_name(checkpoint_path.stem + "_report.json"),
                      checkpoint_path.with_name("report.json")):
        if candidate.is_file():
            return candidate
    return None


def report_of(report, checkpoint_path):
    """Whether a test.py report was written for the checkpoint at checkpoint_path (the same file,
    or a hard link to it: train.py's best checkpoint and its epoch file)."""
    written_for = Path(report.get("checkpoint", ""))
    return written_for.is_file() and os.path.samefile(written_for, checkpoint_path)


def write_card(args, checkpoint, written):
    """MODEL_CARD.md beside the first exported file; its test numbers from the checkpoint's own
    test.py report only."""
    report_path = Path(args.report) if args.report else default_report(args.checkpoint)
    report = None
    if report_path is not None:
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"--report {report_path}: cannot read the test.py report ({error})") from error
        if not report_of(report, args.checkpoint):
            if args.report:
                raise UserError(f"--report {report_path} was written for {report.get('checkpoint')}, not "
                                f"{args.checkpoint}; give this checkpoint's test.py report")
            print(f"note: {report_path} is the report of {report.get('checkpoint')}, not of this checkpoint: "
                  "the model card leaves it out")
            report, report_path = None, None
    detector_path = default_detector_path(args.checkpoint)
    detector = OODDetector.load(detector_path) if detector_path.is_file() else None
    parameters = sum(value.numel() for value in checkpoint["model"].values())
    text = model_card(checkpoint, args.checkpoint, parameters, report, report_path, detector, detector_path, written)
    card = Path(written[0]).with_name("MODEL_CARD.md")
    atomic_write(card, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {card}" + ("" if report else " (no test.py report found: no test numbers in it; --report gives one)"))
    return card


def write_onnx(model, checkpoint, out, extra):
    sidecar = out.with_suffix(".json")
    if sidecar.name == "args.json":  # a run folder's own record: never overwritten by an export
        raise UserError(f"--onnx {out}: its JSON would overwrite the run's args.json; choose another name")
    description = {**describe(checkpoint), **extra}
    export_onnx(model, description, out)
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
    parser.add_argument("--report", help="the checkpoint's test.py report for MODEL_CARD.md's test numbers "
                        "(default: <checkpoint stem>_report.json or report.json beside the checkpoint, if there)")
    parser.add_argument("--onnx", help="also (or only) write the embedding model as this ONNX file (+ its "
                        ".json), for onnxruntime without PyTorch")
    return add_debug_flag(parser)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
