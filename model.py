"""Embedding models: the hybrid ConvNeXtV2 + ViT network of the paper and single-backbone baselines.

Every model maps a batch of images (B, 3, H, W), normalised with ImageNet mean/std, to
L2-normalised embeddings (B, embedding_dim). Build them through one factory:

    model = build_model("hybrid_convnext_vit", embedding_dim=1024, img_size=384, pretrained=False)
    emb = model(images)                            # (B, 1024), unit norm
    emb, maps = model(images, return_maps=True)    # plus the maps Grad-CAM needs

Backbones come from timm; their feature widths are read from the backbones, so the small timm
variants used by the tests and the demo (convnextv2_atto, vit_tiny_patch16_224) work unchanged.
"""
import os
import socket
import urllib.parse
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAMES = ("hybrid_convnext_vit", "convnextv2", "vit", "resnet50", "densenet121")
NECKS = ("none", "bn")
# How the hybrid joins its branches: "seed" concatenates the raw pooled vectors (the paper's
# head, whose branch balance is an accident of their scales); "norm" puts each branch's vector
# through its own LayerNorm first, so both enter the head at the same scale.
FUSIONS = ("seed", "norm")
MXA_MODES = ("both", "ca", "sa", "none")  # the MXA block's channel / spatial attention, for ablations
VIT_STEMS = ("patch", "conv")

DEFAULT_CONVNEXT = "convnextv2_base.fcmae_ft_in22k_in1k_384"
DEFAULT_VIT = "vit_base_patch16_384.augreg_in21k_ft_in1k"  # ImageNet-21k pre-training
DEFAULT_IMG_SIZE = 384
DEFAULT_EMBEDDING_DIM = 1024

# The data pipeline normalises every image with these; branches pre-trained with other
# statistics (the AugReg ViTs use 0.5/0.5) re-normalise internally, see InputAdapter.
IMAGENET_MEAN = timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = timm.data.IMAGENET_DEFAULT_STD
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class PretrainedWeightsError(RuntimeError):
    """Pre-trained weights were asked for but cannot be found or downloaded."""


# --------------------------------------------------------------------------------------------
# Attention blocks
# --------------------------------------------------------------------------------------------
class ChannelAttention(nn.Module):
    """Channel attention (CBAM style): a shared MLP over the avg- and max-pooled map."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x):  # x: (B, C, H, W)
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)  # (B, C, 1, 1) weights broadcast over H, W


class SpatialAttention(nn.Module):
    """Spatial attention: a 7x7 conv over the channel-mean and channel-max maps."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):  # x: (B, C, H, W)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))  # (B, 1, H, W) weights broadcast over C


class MXABlock(nn.Module):
    """The paper's MXA block: channel attention, then spatial attention. `mode` keeps both
    ("both"), one ("ca", "sa") or neither ("none": the identity), to measure what each adds."""

    def __init__(self, channels, reduction=16, kernel_size=7, mode="both"):
        super().__init__()
        if mode not in MXA_MODES:
            raise ValueError(f"unknown MXA mode '{mode}'; choose one of {', '.join(MXA_MODES)}")
        self.channel = ChannelAttention(channels, reduction) if mode in ("both", "ca") else nn.Identity()
        self.spatial = SpatialAttention(kernel_size) if mode in ("both", "sa") else nn.Identity()

    def forward(self, x):
        return self.spatial(self.channel(x))


