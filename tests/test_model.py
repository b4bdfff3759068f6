import pytest
import torch

from conftest import SMALL_MODEL
from cxr.checkpoints import load_model_weights
from model import (
    MODEL_NAMES,
    ChannelAttention,
    ConvStem,
    InputAdapter,
    MXABlock,
    PretrainedWeightsError,
    SpatialAttention,
    ViTBranch,
    build_model,
    create_backbone,
)


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
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
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


# ------------------------------------------------------------------ fusion, MXA modes, ViT stems
def small_hybrid(**options):
    return build_model("hybrid_convnext_vit", embedding_dim=16, pretrained=False, **SMALL_MODEL, **options)


def test_default_config_is_the_model_before_the_options_existed():
    """Checkpoints whose config lacks fusion / mxa / ViT options rebuild the same modules."""
    keys = set(small_hybrid().state_dict())
    explicit = small_hybrid(fusion="seed", mxa="both", vit_patch_size=None, vit_stem="patch",
                            branch_heads=False)
    assert set(explicit.state_dict()) == keys
    assert not any(k.startswith(("branch_norms", "branch_heads")) for k in keys)
    assert any(k.startswith("convnext.mxa.channel") for k in keys)
    assert any(k.startswith("convnext.mxa.spatial") for k in keys)


def test_branch_features_and_fuse_are_the_forward_pass():
    for fusion in ("seed", "norm"):
        model = small_hybrid(fusion=fusion).eval()
        images = torch.randn(3, 3, 64, 64)
        features, maps = model.branch_features(images)
        assert features["convnext"].shape == (3, 320) and features["vit"].shape == (3, 192)
        torch.testing.assert_close(model.fuse(features), model(images))
        torch.testing.assert_close(maps["vit_tokens"], model(images, return_maps=True)[1]["vit_tokens"])


def test_norm_fusion_puts_both_branches_on_one_scale():
    model = small_hybrid(fusion="norm").eval()
    features, _ = model.branch_features(torch.randn(4, 3, 64, 64))
    for branch, norm in model.branch_norms.items():
        normed = norm(features[branch])
        torch.testing.assert_close(normed.pow(2).mean(1), torch.ones(4), atol=1e-2, rtol=0)  # LayerNorm eps


@pytest.mark.parametrize("mode,has_channel,has_spatial", [("both", True, True), ("ca", True, False),
                                                           ("sa", False, True), ("none", False, False)])
def test_mxa_modes(mode, has_channel, has_spatial):
    model = build_model("convnextv2", embedding_dim=16, pretrained=False, mxa=mode, **SMALL_MODEL)
    mxa = model.branch.mxa
    assert isinstance(mxa.channel, ChannelAttention) == has_channel
    assert isinstance(mxa.spatial, SpatialAttention) == has_spatial
    x = torch.randn(2, 320, 2, 2)
    if mode == "none":
        torch.testing.assert_close(mxa(x), x)
    with pytest.raises(ValueError, match="MXA mode"):
        MXABlock(8, mode="spatial")


def test_conv_stem_and_small_patches_give_the_vit_more_tokens():
    for stem in ("patch", "conv"):
        model = small_hybrid(vit_stem=stem, vit_patch_size=8)
        _, maps = model(torch.randn(2, 3, 64, 64), return_maps=True)
        assert maps["vit_tokens"].shape == (2, 64, 192)  # (64 / 8)^2 tokens
    conv = small_hybrid(vit_stem="conv")
    assert isinstance(conv.vit.backbone.patch_embed.proj, ConvStem)
    _, maps = conv(torch.randn(2, 3, 64, 64), return_maps=True)
    assert maps["vit_tokens"].shape == (2, 16, 192)
    with pytest.raises(ValueError, match="pre-trained"):
        ViTBranch("vit_tiny_patch16_224", 64, pretrained=True, stem="conv")
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(192, 12)


def test_branch_heads_give_one_embedding_per_branch():
    model = small_hybrid(branch_heads=True)
    embedding, branches = model(torch.randn(3, 3, 64, 64), return_branch_embeddings=True)
    assert embedding.shape == (3, 16) and set(branches) == {"convnext", "vit"}
    for value in branches.values():
        torch.testing.assert_close(value.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="no per-branch heads"):
        small_hybrid()(torch.randn(2, 3, 64, 64), return_branch_embeddings=True)


def test_branch_attribution_finds_a_branch_the_head_ignores():
    """A head whose weights on the ViT part are zero: the ViT carries 0% of the similarity."""
    model = small_hybrid(fusion="seed").eval()
    with torch.no_grad():
        model.head.fuse[0].weight[:, 320:] = 0
    images = torch.randn(4, 3, 64, 64)
    features, _ = model.branch_features(images)
    means = {b: f.mean(0) for b, f in features.items()}
    targets = model(images).flip(0)
    out = model.branch_attribution(features, targets, means)
    torch.testing.assert_close(out["vit_drop"], torch.zeros(4))
    torch.testing.assert_close(out["convnext_share"], torch.ones(4))
    torch.testing.assert_close(out["similarity"], (model(images) * targets).sum(1))
    # and symmetric: zero the ConvNeXt part instead
    model = small_hybrid(fusion="seed").eval()
    with torch.no_grad():
        model.head.fuse[0].weight[:, :320] = 0
    features, _ = model.branch_features(images)
    out = model.branch_attribution(features, model(images).flip(0), {b: f.mean(0) for b, f in features.items()})
    torch.testing.assert_close(out["vit_share"], torch.ones(4))


@pytest.mark.parametrize("name,options", [
    ("hybrid_convnext_vit", {}),
    ("hybrid_convnext_vit", dict(fusion="norm", branch_heads=True, vit_stem="conv", mxa="ca")),
    ("hybrid_convnext_vit", dict(vit_patch_size=8, mxa="none")),
    ("convnextv2", dict(mxa="sa")),
    ("vit", dict(vit_stem="conv", vit_patch_size=8)),
])
def test_bare_weights_show_the_model_options(name, options):
    """test.py rebuilds a bare state dict (no config) from what its keys and shapes show."""
    from model import options_from_weights
    model = build_model(name, embedding_dim=16, pretrained=False, **SMALL_MODEL, **options)
    inferred = options_from_weights(model.state_dict())
    rebuilt = build_model(name, embedding_dim=16, pretrained=False, **SMALL_MODEL, **inferred)
    load_model_weights(rebuilt, model.state_dict(), "bare.pth")  # raises on any key or shape mismatch
    for key, value in options.items():
        assert inferred.get(key, {"fusion": "seed", "branch_heads": False, "mxa": "both",
                                  "vit_stem": "patch"}.get(key)) == value


def test_vit_attention_uses_the_fused_kernel():
    """timm's scaled-dot-product attention (one fused kernel on a GPU), not the explicit softmax."""
    model = build_model("hybrid_convnext_vit", 16, pretrained=False, **SMALL_MODEL)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)
