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


def test_training_flops_per_image_are_three_analytic_forward_passes():
    channels, size, classes = 8, 10, 4
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, channels, 7, padding=3,
                                                                           groups=channels),
                          nn.Flatten(), nn.Linear(channels * size * size, classes))
    forward = (2 * channels * size * size * 3 * 9  # dense 3 x 3
               + 2 * channels * size * size * 49  # depthwise 7 x 7
               + 2 * channels * size * size * classes)  # linear
    for batch in (1, 3):  # per image, whatever the batch counted
        assert training_flops_per_image(model, size, "cpu", batch=batch) == 3 * forward


def test_the_hybrids_count_is_per_image_and_covers_both_branches():
    model = build_model("hybrid_convnext_vit", 16, pretrained=False, **SMALL_MODEL).eval()
    size = SMALL_MODEL["img_size"]
    whole = training_flops_per_image(model, size, "cpu")
    assert whole == training_flops_per_image(model, size, "cpu", batch=1)
    convnext = 3 * forward_flops(model.convnext, torch.randn(1, 3, size, size))
    vit = 3 * forward_flops(model.vit, torch.randn(1, 3, size, size))
    assert convnext > 0 and vit > 0 and whole > convnext + vit  # + the fusion head
