"""Model FLOPs by the usual convention: a training step costs 3 x the forward pass (the forward,
and a backward of about twice its cost), with no recompute for activation checkpointing; MFU is
those FLOPs x images/s over the device's peak.

The forward pass is counted with torch's FlopCounterMode, whose forward counts are exact for the
layers here (matrix products, dense and depthwise convolutions, attention). Its backward counts
are not used: it counts a grouped (depthwise) convolution's `convolution_backward` as if the
convolution were dense, so ConvNeXt's 7 x 7 depthwise layers cost 538 GFLOPs per 384 px image
in its backward against 3.3 GFLOPs for every convolution of the forward, so the MFU of earlier
BENCHMARKS.md sections was about twice the real one.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model, images):
    """FLOPs of one forward pass of `model` on `images` (the whole batch), without gradients."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def training_flops_per_image(model, img_size, device, batch=2):
    """Model FLOPs of one training image: 3 x its forward FLOPs."""
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return 3 * forward_flops(model, images) / batch
