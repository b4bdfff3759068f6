"""16-bit images are scaled by the training data's bit depth in every program, not by a scan of
the list at hand: a test list of a 12-bit scanner whose brightest pixel is 1000 must not come
out 4x brighter than in training."""
import shutil

import numpy as np
import torch
from PIL import Image

import explain
import retrieve
import train
from cxr import gallery_index, search, train_args
from cxr.checkpoints import data_bit_depth, load_trained_model
from cxr.images import load_image
from dataset import build_transform
from test_train import TINY, ckpt, phantoms  # noqa: F401  (the phantoms fixture)


def as_12_bit(folder, peak):
    """Rewrite every 8-bit PNG of `folder` as 16-bit data of a 12-bit scanner, the brightest
    pixel of each image at `peak` at most."""
    for path in folder.glob("*.png"):
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        Image.fromarray((grey / 255 * peak).round().astype(np.uint16)).save(path)


def test_every_program_scales_by_the_training_depth(phantoms, tmp_path):  # noqa: F811
    data = tmp_path / "demo"
    shutil.copytree(phantoms, data)
    as_12_bit(data / "train", 4095)  # the training films use the full 12 bits
    as_12_bit(data / "test", 1000)  # dim test films of the same scanner: a scan alone says 10 bits
    train.main(train_args.parse_args([*TINY, "--dataset-dir", str(data), "--save-dir", str(tmp_path / "run"),
                                 "--train-image-list", str(data / "train_split.txt"),
                                 "--test-image-list", str(data / "test_split.txt"), "--epochs", "1",
                                 "--val-fraction", "0"]))
    checkpoint_path = ckpt(tmp_path / "run", "best")
    model, checkpoint, _ = load_trained_model(checkpoint_path, torch.device("cpu"))
    assert data_bit_depth(checkpoint) == 12
    image = data / "test" / "phantom_test_00000.png"
    transform = build_transform(checkpoint["model_config"]["img_size"], train=False)
    with torch.inference_mode():
        expected = model(transform(load_image(image, 12))[None]).numpy()[0]
        too_bright = model(transform(load_image(image, 10))[None]).numpy()[0]
    assert not np.allclose(expected, too_bright, atol=1e-3)  # the depth matters for this image

    import test as evaluate_cli
    evaluate_cli.main(evaluate_cli.get_args_parser().parse_args([
        "--resume", str(checkpoint_path), "--test-dataset-dir", str(data / "test"), "--test-image-list",
        str(data / "test_split.txt"), "--workers", "0", "--device", "cpu", "--save-embeddings",
        str(tmp_path / "e.npz"), "--report", str(tmp_path / "r.json"), "--allow-patient-overlap"]))
    np.testing.assert_allclose(np.load(tmp_path / "e.npz")["query_embeddings"][0], expected, atol=1e-5)

    retrieve.main(["index", "--resume", str(checkpoint_path), "--image-list", str(data / "train_split.txt"),
                   "--dataset-dir", str(data / "train"), "--out", str(tmp_path / "idx"), "--workers", "0",
                   "--device", "cpu"])
    embeddings, _ = retrieve.embed_images(model, [image], checkpoint["model_config"]["img_size"],
                                          torch.device("cpu"), False, bit_depth=data_bit_depth(checkpoint))
    np.testing.assert_allclose(embeddings[0].numpy(), expected, atol=1e-5)
    record = explain.main(explain.get_args_parser().parse_args([
        "--resume", str(checkpoint_path), "--image", str(image), "--out", str(tmp_path / "x"),
        "--gallery-image-list", str(data / "train_split.txt"), "--gallery-dataset-dir", str(data / "train"),
        "--device", "cpu", "--workers", "0", "--faithfulness-steps", "0", "--topk", "3"]))
    # explain.py embeds the query and its gallery at the training depth too
    direct = search.search(torch.from_numpy(expected)[None], gallery_index.load_index(tmp_path / "idx")[1], 3)[0]
    np.testing.assert_allclose([n["similarity"] for n in record["neighbours"]], direct[0].numpy(), atol=1e-4)
