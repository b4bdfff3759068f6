"""Grad-CAM for retrieval: which pixels make a query similar to a chosen embedding.

    cam = RetrievalGradCAM(model)                     # layers: defaults per model type
    maps = cam(images, targets)                       # targets: (B, D) embeddings
    maps["convnext"], maps["vit"], maps["fused"]      # (B, H, W) in [0, 1], image resolution

The score is the cosine similarity between the query's embedding and its target (a retrieved
neighbour, or a class's mean gallery embedding); one forward and one backward pass give the
activations A and gradients dS/dA of the chosen layers. Three ways to turn them into a map, and
one map of the input pixels:

- "gradnorm" (the class's default; retrieve.py --explain uses it): the norm over channels of dS/dA
  at each location: how strongly the similarity depends on the features there.
- "gradcam": Selvaraju et al. (2017): channels weighted by their spatially averaged gradient,
  summed, rectified.
- "hirescam": Draelos & Carin (2020): element-wise gradient x activation, summed, rectified.
- "gradient": the input gradient (Simonyan et al., 2014, who take the largest |dS/dx| over the
  colour channels; here the channels are summed, as for "ig", and they are copies of one grey
  value for a radiograph): |dS/dx| summed over channels,
  Gaussian-smoothed by `smooth` input pixels; one pass, no reference image, so unlike "ig" it
  is not multiplied by the image's difference from a reference, which a model with random
  weights also points with (the sanity check, HYBRID_MODEL_GUIDE.md). It becomes "fused" too.
- "ig": integrated gradients (Sundararajan et al., 2017) on the input pixels, from a reference
  image (`baseline`: explain.py gives the mean image of the reference class, "normal"): the
  score's change from the reference to this image, shared out over the pixels that changed,
  positive part, summed over channels, Gaussian-smoothed by `smooth` input pixels. It is one
  map of the whole model (both branches through the fusion head): it becomes "fused"; the
  branch maps stay gradnorm maps of their layers, from the same target.

Which one explain.py uses by default was chosen on validation phantoms (saliency_selection.py;
HYBRID_MODEL_GUIDE.md, Explanations): "ig" from the mean normal image towards the contrast
"predicted class minus normal" finds the lesion of the image at hand, where the layer maps point
where a finding usually lies. A layer map answers "where do the features matter", which on these
phantoms is the lung fields; integrated gradients from a normal reference answer "which pixels,
differing from a normal chest, make this image look like its finding".

Written by hand (about sixty lines) instead of using pytorch-grad-cam: the target is a
similarity between two embeddings rather than a class logit, the hybrid needs two layers of
different shapes (a ConvNeXt feature map and ViT tokens) from one forward and one backward pass,
and the ViT layer has to drop its prefix tokens before being laid out on the patch grid.

Layers (`layers=` overrides; names of `model.named_modules()`):
- ConvNeXt branch: the output of an earlier stage (`convnext_stage`, stride 4 * 2**stage; the
  first, stride 4, by default: the last stage's stride-32 map is 2 x 2 at the demo's 64 px, too
  coarse to point with). The MXA block after the last stage stays on the score's path.
- ViT branch: the input of the last block's attention (`blocks[-1].norm1`). The last block's
  output patch tokens cannot be used: the CLS token, the branch's feature, no longer reads them,
  so their gradient is zero.
- ResNet-50 / DenseNet-121 baselines: their stride-16 stage (`layer3`, `features.denseblock3`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxr.embeddings import has_branches
from cxr.images import load_image


@dataclass(frozen=True)
class Method:
    """What a saliency method is, as explain.py and the figures need to know it."""
    title: str
    input_space: bool  # a map of the input pixels through the whole model (it becomes "fused"),
    #                    not a layer map per branch; --ig-steps and --smooth apply to it
    needs_reference: bool  # integrates from a reference image (the `baseline` of RetrievalGradCAM)


METHODS = {
    "gradnorm": Method("gradient norm", input_space=False, needs_reference=False),
    "gradcam": Method("Grad-CAM", input_space=False, needs_reference=False),
    "hirescam": Method("HiResCAM", input_space=False, needs_reference=False),
    "gradient": Method("input gradient", input_space=True, needs_reference=False),
    "ig": Method("integrated gradients", input_space=True, needs_reference=True),
}

# Candidate layers per branch, first match wins: the hybrid's branches, or a baseline's one.
CANDIDATES = {
    "convnext": ("convnext.backbone.stages_2", "branch.backbone.stages_2"),
    "vit": ("vit.backbone.blocks", "branch.backbone.blocks"),  # + ".<last>.norm1"
    "cnn": ("branch.backbone.layer3", "branch.backbone.features.denseblock3"),
}


def default_layers(model, convnext_stage=0):
    """{branch name: module name} of the layers Grad-CAM reads in `model`."""
    names = dict(model.named_modules())
    layers = {}
    for branch, options in CANDIDATES.items():
        found = next((name for name in options if name in names), None)
        if found and branch == "vit":
            found = f"{found}.{len(names[found]) - 1}.norm1"
        elif found and branch == "convnext":
            found = found.replace("stages_2", f"stages_{convnext_stage}")
        if found:
            layers[branch] = found
    if not layers:
        raise ValueError("no Grad-CAM layer found in this model; pass layers={'name': 'module.path'}")
    return layers


class RetrievalGradCAM:
    def __init__(self, model, layers=None, vit_prefix_tokens=None, method="gradnorm", baseline=None,
                 steps=8, smooth=1.0):
        if method not in METHODS:
            raise ValueError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
        if METHODS[method].needs_reference and baseline is None:
            raise ValueError(f"method '{method}' needs a baseline image (3, H, W): the reference it integrates from")
        self.model = model
        self.method = method
        self.baseline, self.steps, self.smooth = baseline, steps, smooth
        self.layers = layers or default_layers(model)
        modules = dict(model.named_modules())
        missing = [name for name in self.layers.values() if name not in modules]
        if missing:
            raise ValueError(f"no module named {', '.join(missing)} in the model")
        self.modules = {branch: modules[name] for branch, name in self.layers.items()}
        vit = getattr(model, "vit", None) or getattr(model, "branch", None)
        self.prefix = vit_prefix_tokens if vit_prefix_tokens is not None else \
            getattr(getattr(vit, "backbone", None), "num_prefix_tokens", 1)

    def __call__(self, images, targets, amp_dtype=None, branch_weights=None):
        """Maps of `images` (B, 3, H, W) for the similarity to `targets` (B, D); returns
        {branch: (B, H, W)} plus "fused", each in [0, 1] per image, and "similarity" (B,).
        fused = with method "ig" the integrated-gradients map of the whole model
        (`branch_weights` unused); otherwise the branches' maps weighted by `branch_weights`
        ({branch: (B,)}, e.g. each branch's share of the similarity), equal weights by default."""
        activations = {}

        def keep(branch):
            def hook(_module, _inputs, output):
                activations[branch] = output
            return hook

        handles = [m.register_forward_hook(keep(b)) for b, m in self.modules.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad(), torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16,
                                                     enabled=amp_dtype is not None):
                images = images.detach().requires_grad_(True)  # hooks need a graph even if frozen
                embeddings = self.model(images).float()
                similarity = (embeddings * F.normalize(targets.float().to(embeddings.device), dim=1)).sum(1)
                # Gradients of the hooked layers only: no parameter's .grad is written.
                names = list(activations)
                grads = torch.autograd.grad(similarity.sum(), [activations[b] for b in names] + [images])
                gradients = dict(zip(names, grads[:-1]))
                input_gradient = grads[-1]
            for handle in handles:  # before the integration's passes, which would overwrite them
                handle.remove()
            handles = []
            attribution = None
            if self.method == "gradient":  # magnitude: a pixel matters whichever way it moves S
                attribution = input_gradient.detach().float().abs()
            elif self.method == "ig":  # the model still in eval mode
                attribution = integrated_gradients(self.model, images.detach(), targets, self.baseline,
                                                   self.steps, amp_dtype)
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        size = images.shape[-2:]
        maps = {branch: self._cam(activations[branch], gradients[branch], size) for branch in self.modules}
        if attribution is not None:  # positive part, summed over channels, smoothed
            maps["fused"] = _unit(gaussian_smooth(attribution.sum(1, keepdim=True).clamp_min(0), self.smooth)[:, 0])
        else:
            weights = torch.stack([torch.as_tensor(branch_weights[b], dtype=torch.float32, device=images.device)
                                   if branch_weights else torch.ones(len(images), device=images.device)
                                   for b in maps])  # (branches, B)
            weights = weights / weights.sum(0).clamp_min(1e-12)
            maps["fused"] = _unit((weights[:, :, None, None] * torch.stack(list(maps.values()))).sum(0))
        maps["similarity"] = similarity.detach()
        return maps

    def _cam(self, activation, gradient, size):
        values, grads = activation.detach().float(), gradient.float()
        if values.dim() == 3:  # ViT tokens (B, prefix + N, C) -> (B, C, h, w)
            values, grads = (_token_grid(t[:, self.prefix:]) for t in (values, grads))
        if self.method == "gradcam":  # channels weighted by their mean gradient
            weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
            cam = F.relu((weights * values).sum(1, keepdim=True))  # (B, 1, h, w)
        elif self.method == "hirescam":  # element-wise gradient x activation
            cam = F.relu((grads * values).sum(1, keepdim=True))
        else:  # gradnorm: how strongly the similarity depends on the features at each location
            cam = grads.norm(dim=1, keepdim=True)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        return _unit(cam)


def integrated_gradients(model, images, targets, baseline, steps, amp_dtype=None):
    """Per-pixel attribution (B, C, H, W) of the similarity to `targets` (B, D; normalised here),
    (x - x0) * the mean gradient at `steps` points of the straight path from the baseline x0
    (C, H, W) to x (midpoint rule). Its sum over the pixels approaches S(x) - S(x0) as the steps
    grow (completeness, Sundararajan et al., 2017). Written here (a dozen lines) rather than with
    captum: the score is a similarity to a target, not a model output."""
    baseline = baseline.to(images.device, images.dtype).expand_as(images)
    targets = F.normalize(targets.float().to(images.device), dim=1)
    total = torch.zeros_like(images)
    for alpha in ((torch.arange(steps) + 0.5) / steps).tolist():
        with torch.enable_grad(), torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16,
                                                 enabled=amp_dtype is not None):
            point = (baseline + alpha * (images - baseline)).requires_grad_(True)
            score = (model(point).float() * targets).sum()
            total += torch.autograd.grad(score, point)[0].float()
    return (images - baseline) * total / steps