# --------------------------------------------------------------------------------------------
# Pre-trained weights
# --------------------------------------------------------------------------------------------
def _hub_reachable(timeout=3.0):
    """One TCP connect to the Hugging Face endpoint; timm would otherwise retry for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(pretrained_cfg):
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename)
        if isinstance(hit, str):
            return True
    return False


def find_weights_file(timm_name, weights_dir):
    """Find `<weights_dir>/<timm name>.<suffix>`, with or without the pretrained tag."""
    candidates = [timm_name, timm_name.split(".")[0]]
    for stem in candidates:
        for suffix in WEIGHT_SUFFIXES:
            path = Path(weights_dir) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def create_backbone(timm_name, pretrained=False, weights_file=None, weights_dir=None, **kwargs):
    """timm.create_model with an explicit, fast-failing story for pre-trained weights.

    Order: an explicit weights file, then a file named after the model in weights_dir, then
    timm's hub cache, then the hub itself. With none available, raise at once rather than fall
    back to random weights (a silently random backbone wastes a whole training run).
    """
    if not pretrained:
        if weights_file:
            raise ValueError(f"a weights file was given for {timm_name} ({weights_file}) "
                             "but pretrained weights are disabled; drop --no-pretrained")
        return timm.create_model(timm_name, pretrained=False, **kwargs)

    if weights_file is None and weights_dir is not None:
        weights_file = find_weights_file(timm_name, weights_dir)
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise PretrainedWeightsError(f"weights file for {timm_name} not found: {weights_file}")
        return timm.create_model(timm_name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(weights_file)), **kwargs)

    problem = missing_weights([timm_name], weights_dir)
    if problem:
        raise PretrainedWeightsError(problem)
    return timm.create_model(timm_name, pretrained=True, **kwargs)


def missing_weights(timm_names, weights_dir=None, weights_files=None):
    """None when pre-trained weights for every backbone can be had (a given file, a file in
    weights_dir, timm's hub cache, or the hub), else one message naming every missing one and
    how to supply them, so a user fixes all of them at once."""
    weights_files = weights_files or {}
    missing, hub_ids = [], []
    for name in timm_names:
        given = weights_files.get(name)
        if given is not None:
            if not Path(given).is_file():
                missing.append(f"'{name}': the weights file {given} does not exist")
            continue
        if weights_dir is not None and find_weights_file(name, weights_dir) is not None:
            continue
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            missing.append(f"'{name}': timm has no pretrained weights for it")
        elif not _hub_cached(cfg.to_dict()):
            hub_ids.append((name, cfg.hf_hub_id))
    if hub_ids and not _hub_reachable():
        for name, hub_id in hub_ids:
            where = (f"no {name}.safetensors (or .pth) in {weights_dir}, "
                     if weights_dir is not None else "")
            missing.append(f"'{name}': {where}not in the Hugging Face cache, and the hub "
                           f"({hub_id}) cannot be reached")
    if not missing:
        return None
    listed = "\n".join(f"  - {m}" for m in missing)
    first = missing[0].split("'")[1]  # the first missing backbone's name, for the example
    return (f"pretrained weights are missing for {len(missing)} backbone(s):\n{listed}\nEither\n"
            f"  - download them on a machine with internet (timm.create_model('{first}', "
            f"pretrained=True) fills ~/.cache/huggingface; copy that folder over), or\n"
            f"  - save each as <DIR>/<timm name>.safetensors (or .pth) and pass --weights-dir DIR "
            f"(or --convnext-weights / --vit-weights FILE), or\n"
            f"  - train from scratch with --no-pretrained.")


class InputAdapter(nn.Module):
    """Maps ImageNet-normalised input to the normalisation a backbone was pre-trained with."""

    def __init__(self, mean, std):
        super().__init__()
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        # x_raw = x * in_std + in_mean;  x_new = (x_raw - mean) / std  ==  x * scale + shift
        self.identity = bool(torch.allclose(mean, in_mean) and torch.allclose(std, in_std))
        self.register_buffer("scale", (in_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x if self.identity else x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _adapter_for(backbone):
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return InputAdapter(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


# --------------------------------------------------------------------------------------------
# Branches: each returns (pooled features, map for Grad-CAM)
# --------------------------------------------------------------------------------------------
class ConvNeXtBranch(nn.Module):
    """ConvNeXtV2 last stage -> MXA -> global average pool."""

    def __init__(self, timm_name, pretrained=False, weights_file=None, weights_dir=None, mxa="both"):
        super().__init__()
        self.backbone = create_backbone(timm_name, pretrained, weights_file, weights_dir,
                                        features_only=True, out_indices=(-1,))
        self.adapter = _adapter_for(self.backbone)
        self.out_dim = self.backbone.feature_info.channels()[-1]
        self.mxa = MXABlock(self.out_dim, mode=mxa)

    def forward(self, x):
        fmap = self.mxa(self.backbone(self.adapter(x))[-1])  # (B, C, H/32, W/32)
        return fmap.mean(dim=(2, 3)), fmap


class ConvStem(nn.Module):
    """Xiao et al. (2021), "Early convolutions help transformers see better": 3x3 stride-2
    convolutions (BatchNorm, ReLU) down to the patch stride, then a 1x1 projection to the token
    width, in place of the ViT's single strided "patchify" convolution. From random weights on
    small data it is what lets the ViT learn: the stem supplies the local inductive bias that
    a linear patch embedding lacks."""

    def __init__(self, embed_dim, stride):
        super().__init__()
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"a convolutional stem needs a power-of-two patch size, got {stride}")
        layers, width, channels = [], embed_dim // 2 ** (stride.bit_length() - 2), 3
        for _ in range(stride.bit_length() - 1):  # log2(stride) halvings, width doubling
            width = max(width, 16)
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels, width = width, width * 2
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x):
        return self.stem(x)


class ViTBranch(nn.Module):
    """Vision Transformer; the CLS token is the image feature, patch tokens feed Grad-CAM.

    patch_size: None keeps the timm model's; a smaller one gives a small input more tokens
    (a 64 px image is 4 x 4 patches of 16). stem="conv" replaces the patch embedding by a
    ConvStem of the same stride (training from scratch only: it has no pre-trained weights).
    """

    def __init__(self, timm_name, img_size, pretrained=False, weights_file=None, weights_dir=None,
                 patch_size=None, stem="patch"):
        super().__init__()
        if stem not in VIT_STEMS:
            raise ValueError(f"unknown ViT stem '{stem}'; choose one of {', '.join(VIT_STEMS)}")
        if stem == "conv" and pretrained:
            raise ValueError("--vit-stem conv has no pre-trained weights; use it with --no-pretrained")
        extra = {} if patch_size is None else {"patch_size": patch_size}
        self.backbone = create_backbone(timm_name, pretrained, weights_file, weights_dir,
                                        num_classes=0, img_size=img_size, **extra)
        self.adapter = _adapter_for(self.backbone)
        self.out_dim = self.backbone.num_features
        if stem == "conv":
            embed = self.backbone.patch_embed
            embed.proj = ConvStem(embed.proj.out_channels, embed.proj.stride[0])

    def forward(self, x):
        tokens = self.backbone.forward_features(self.adapter(x))  # (B, prefix + N, C)
        cls = self.backbone.forward_head(tokens, pre_logits=True)  # (B, C)
        return cls, tokens[:, self.backbone.num_prefix_tokens:]  # patch tokens (B, N, C)


class PooledBranch(nn.Module):
    """Any timm classifier with its head removed (ResNet-50, DenseNet-121 baselines)."""

    def __init__(self, timm_name, pretrained=False, weights_file=None, weights_dir=None):
        super().__init__()
        self.backbone = create_backbone(timm_name, pretrained, weights_file, weights_dir,
                                        num_classes=0, global_pool="")
        self.adapter = _adapter_for(self.backbone)
        self.out_dim = self.backbone.num_features

    def forward(self, x):
        fmap = self.backbone.forward_features(self.adapter(x))  # (B, C, h, w)
        return fmap.mean(dim=(2, 3)), fmap


class EmbeddingHead(nn.Module):
    """Fusion head: Linear -> LayerNorm -> ReLU -> Linear [-> BN neck], then L2 normalisation.

    neck="bn" (Luo et al., 2019, "Bag of tricks and a strong baseline for deep person re-ID"):
    a BatchNorm1d with a frozen zero shift before the normalisation centres the embeddings
    around the origin, so their directions spread over the sphere instead of sharing one cone;
    from random weights this is what keeps a triplet loss from collapsing. neck="none" is the
    paper's head.
    """

    def __init__(self, in_dim, embedding_dim, neck="none"):
        super().__init__()
        if neck not in NECKS:
            raise ValueError(f"unknown neck '{neck}'; choose one of {', '.join(NECKS)}")
        self.fuse = nn.Sequential(
            nn.Linear(in_dim, embedding_dim),
            nn.LayerNorm(embedding_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Linear(embedding_dim, embedding_dim, bias=neck == "none")
        self.neck = None
        if neck == "bn":
            self.neck = nn.BatchNorm1d(embedding_dim)
            self.neck.bias.requires_grad_(False)  # a learnt shift would undo the centring

    def forward(self, features):
        z = self.proj(self.fuse(features))  # (B, embedding_dim)
        if self.neck is not None:
            z = self.neck(z.float())
        # Normalise in fp32: under autocast a bf16 norm would leave embeddings visibly off unit length.
        return F.normalize(z.float(), dim=1)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class HybridConvNeXtViT(nn.Module):
    """ConvNeXtV2 + MXA and ViT CLS token, concatenated and fused into one embedding.

    The fusion is exposed in two steps, so that attribution and explanations use the model's
    own code: `branch_features(x)` gives each branch's pooled vector (and its map), `fuse(...)`
    turns the pooled vectors into the embedding.

    branch_heads: each branch also gets its own embedding head, trained with the same loss
    (see train.py's --branch-loss-weight), so that neither branch can leave the work to the
    other; retrieval never uses these heads.
    """

    BRANCHES = ("convnext", "vit")

    def __init__(self, convnext_name=DEFAULT_CONVNEXT, vit_name=DEFAULT_VIT,
                 img_size=DEFAULT_IMG_SIZE, embedding_dim=DEFAULT_EMBEDDING_DIM,
                 pretrained=True, weights_dir=None, convnext_weights=None, vit_weights=None,
                 neck="none", fusion="seed", mxa="both", vit_patch_size=None, vit_stem="patch",
                 branch_heads=False):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}'; choose one of {', '.join(FUSIONS)}")
        self.convnext = ConvNeXtBranch(convnext_name, pretrained, convnext_weights, weights_dir, mxa)
        self.vit = ViTBranch(vit_name, img_size, pretrained, vit_weights, weights_dir,
                             vit_patch_size, vit_stem)
        dims = {"convnext": self.convnext.out_dim, "vit": self.vit.out_dim}
        self.branch_norms = None
        if fusion == "norm":
            self.branch_norms = nn.ModuleDict({b: nn.LayerNorm(d) for b, d in dims.items()})
        self.head = EmbeddingHead(sum(dims.values()), embedding_dim, neck)
        self.branch_heads = None
        if branch_heads:
            self.branch_heads = nn.ModuleDict({b: EmbeddingHead(d, embedding_dim, neck)
                                               for b, d in dims.items()})

    def backbone_modules(self):
        return [self.convnext.backbone, self.vit.backbone]

    def branch_features(self, x):
        """({"convnext": (B, C1), "vit": (B, C2)} pooled features, {"conv_map", "vit_tokens"})."""
        conv_feat, conv_map = self.convnext(x)  # (B, 1024), (B, 1024, H/32, W/32) for Base
        vit_feat, vit_tokens = self.vit(x)  # (B, 768), (B, N, 768) for B/16
        return {"convnext": conv_feat, "vit": vit_feat}, {"conv_map": conv_map, "vit_tokens": vit_tokens}

    def fuse(self, features):
        """The embedding (B, embedding_dim) from the pooled features of both branches."""
        parts = [features[b] for b in self.BRANCHES]
        if self.branch_norms is not None:
            parts = [self.branch_norms[b](p) for b, p in zip(self.BRANCHES, parts)]
        return self.head(torch.cat(parts, dim=1))

    @torch.no_grad()
    def branch_attribution(self, features, targets, branch_means):
        """How much of the similarity to each target each branch carries.

        features: {branch: (B, C)} pooled features of the queries; targets: (B, D) embeddings
        they are compared with (a neighbour, a class prototype); branch_means: {branch: (C,)},
        the gallery mean of each branch's features. A branch's drop is the fall in cosine
        similarity when its features are replaced by their mean (the other branch kept); its
        share is |drop| / (|drop_convnext| + |drop_vit|), NaN where both drops are 0.
        Returns {"similarity", "convnext_drop", "vit_drop", "convnext_share", "vit_share"}, (B,) each.
        """
        targets = F.normalize(targets.float(), dim=1)
        features = {b: features[b].float() for b in self.BRANCHES}

        def similarity(parts):
            with torch.autocast(targets.device.type, enabled=False):  # fp32 head: drops are small
                return (self.fuse(parts).float() * targets).sum(1)

        full = similarity(features)
        out = {"similarity": full}
        for b in self.BRANCHES:
            out[f"{b}_drop"] = full - similarity({**features, b: branch_means[b].float().expand_as(features[b])})
        total = sum(out[f"{b}_drop"].abs() for b in self.BRANCHES)
        for b in self.BRANCHES:
            out[f"{b}_share"] = out[f"{b}_drop"].abs() / total  # NaN when total == 0
        return out

    def forward(self, x, return_maps=False, return_branch_embeddings=False):
        features, maps = self.branch_features(x)
        emb = self.fuse(features)
        if return_branch_embeddings:  # training with per-branch losses
            if self.branch_heads is None:
                raise ValueError("this model has no per-branch heads (branch_heads=False)")
            return emb, {b: self.branch_heads[b](features[b]) for b in self.BRANCHES}
        if return_maps:
            return emb, maps
        return emb


class SingleBackboneModel(nn.Module):
    """Baseline: one branch and the same fusion head, so only the backbone differs."""

    def __init__(self, branch, embedding_dim, neck="none"):
        super().__init__()
        self.branch = branch
        self.head = EmbeddingHead(branch.out_dim, embedding_dim, neck)

    def backbone_modules(self):
        return [self.branch.backbone]

    def forward(self, x, return_maps=False):
        feat, fmap = self.branch(x)
        emb = self.head(feat)
        if return_maps:
            key = "vit_tokens" if isinstance(self.branch, ViTBranch) else "conv_map"
            return emb, {key: fmap}
        return emb


def check_pretrained(name, convnext_name=DEFAULT_CONVNEXT, vit_name=DEFAULT_VIT, weights_dir=None,
                     convnext_weights=None, vit_weights=None):
    """Raise PretrainedWeightsError naming every backbone of model `name` whose pre-trained
    weights cannot be had, before anything is built (train.py calls it before reading data)."""
    names = {"hybrid_convnext_vit": [convnext_name, vit_name], "convnextv2": [convnext_name],
             "vit": [vit_name]}.get(name, [name])
    problem = missing_weights(names, weights_dir, {convnext_name: convnext_weights, vit_name: vit_weights})
    if problem:
        raise PretrainedWeightsError(problem)


def options_from_weights(state_dict):
    """The build_model options that a bare state dict (no model config) shows in its keys and
    shapes: fusion, branch heads, MXA mode, ViT stem and patch size. Keys of the seed's
    weights show none of them, which gives build_model's defaults (the paper's model)."""
    keys = [str(k) for k in state_dict]
    options = {}
    if any(k.startswith("branch_norms.") for k in keys):
        options["fusion"] = "norm"
    if any(k.startswith("branch_heads.") for k in keys):
        options["branch_heads"] = True
    mxa = [k for k in keys if ".mxa." in k or k.startswith("mxa.")]
    if mxa:
        channel, spatial = any(".channel." in k for k in mxa), any(".spatial." in k for k in mxa)
        options["mxa"] = {(True, True): "both", (True, False): "ca", (False, True): "sa"}[(channel, spatial)]
    elif any(".stages." in k or ".stages_" in k for k in keys):  # a ConvNeXt without MXA
        options["mxa"] = "none"
    stem = sorted(k for k in keys if "patch_embed.proj.stem." in k and k.endswith(".weight")
                  and state_dict[k].ndim == 4 and state_dict[k].shape[-1] == 3)
    proj = [k for k in keys if k.endswith("patch_embed.proj.weight")]
    if stem:
        options["vit_stem"] = "conv"
        options["vit_patch_size"] = 2 ** len(stem)  # one 3x3 stride-2 convolution per halving
    elif proj:
        options["vit_patch_size"] = int(state_dict[proj[0]].shape[-1])
    return options


def build_model(name, embedding_dim=DEFAULT_EMBEDDING_DIM, img_size=DEFAULT_IMG_SIZE,
                convnext_name=DEFAULT_CONVNEXT, vit_name=DEFAULT_VIT, pretrained=True,
                weights_dir=None, convnext_weights=None, vit_weights=None,
                grad_checkpointing=False, neck="none", fusion="seed", mxa="both",
                vit_patch_size=None, vit_stem="patch", branch_heads=False):
    """The one factory. `name` is one of MODEL_NAMES; the rest is the model config.
    `neck` is the head's BN neck ("bn") or the paper's plain head ("none"). `fusion`, `mxa`,
    `vit_patch_size`, `vit_stem` and `branch_heads` are described at their classes. Every
    default is the model as it was before the option existed, so older checkpoints (whose
    config lacks the key) rebuild unchanged; train.py passes its own defaults explicitly.

    `convnextv2` is the ConvNeXt branch with MXA (the hybrid without its ViT); `vit` the ViT
    branch alone; `resnet50` and `densenet121` use timm's ImageNet models.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    if img_size % 32:
        raise ValueError(f"--img-size {img_size} must be a multiple of 32 (ConvNeXt stride)")
    weights = dict(pretrained=pretrained, weights_dir=weights_dir)
    if pretrained:
        check_pretrained(name, convnext_name, vit_name, weights_dir, convnext_weights, vit_weights)
    if name == "hybrid_convnext_vit":
        model = HybridConvNeXtViT(convnext_name, vit_name, img_size, embedding_dim,
                                  convnext_weights=convnext_weights, vit_weights=vit_weights,
                                  neck=neck, fusion=fusion, mxa=mxa, vit_patch_size=vit_patch_size,
                                  vit_stem=vit_stem, branch_heads=branch_heads, **weights)
    elif name == "convnextv2":
        branch = ConvNeXtBranch(convnext_name, pretrained, convnext_weights, weights_dir, mxa)
        model = SingleBackboneModel(branch, embedding_dim, neck)
    elif name == "vit":
        branch = ViTBranch(vit_name, img_size, pretrained, vit_weights, weights_dir,
                           vit_patch_size, vit_stem)
        model = SingleBackboneModel(branch, embedding_dim, neck)
    else:
        model = SingleBackboneModel(PooledBranch(name, pretrained, None, weights_dir), embedding_dim, neck)
    for backbone in model.backbone_modules():
        backbone.set_grad_checkpointing(grad_checkpointing)
    return model

