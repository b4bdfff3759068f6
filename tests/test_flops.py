"""cxr/flops.py: model FLOPs = 3 x the forward pass, counted exactly for dense and depthwise
convolutions and linear layers (the analytic counts), for a whole hybrid too."""
import torch
import torch.nn as nn

from conftest import SMALL_MODEL
from cxr.flops import forward_flops, training_flops_per_image
from model import build_model


def test_depthwise_and_dense_convolutions_and_linear_layers_count_their_analytic_flops():
    batch, channels, size, kernel = 2, 16, 12, 7
    images = torch.randn(batch, channels, size, size)
    depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
    # one multiply-add (2 FLOPs) per kernel tap, per output element
    assert forward_flops(depthwise, images) == 2 * batch * channels * size * size * kernel * kernel
    dense = nn.Conv2d(channels, 32, 3, padding=1)
    assert forward_flops(dense, images) == 2 * batch * 32 * size * size * channels * 3 * 3
    strided = nn.Conv2d(channels, 32, 2, stride=2)  # ConvNeXt's downsampling
    assert forward_flops(strided, images) == 2 * batch * 32 * (size // 2) ** 2 * channels * 2 * 2
    linear = nn.Linear(channels, 8)
    assert forward_flops(linear, torch.randn(batch, channels)) == 2 * batch * channels * 8


def test_training_flops_are_three_forward_passes_of_the_model():
    model = build_model("hybrid_convnext_vit", 16, pretrained=False, **SMALL_MODEL).eval()
    images = torch.randn(2, 3, SMALL_MODEL["img_size"], SMALL_MODEL["img_size"])
    forward = forward_flops(model, images) / 2
    assert forward > 0
    assert training_flops_per_image(model, SMALL_MODEL["img_size"], "cpu") == 3 * forward
