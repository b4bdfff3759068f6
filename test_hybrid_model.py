"""Quick check that the hybrid model builds and runs: the paper's full configuration
(ConvNeXtV2-Base + ViT-B/16 at 384 px, 1024-d) with random weights, so no download is needed.

    python test_hybrid_model.py          # hybrid, then the four baselines
    python test_hybrid_model.py --quick  # small backbones at 64 px (seconds)

Prints the four lines of the README and exits non-zero on any failure.
"""
import argparse
import sys

import torch

from model import MODEL_NAMES, build_model

SMALL = dict(convnext_name="convnextv2_atto", vit_name="vit_tiny_patch16_224", img_size=64)


def check(name, config, batch=2):
    model = build_model(name, pretrained=False, **config).eval()
    images = torch.randn(batch, 3, config.get("img_size", 384), config.get("img_size", 384))
    with torch.inference_mode():
        embeddings = model(images)
    norms = embeddings.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise AssertionError(f"{name}: embedding norms {norms.tolist()} are not 1")
    return model, embeddings


def main(args):
    config = dict(SMALL) if args.quick else {}
    torch.manual_seed(0)
    try:
        model, embeddings = check("hybrid_convnext_vit", config)
        print(f"✓ Model created successfully ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
        print(f"✓ Forward pass successful: {tuple(embeddings.shape)}")
        print(f"✓ Output norm: ~{embeddings.norm(dim=1).mean().item():.1f}")
        for name in MODEL_NAMES[1:]:
            _, baseline = check(name, config)
            print(f"  baseline {name}: {tuple(baseline.shape)}, unit norm")
    except Exception as error:  # any failure is reported and turns into a non-zero exit
        print(f"✗ {type(error).__name__}: {error}")
        return 1
    print("✓ All tests passed!")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small backbones at 64 px")
    sys.exit(main(parser.parse_args()))