def gaussian_smooth(maps, sigma):
    """(B, 1, H, W) maps blurred by a Gaussian of `sigma` pixels (separable, reflected edges);
    sigma 0 leaves them as they are."""
    if sigma <= 0:
        return maps
    # three sigmas, but reflect padding needs less than the map's side (a huge sigma: a flat map)
    radius = max(1, min(int(3 * sigma), min(maps.shape[-2:]) - 1))
    kernel = torch.exp(-torch.arange(-radius, radius + 1, device=maps.device) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _token_grid(tokens):
    batch, count, channels = tokens.shape
    side = int(round(count ** 0.5))
    if side * side != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


def _unit(maps):
    """Each map scaled to a maximum of 1 (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps / peak.view(-1, *([1] * (maps.dim() - 1)))


@torch.inference_mode()
def branch_attribution(model, images, targets, branch_means, features=None):
    """Per image: the similarity to its target and how much of it each branch carries
    (model.branch_attribution: the drop when that branch's pooled features are replaced by
    their gallery mean). None for single-backbone models. `features`: the images' pooled
    branch features when the caller has them already."""
    if not branch_means or not has_branches(model):
        return None
    if features is None:
        features, _ = model.branch_features(images)
    out = {k: v.tolist() for k, v in model.branch_attribution(features, targets, branch_means).items()}
    return [{k: (None if v[i] != v[i] else v[i]) for k, v in out.items()}  # NaN share -> None
            for i in range(len(images))]


def fusion_weights(model, images, targets, branch_means=None):
    """{branch: (B,) shares} for the fused map of the hybrid, None for other models."""
    if not has_branches(model):
        return None
    features = None
    if branch_means is None:  # these images' own mean, from the one forward pass
        with torch.inference_mode():
            features, _ = model.branch_features(images)
            branch_means = {b: f.float().mean(0) for b, f in features.items()}
    return branch_weights(branch_attribution(model, images, targets, branch_means, features))


def branch_weights(attribution):
    if not attribution or any(a["convnext_share"] is None for a in attribution):
        return None  # equal weights
    return {b: [a[f"{b}_share"] for a in attribution] for b in ("convnext", "vit")}


def heatmaps(cam, transform, paths, targets, device, branch_means=None, bit_depth=None):
    """[(original PIL image, fused map at its resolution)] of the images at `paths`, each for
    the similarity to its row of `targets`. The fused map is the cam's: with method "ig" the
    whole model's; otherwise, for the hybrid, the branch maps weighted by their share of the
    similarity (branch_attribution against `branch_means`, by default the mean pooled features
    of these images)."""
    originals = [load_image(p, bit_depth) for p in paths]
    images = torch.stack([transform(img) for img in originals]).to(device)
    targets = targets.to(device)
    weights = None if METHODS[cam.method].input_space else fusion_weights(cam.model, images, targets, branch_means)
    fused = cam(images, targets, branch_weights=weights)["fused"]
    return [(img, F.interpolate(fused[i][None, None], size=(img.height, img.width), mode="bilinear",
                                align_corners=False)[0, 0].cpu().numpy()) for i, img in enumerate(originals)]
