import pytest
import torch

from conftest import SMALL_MODEL
from model import (MODEL_NAMES, ChannelAttention, InputAdapter, MXABlock, PretrainedWeightsError,
                   SpatialAttention, build_model, create_backbone)
from utils import load_model_weights


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_unit_embeddings_and_gradients(name):
    model = build_model(name, embedding_dim=32, pretrained=False, **SMALL_MODEL)
    images = torch.randn(3, 3, 64, 64)
    embeddings, maps = model(images, return_maps=True)
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    embeddings.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert maps  # Grad-CAM inputs come out of the same forward pass


def test_hybrid_maps_and_widths_are_read_from_backbones():
    model = build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False, **SMALL_MODEL)
    _, maps = model(torch.randn(2, 3, 64, 64), return_maps=True)
    assert maps["conv_map"].shape == (2, 320, 2, 2)  # convnextv2_atto last stage, stride 32
    assert maps["vit_tokens"].shape == (2, 16, 192)  # (64/16)^2 patches, vit_tiny width
    assert model.head.fuse[0].in_features == 320 + 192


def test_maps_match_plain_forward():
    model = build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False, **SMALL_MODEL).eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(images), model(images, return_maps=True)[0])


def test_gradient_checkpointing_gives_same_gradients():
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False,
                            grad_checkpointing=checkpointing, **SMALL_MODEL)
        model.train()
        model(images).pow(2).sum().backward()
        grads.append(model.convnext.backbone.stem_0.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_channel_attention_weights_channels_and_spatial_attention_weights_positions():
    x = torch.randn(2, 32, 5, 5)
    ca, sa, mxa = ChannelAttention(32), SpatialAttention(), MXABlock(32)
    out_ca = ca(x)
    ratio = out_ca / x  # one weight per (sample, channel), shared over positions, in (0, 1)
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()
    ratio = sa(x) / x  # one weight per (sample, position), shared over channels
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    torch.testing.assert_close(mxa(x), mxa.spatial(mxa.channel(x)))
    assert ca.mlp[0].out_channels == 2  # reduction 16


def test_input_adapter_renormalises_for_branches_pretrained_with_other_statistics():
    imagenet = InputAdapter((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert imagenet.identity
    half = InputAdapter((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raw = torch.rand(1, 3, 4, 4)
    x = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(half(x), (raw - 0.5) / 0.5)


def test_unknown_model_and_bad_size_are_errors():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("convnextv2", img_size=100, pretrained=False, convnext_name="convnextv2_atto")


def test_pretrained_without_hub_or_files_fails_fast_and_says_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")
    with pytest.raises(PretrainedWeightsError, match="--no-pretrained"):
        create_backbone("convnextv2_atto.fcmae_ft_in1k", pretrained=True)


def test_pretrained_weights_load_from_local_file_and_folder(tmp_path):
    source = create_backbone("convnextv2_atto", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "convnextv2_atto.pth")
    for kwargs in (dict(weights_file=tmp_path / "convnextv2_atto.pth"), dict(weights_dir=tmp_path)):
        loaded = create_backbone("convnextv2_atto", pretrained=True, **kwargs)
        torch.testing.assert_close(loaded.stem[0].weight, source.stem[0].weight)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_backbone("convnextv2_atto", pretrained=True, weights_file=tmp_path / "missing.pth")


def test_checkpoint_that_does_not_fit_names_the_keys():
    model = build_model("vit", embedding_dim=16, pretrained=False, **SMALL_MODEL)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.proj.bias"]
    with pytest.raises(RuntimeError, match=r"missing keys: head.proj.bias.*unexpected keys: extra.weight"):
        load_model_weights(model, state, "ckpt.pth")
    other = build_model("vit", embedding_dim=8, pretrained=False, **SMALL_MODEL).state_dict()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_model_weights(model, other, "ckpt.pth")
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    load_model_weights(model, prefixed, "ckpt.pth")  # DDP-saved weights load


def test_bn_neck_centres_and_stays_unit_length():
    model = build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False, neck="bn", **SMALL_MODEL)
    assert isinstance(model.head.neck, torch.nn.BatchNorm1d) and model.head.proj.bias is None
    assert not model.head.neck.bias.requires_grad  # a learnt shift would undo the centring
    embeddings = model.train()(torch.randn(6, 3, 64, 64))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(6))
    assert "head.neck.running_mean" in model.state_dict()
    plain = build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False, **SMALL_MODEL)
    assert plain.head.neck is None and plain.head.proj.bias is not None  # the paper's head by default
    with pytest.raises(RuntimeError, match="--neck"):  # weights of one head do not load into the other
        load_model_weights(plain, model.state_dict(), "bn.pth")
    with pytest.raises(ValueError, match="unknown neck"):
        build_model("vit", embedding_dim=16, pretrained=False, neck="ln", **SMALL_MODEL)
