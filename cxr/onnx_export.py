"""The embedding model as an ONNX file, for deployments that run ONNX Runtime (a PACS-side
service, a hospital cluster) and have no PyTorch: one input `images` (N, 3, S, S) float32, any
batch size, one output `embeddings` (N, D), L2-normalised like the PyTorch model's.

What the model expects of its input is written into the file's metadata (`preprocessing`, as
JSON) and into the JSON description beside it, so a deployment can prepare a film without this
repository (PREPROCESSING's words are cxr/images.load_image's and dataset.build_transform's): decode
it to 8 bits, as three equal channels, resize the whole film to `image_size` x `image_size`
(bicubic; never a centre crop), scale to [0, 1], then subtract `mean` and divide by `std` per
channel. tests/test_onnx_export.py does that for 8-bit PNGs with numpy, Pillow and onnxruntime
alone, in a process where torch cannot be imported.

Written with torch.onnx's TorchScript exporter (`dynamo=False`): the dynamo exporter needs
onnxscript, one more package for the same graph.
"""
import json
import os
import warnings
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cxr.atomic_files import atomic_write
from cxr.errors import UserError

OPSET = 18
INPUT, OUTPUT = "images", "embeddings"
# What cxr/images.load_image and dataset.build_transform do at evaluation time, in words a
# deployment can follow.
DECODE = ("8-bit grey: as it is. 16-bit grey (PNG, TIFF): minus its minimum when negative, divided by "
          "2^bit_depth - 1 (when bit_depth is null: by 2^b - 1 for the smallest b of 8, 10, 12, 14, 16 that "
          "holds the film's maximum), times 255, clipped. DICOM (monochrome): the modality LUT, then the first VOI "
          "LUT or window, scaled linearly from the window's output range (without one: the film's min to max) to "
          "0-255, MONOCHROME1 inverted. Colour images: their RGB channels as they are")
RESIZE = "bicubic, the whole film to image_size x image_size (no crop)"


def import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise UserError("ONNX export needs the onnx package: pip install onnx onnxruntime") from error
    return onnx


def preprocessing(model_config, bit_depth):
    """The input the exported model expects, as a JSON-able dict."""
    return {"input": INPUT, "output": OUTPUT, "layout": "NCHW", "dtype": "float32", "channels": 3,
            "decode": DECODE, "grey_to_rgb": "the grey channel repeated three times",
            "image_size": model_config["img_size"], "resize": RESIZE, "bit_depth": bit_depth,
            "scale": "8-bit values / 255, so [0, 1]",
            "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
            "embedding_dim": model_config["embedding_dim"], "normalised": True, "similarity": "dot product"}


def export_onnx(model, description, out):
    """Write `model` (eval mode, CPU) to `out` (.onnx) with `description` (JSON-able: the model
    config, classes, bit depth, preprocessing, ...) in its metadata; atomically. Returns out."""
    onnx = import_onnx()
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--onnx {out}: name the file *.onnx")
    size = description["preprocessing"]["image_size"]
    example = torch.zeros(2, 3, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export{os.getpid()}")
    model = model.eval()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        graph = onnx.load(str(tmp))
    finally:
        if tmp.exists():
            tmp.unlink()
    for key, value in description.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    graph.producer_name = "hybrid-convnext-vit-retrieval export.py"
    blob = graph.SerializeToString()
    atomic_write(out, lambda f: f.write(blob))
    return out
