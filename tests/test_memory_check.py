"""Own data on a CPU: --setup small trains a 16-image folder with no other flag, and a run too
large for the machine stops with the memory estimate instead of the kernel's kill."""
import argparse
import shutil

import pytest
import torch

import train
from cxr import demo_dataset, memory_check, train_args
from cxr.errors import UserError
from model import build_model


def hybrid(img_size):
    return build_model(name="hybrid_convnext_vit", convnext_name="convnextv2_atto",
                       vit_name="vit_tiny_patch16_224", img_size=img_size, embedding_dim=16, pretrained=False,
                       fusion="norm", vit_stem="conv", neck="bn")


@pytest.fixture(scope="module")
def small_model():
    return hybrid(32)


def test_the_activation_estimate_is_per_image_and_leaves_the_model_as_it_was(small_model):
    small_model.train()
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    per_image = memory_check.saved_activation_bytes(small_model, 32, torch.device("cpu"), "none")
    assert small_model.training
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())  # BN stats too
    at_64 = memory_check.saved_activation_bytes(hybrid(64), 64, torch.device("cpu"), "none")
    assert 3.0 < at_64 / per_image < 5.0  # about the pixel count (4x)
    small = memory_check.estimate(small_model, argparse.Namespace(img_size=32, batch_size=8, amp="none"),
                                  torch.device("cpu"))
    large = memory_check.estimate(small_model, argparse.Namespace(img_size=32, batch_size=32, amp="none"),
                                  torch.device("cpu"))
    assert large["activations"] == pytest.approx(4 * small["activations"])


def test_a_run_that_does_not_fit_names_the_flags(small_model, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: (1e6, 0))
    args = argparse.Namespace(img_size=32, batch_size=8, amp="none")
    with pytest.raises(UserError, match="--setup small.*--img-size.*--no-memory-check"):
        memory_check.check(small_model, args, torch.device("cpu"), log=lambda line: None)


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """16 films in the folder layout, as a new user brings them: 8 normal, 8 pneumonia."""
    phantoms = demo_dataset.write_demo_dataset(tmp_path_factory.mktemp("src") / "p", train_per_class=8,
                                            test_per_class=0, size=64, seed=1)
    root = tmp_path_factory.mktemp("own")
    for label in ("normal", "pneumonia"):
        files = [phantoms / "train" / line.split()[1] for line in
                 (phantoms / "train_split.txt").read_text().splitlines() if line.split()[2] == label]
        for i, source in enumerate(files):
            split = "test" if i >= 6 else "train"
            (root / "data" / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / "data" / split / label / f"{label}_{i}.png")
    return root


@pytest.mark.slow
def test_setup_small_trains_a_16_image_folder_without_other_flags(own_folder, monkeypatch, capsys):
    monkeypatch.chdir(own_folder)  # the defaults: ./data, ./checkpoints
    train.main(train_args.parse_args(["--dataset", "folder", "--setup", "small", "--device", "cpu"]))
    out = capsys.readouterr().out
    assert "memory estimate:" in out
    assert list((own_folder / "checkpoints").glob("*_best_ckpt.pth"))


def test_the_paper_setup_stops_with_the_estimate_on_a_24_gb_machine(own_folder, tmp_path, monkeypatch):
    real = memory_check.available_bytes
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: (24e9, real(device)[1]))
    monkeypatch.chdir(own_folder)
    with pytest.raises(UserError, match="would need about .* GB .*--setup small"):
        train.main(train_args.parse_args(["--dataset", "folder", "--no-pretrained", "--device", "cpu",
                                     "-p", "2", "--save-dir", str(tmp_path)]))


def test_the_two_image_probe_predicts_what_a_training_batch_keeps(small_model):
    """The estimate's activations (2 images in eval mode, x batch / 2) against what autograd keeps
    for a real training forward of 16 images (train mode), counted the same way."""
    per_image = memory_check.saved_activation_bytes(small_model, 32, torch.device("cpu"), "none")
    weights = {t.untyped_storage().data_ptr() for t in [*small_model.parameters(), *small_model.buffers()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor
    small_model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = small_model(torch.randn(16, 3, 32, 32))
    del output
    assert 0.7 < per_image * 16 / sum(kept.values()) < 1.3
