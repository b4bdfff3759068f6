import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the flat modules (and test.py before the stdlib's `test`)

# Small timm variants at a small size: the full architecture's code paths in seconds.
SMALL_MODEL = dict(convnext_name="convnextv2_atto", vit_name="vit_tiny_patch16_224", img_size=64)


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield
