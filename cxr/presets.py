"""Default configurations shared by train.py, test.py and bench.py.

Two independent choices fill every flag left unset on the command line:

- the setup: the paper's (ConvNeXtV2-Base + ViT-B/16 at 384 px, pretrained, COVIDx lists) or,
  for `--dataset demo`, a small configuration that trains from scratch on a laptop CPU;
- the recipe (`--recipe`): how the embedding is trained.
    strong  BN neck + cosine-softmax identity loss + batch-all triplet loss, AdamW with weight
            decay, warmup and cosine decay, and for the hybrid the same loss on each branch's
            own head at weight 0.5 (the default: it learns from random weights and makes both
            branches learn, see the ablations in HYBRID_MODEL_GUIDE.md)
    seed    the seed's loss and optimisation: plain Adam at a constant 1e-4, batch-hard
            triplet loss only, no weight decay, no BN neck, backbones at the same learning
            rate, no per-branch losses. The data pipeline and mixed precision stay this
            repo's (the whole image resized, never centre-cropped; bf16 autocast on recent
            GPUs unless --amp none).
"""
import argparse
import os
from pathlib import Path

from model import DEFAULT_CONVNEXT, DEFAULT_EMBEDDING_DIM, DEFAULT_IMG_SIZE, DEFAULT_VIT

DATASETS = ("covid", "demo", "csv", "folder", "nih", "chexpert", "mimic")
LIST_FORMAT = {"covid": "covidx", "demo": "covidx", "csv": "csv", "folder": "folder",
               "nih": "nih", "chexpert": "chexpert", "mimic": "mimic"}
# The public data sets' lists name their images from the data set's own folder (NIH's images/,
# CheXpert's CheXpert-v1.0-small/..., MIMIC's files/...), not from <dataset-dir>/train and /test.
WHOLE_FOLDER_FORMATS = ("nih", "chexpert", "mimic")


def split_folder(dataset, dataset_dir, split):
    """Where the images of one split ("train" or "test") lie: <dataset-dir>/<split>, or the data
    set's folder itself for the public formats."""
    return Path(dataset_dir) if LIST_FORMAT[dataset] in WHOLE_FOLDER_FORMATS else Path(dataset_dir) / split

PAPER_DEFAULTS = dict(
    convnext_name=DEFAULT_CONVNEXT, vit_name=DEFAULT_VIT, img_size=DEFAULT_IMG_SIZE,
    embedding_dim=DEFAULT_EMBEDDING_DIM,
    pretrained=True, epochs=50, lr=1e-4, labels_per_batch=3, samples_per_label=16,
    workers=min(8, os.cpu_count() or 1), eval_batch_size=64, dataset_dir="./data",
    train_image_list="./train_split.txt", test_image_list="./test_COVIDx4.txt",
    save_dir="./checkpoints", hflip=True,
    fusion="norm", vit_patch_size=None, vit_stem="patch",
)
DEMO_DEFAULTS = dict(
    convnext_name="convnextv2_atto", vit_name="vit_tiny_patch16_224", img_size=64,
    embedding_dim=128, pretrained=False, epochs=8, lr=1e-3, labels_per_batch=5,
    samples_per_label=8, workers=min(2, os.cpu_count() or 1), eval_batch_size=100,
    dataset_dir="./data/demo", train_image_list=None, test_image_list=None,
    save_dir="./checkpoints/demo", hflip=False,
    fusion="norm", vit_patch_size=None, vit_stem="conv",
)
# The phantoms `--dataset demo` generates: enough images per class that a from-scratch model
# learns the findings and that test numbers mean something (one standard error of R@1 on 300
# test images is under 3 points).
DEMO_DATA = dict(train_per_class=400, test_per_class=60, size=128, seed=0)

RECIPES = {
    "strong": dict(optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=1.0,
                   mining="batch_all", neck="bn", id_loss_weight=1.0, branch_loss_weight=0.5),
    "seed": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant",
                 warmup_epochs=0.0, mining="batch_hard", neck="none", id_loss_weight=0.0,
                 backbone_lr_mult=1.0, branch_loss_weight=0.0),
}


# --setup small on data other than the demo: the demo's backbones, size and training length
# (from scratch, for a CPU), the data set's own paths, and P = 2 so that two classes make a
# batch (the demo itself keeps its P = 5).
SETUPS = ("paper", "small")
DATA_KEYS = ("dataset_dir", "train_image_list", "test_image_list", "save_dir")
SMALL_DEFAULTS = {**{k: v for k, v in DEMO_DEFAULTS.items() if k not in DATA_KEYS},
                  "labels_per_batch": 2,
                  **{k: PAPER_DEFAULTS[k] for k in DATA_KEYS}}


def setup_defaults(dataset, setup=None):
    """The defaults of `setup` ("paper" or "small"; None: small for the demo, else paper)."""
    if dataset == "demo" and setup in (None, "small"):
        return DEMO_DEFAULTS
    if setup == "small":
        return SMALL_DEFAULTS
    return PAPER_DEFAULTS if dataset != "demo" else {**PAPER_DEFAULTS, **{k: DEMO_DEFAULTS[k] for k in DATA_KEYS}}


def document_defaults(parser):
    """Add the defaults that depend on --dataset and --recipe to the help texts."""
    recipe_keys = set().union(*RECIPES.values())
    shown = {"workers": ("min(8, CPU count)", "min(2, CPU count)"),  # not this machine's count
             "train_image_list": (PAPER_DEFAULTS["train_image_list"], "<dataset-dir>/train_split.txt"),
             "test_image_list": (PAPER_DEFAULTS["test_image_list"], "<dataset-dir>/test_split.txt")}
    for action in parser._actions:
        key = action.dest
        parts = []
        if key in PAPER_DEFAULTS:
            paper, demo = shown.get(key, (PAPER_DEFAULTS[key], DEMO_DEFAULTS[key]))
            parts.append(f"paper: {paper}; --dataset demo: {demo}")
        if key in recipe_keys:
            parts += [f"--recipe {name}: {values[key]}" for name, values in RECIPES.items() if key in values]
        elif action.default not in (None, argparse.SUPPRESS) and action.help and key != "help":
            parts.append(f"default: {action.default}")
        if parts and action.help:
            action.help += " [" + "; ".join(parts) + "]"
