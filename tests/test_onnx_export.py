"""export.py --onnx: the embedding model in onnxruntime gives PyTorch's embeddings (max abs
difference <= 1e-4, dynamic batch) and the same top-10 neighbours, prepared with numpy and Pillow
alone from the preprocessing the file carries; a deployment needs no torch."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from cxr.checkpoints import load_trained_model
from cxr.onnx_export import export_onnx, preprocessing
from cxr.presets import DEMO_DEFAULTS
from cxr.search import search
from dataset import ImageListDataset, build_transform
from model import build_model
from test_train import ckpt, phantoms, tiny_args  # noqa: F401  (the phantoms fixture)

# The deployment side, run in a process where `import torch` fails: numpy, Pillow, onnxruntime.
EMBED_WITHOUT_TORCH = r'''
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
import onnxruntime as ort
from PIL import Image

model_file, out, *paths = sys.argv[1:]
session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
prep = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
size = prep["image_size"]
mean = np.array(prep["mean"], np.float32)[:, None, None]
std = np.array(prep["std"], np.float32)[:, None, None]
batch = []
for path in paths:
    grey = Image.open(path).convert("L")  # the phantoms are 8-bit; 16-bit data: scale by bit_depth first
    resized = grey.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, np.float32).transpose(2, 0, 1) / 255.0
    batch.append((x - mean) / std)
np.save(out, session.run([prep["output"]], {prep["input"]: np.stack(batch)})[0])
'''


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("onnx_run")
    import train
    train.main(tiny_args(phantoms, folder, "--epochs", "1"))
    return ckpt(folder, "best")


def onnx_embeddings(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"images": images.numpy()})[0]


def test_demo_model_in_onnxruntime_matches_pytorch_for_any_batch(tmp_path):
    config = {k: DEMO_DEFAULTS[k] for k in ("convnext_name", "vit_name", "img_size", "embedding_dim",
                                            "fusion", "vit_stem")}
    model = build_model("hybrid_convnext_vit", **config, pretrained=False).eval()
    description = {"model_config": {"img_size": config["img_size"], "embedding_dim": config["embedding_dim"]},
                   "preprocessing": preprocessing(config, None)}
    out = export_onnx(model, description, tmp_path / "demo.onnx")
    for batch in (4, 1, 7):  # a dynamic batch
        size = config["img_size"]
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(images).numpy()
        assert np.abs(onnx_embeddings(out, images) - expected).max() <= 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["preprocessing"]["image_size"] == 64 and meta["preprocessing"]["channels"] == 3


def test_export_py_onnx_gives_pytorchs_neighbours_without_torch(trained, phantoms, tmp_path):  # noqa: F811
    out = tmp_path / "model.onnx"
    assert export.main(export.get_args_parser().parse_args([str(trained), "--onnx", str(out)])) == out
    assert not (tmp_path / "model.safetensors").exists()  # only what was asked for
    description = json.loads(out.with_suffix(".json").read_text())
    model, checkpoint, fingerprint = load_trained_model(trained, "cpu")
    assert description["fingerprint"] == fingerprint and description["classes"] == checkpoint["classes"]
    prep = description["preprocessing"]
    assert (prep["image_size"], prep["channels"], prep["bit_depth"]) == (32, 3, checkpoint.get("bit_depth"))
    assert onnx.load(str(out)).opset_import[0].version >= 17

    # PyTorch: the programs' own pipeline (dataset transform, model)
    transform = build_transform(prep["image_size"], train=False)
    gallery = ImageListDataset(phantoms / "train", phantoms / "train_split.txt", "covidx", transform=transform)
    queries = ImageListDataset(phantoms / "test", phantoms / "test_split.txt", "covidx",
                               classes=gallery.classes, transform=transform)
    with torch.inference_mode():
        torch_gallery = model(torch.stack([gallery[i][0] for i in range(len(gallery))]))
        torch_queries = model(torch.stack([queries[i][0] for i in range(len(queries))]))
    assert np.abs(onnx_embeddings(out, torch.stack([queries[i][0] for i in range(4)]))
                  - torch_queries[:4].numpy()).max() <= 1e-4

    # The deployment: files in, embeddings out, with no torch in the process
    def deployed(dataset, name):
        result = subprocess.run([sys.executable, "-c", EMBED_WITHOUT_TORCH, str(out), str(tmp_path / name),
                                 *map(str, dataset.paths)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return torch.from_numpy(np.load(tmp_path / name))
    onnx_gallery, onnx_queries = deployed(gallery, "gallery.npy"), deployed(queries, "queries.npy")
    assert (onnx_gallery - torch_gallery).abs().max() <= 1e-4
    _, torch_top = search(torch_queries, torch_gallery, 10)
    _, onnx_top = search(onnx_queries, onnx_gallery, 10)
    assert torch.equal(torch_top, onnx_top)


def test_onnx_export_errors(trained, tmp_path):
    with pytest.raises(Exception, match=r"name the file \*\.onnx"):
        export.main(export.get_args_parser().parse_args([str(trained), "--onnx", str(tmp_path / "m.pt")]))
