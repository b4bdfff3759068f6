"""train.py's command line: the flags, the defaults they take from the setup and the recipe
(presets.py), the checks of their combinations, and the model config they give."""
import argparse
from pathlib import Path

import torch

from cxr import cli, image_cache
from cxr.presets import (
    DATASETS,
    LIST_FORMAT,
    PAPER_DEFAULTS,
    RECIPES,
    SETUPS,
    WHOLE_FOLDER_FORMATS,
    document_defaults,
    setup_defaults,
    split_folder,
)
from cxr.public_lists import default_lists
from cxr.runtime import AMP_DTYPES, resolve_amp
from loss import MININGS
from model import FUSIONS, MODEL_NAMES, MXA_MODES, NECKS, VIT_STEMS


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Train a chest X-ray retrieval embedding",
                                     add_help=add_help)
    parser.add_argument("--setup", choices=SETUPS, help="the defaults of every unset model and "
                        "training flag: paper (ConvNeXtV2-Base + ViT-B/16, 384 px, pretrained; needs a "
                        "GPU) or small (the demo's atto + tiny backbones at 64 px from scratch, for a CPU; "
                        "P = 2) [default: small for --dataset demo, else paper]")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="skip the estimate of peak memory before training (cxr/memory_check.py)")
    # Model
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="hybrid_convnext_vit", choices=MODEL_NAMES,
                       help="hybrid_convnext_vit (the paper's) or a single-backbone baseline")
    group.add_argument("--embedding-dim", type=int, help="embedding size")
    group.add_argument("--img-size", type=int, help="input size, a multiple of 32")
    group.add_argument("--convnext-name", help="timm ConvNeXt(V2) name")
    group.add_argument("--vit-name", help="timm ViT name")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                       help="start from ImageNet weights")
    group.add_argument("--weights-dir", help="folder with <timm name>.safetensors/.pth files, "
                       "for machines without hub access")
    group.add_argument("--convnext-weights", help="ConvNeXt weights file (overrides the hub)")
    group.add_argument("--vit-weights", help="ViT weights file (overrides the hub)")
    group.add_argument("--neck", choices=NECKS, help="bn: BatchNorm neck before the L2 "
                       "normalisation (keeps a from-scratch embedding from collapsing); none: the paper's head")
    group.add_argument("--fusion", choices=FUSIONS, help="hybrid: norm = a LayerNorm on each "
                       "branch's pooled features before the concatenation; seed = the paper's raw "
                       "concatenation (the branch with the larger scale dominates)")
    group.add_argument("--mxa", choices=MXA_MODES, default="both",
                       help="the MXA block after the ConvNeXt: channel (ca) and/or spatial (sa) attention")
    group.add_argument("--vit-patch-size", type=int, help="ViT patch size (default: the timm "
                       "model's); a small input needs small patches to give the ViT enough tokens")
    group.add_argument("--vit-stem", choices=VIT_STEMS, help="conv: a convolutional stem instead "
                       "of the ViT's patchify layer (Xiao et al., 2021; from scratch only)")
    group.add_argument("--branch-loss-weight", type=float,
                       help="hybrid: each branch's own embedding head trained with the same loss, "
                       "this weight each, beside the fused embedding's (0: off)")
    # Data
    group = parser.add_argument_group("data")
    cli.add_dataset_flag(group, "covid: COVIDx lists; csv: filename,label[,patient_id] lists (findings joined by "
                     "'|'); folder: <dir>/<split>/<label>/*; nih, chexpert, mimic: the data sets' own lists "
                     "(images under --dataset-dir as shipped); demo: synthetic phantoms, generated if absent",
                     default="covid")
    cli.add_public_list_flags(group)
    group.add_argument("--label-mode", choices=("findings", "combinations"), default="findings",
                       help="multi-label lists: train on the findings (PK batches of P findings, positives "
                       "share a finding, one identity logit per finding) or on each finding combination "
                       "as one class (what flattening the labels gives)")
    cli.add_dataset_dir_flag(group, "the folder holding train/ and test/ (the lists name images under them)")
    group.add_argument("--train-image-list", help="training list (COVIDx txt or CSV)")
    group.add_argument("--test-image-list", help="test list, evaluated leave-one-out every "
                       "epoch for the log; it never selects the checkpoint")
    group.add_argument("--val-image-list", help="validation list (images under "
                       "--val-dataset-dir); selects the best checkpoint. Default: --val-fraction "
                       "of the training list")
    group.add_argument("--val-dataset", choices=DATASETS, help="format of --val-image-list when "
                       "it differs from --dataset's (e.g. a CSV validation list beside COVIDx lists)")
    group.add_argument("--val-dataset-dir", help="folder of the validation images "
                       "(default <dataset-dir>/train)")
    group.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of the training images (whole patients, per class) held out "
                       "for validation when no --val-image-list is given; 0 selects on the test "
                       "list as the seed did (optimistic; a warning says so)")
    group.add_argument("--shuffle-labels", action="store_true",
                       help="the data-randomisation sanity check (Adebayo et al., 2018): train on the "
                       "training images' labels permuted at random (seeded by --seed; multi-label: "
                       "whole finding sets); validation, test and the lists other programs rebuild "
                       "from the checkpoint keep their true labels, so what such a checkpoint scores "
                       "and its maps show is the floor of a model that learnt nothing of the labels")
    group.add_argument("--rand-resize", action="store_true",
                       help="random crops of 70-100%% of the image for training")
    group.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                       help="random horizontal flips (note: a flip moves the heart to the right)")
    cli.add_workers_flag(group, None, help="data loading processes per rank (default: the setup's)")
    image_cache.add_argument(group)
    group.add_argument("--bit-depth", default="auto", choices=("auto", "8", "10", "12", "14", "16"),
                       help="bits of the data in 16-bit images (12 for most scanners); auto: the "
                       "smallest depth holding the brightest of (a sample of) the training images. "
                       "One depth for the whole data set, never per image")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="decode every image before training and drop the unreadable ones "
                       "(listed in <save-dir>/bad_images.txt); default: stop and name them")
    # Batches and loss
    group = parser.add_argument_group("batches and loss")
    group.add_argument("-p", "--labels-per-batch", type=int, help="P: labels per batch")
    group.add_argument("-k", "--samples-per-label", type=int, help="K: images per label")
    group.add_argument("--batch-size", type=int,
                       help="P x K; given alone, K = batch-size // P (seed-compatible)")
    group.add_argument("--batches-per-epoch", type=int,
                       help="default: one pass over the training images across all ranks")
    group.add_argument("--recipe", default="strong", choices=tuple(RECIPES),
                       help="strong: BN neck + identity loss + batch-all triplet, AdamW, cosine "
                       "(learns from scratch); seed: the seed's loss and optimisation (Adam, "
                       "constant lr 1e-4, batch-hard triplet only, no weight decay, no neck). "
                       "Flags given override it")
    group.add_argument("--margin", type=float, default=0.2, help="triplet margin (try 0.1-0.3)")
    group.add_argument("--mining", choices=MININGS, help="triplet mining")
    group.add_argument("--soft-margin", action="store_true",
                       help="softplus(d_ap - d_an) instead of the hinge with --margin (Hermans et al., 2017)")
    group.add_argument("--id-loss-weight", type=float,
                       help="weight of the cosine-softmax identity loss beside the triplet loss (0: off)")
    group.add_argument("--id-loss-scale", type=float, default=16.0,
                       help="cosine-softmax temperature (logits = scale x cosine)")
    group.add_argument("--label-smoothing", type=float, default=0.1, help="of the identity loss")
    # Optimisation
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, help="training epochs")
    group.add_argument("--optimizer", choices=("adamw", "adam"), help="adam: the seed's, no decoupled decay")
    group.add_argument("--lr", type=float, help="peak learning rate of the new layers")
    group.add_argument("--backbone-lr-mult", type=float,
                       help="backbone lr = lr x this (default: 0.1 when pretrained, else 1)")
    group.add_argument("--weight-decay", type=float, help="weight decay (not on norms and biases)")
    group.add_argument("--schedule", choices=("cosine", "constant"),
                       help="cosine: linear warmup, then cosine decay to --min-lr-ratio x lr")
    group.add_argument("--warmup-epochs", type=float, help="linear warmup (cosine schedule)")
    group.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr")
    group.add_argument("--grad-accum", type=int, default=1,
                       help="PK batches per optimiser step; their gradients are averaged")
    group.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off)")
    # Speed
    group = parser.add_argument_group("speed")
    group.add_argument("--amp", default="auto", choices=("auto", *AMP_DTYPES),
                       help="mixed precision; auto = bf16 on CUDA from compute capability 8 "
                       "(A100, H100), fp16 with loss scaling on older GPUs, none on CPU")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute backbone activations in backward: less memory, ~25%% slower")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="channels-last memory format (default: on for CUDA)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                       help="fused Adam(W) kernels (one launch for all parameters)")
    cli.add_device_flag(group)
    cli.add_progress_flag(group)
    # Evaluation, logging, checkpoints
    group = parser.add_argument_group("evaluation, logging and checkpoints")
    group.add_argument("--eval-batch-size", type=int, help="images per batch when embedding")
    group.add_argument("--eval-freq", type=int, default=1, help="evaluate every N epochs")
    group.add_argument("--print-freq", type=int, default=10, help="check the loss every N steps")
    group.add_argument("--save-dir", help="checkpoints, args.json and metrics.jsonl")
    group.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                       help="also log to TensorBoard: every metrics.jsonl number per epoch, the loss and "
                       "learning rate per logged step, the validation embeddings of each best epoch in "
                       "the projector (default DIR: <save-dir>/tensorboard; needs pip install tensorboard)")
    group.add_argument("--keep-checkpoints", type=int, default=3,
                       help="epoch checkpoints kept (older ones deleted; 0 keeps all)")
    group.add_argument("--overwrite", action="store_true",
                       help="allow a fresh run in a --save-dir that already holds one")
    group.add_argument("--allow-patient-overlap", action="store_true",
                       help="go on when the train, validation and test lists share patients or "
                       "files (an error otherwise: it inflates validation and test numbers)")
    cli.add_resume_flag(group, "checkpoint to continue from (full training state); auto: the newest readable "
                    "one in --save-dir, or a new run if there is none", required=False)
    group.add_argument("--skip-nonfinite", action="store_true",
                       help="skip an optimiser step whose loss or gradient is NaN/Inf (counted in "
                       "metrics.jsonl) instead of stopping the run")
    group.add_argument("--seed", type=int, default=0, help="seed of sampling and initialisation")
    document_defaults(parser)
    cli.add_debug_flag(group)
    return parser


def resolve_args(args):
    """Fill unset flags from the recipe and the paper or demo setup; check the batch geometry."""
    defaults = setup_defaults(args.dataset, args.setup)
    p = args.labels_per_batch = args.labels_per_batch or defaults["labels_per_batch"]
    if args.batch_size is not None:
        if args.samples_per_label is None:  # the seed's usage: --batch-size alone sets K
            if args.batch_size < p:
                raise SystemExit(f"error: --batch-size {args.batch_size} is smaller than "
                                 f"--labels-per-batch {p}; the batch is P x K")
            args.samples_per_label = args.batch_size // p
            if args.batch_size % p:
                print(f"note: --batch-size {args.batch_size} with P = {p} labels per batch gives "
                      f"K = {args.samples_per_label}, a batch of {p * args.samples_per_label}")
        elif args.batch_size != p * args.samples_per_label:
            raise SystemExit(f"error: --batch-size {args.batch_size} contradicts -p {p} x -k "
                             f"{args.samples_per_label}; the batch is P x K: give -p and -k, "
                             "or -p and --batch-size")
    if args.vit_stem is None and args.pretrained:  # the demo's conv stem has no pre-trained weights
        args.vit_stem = "patch"
    folder = LIST_FORMAT[args.dataset] == "folder"
    if folder and (args.train_image_list or args.test_image_list):
        raise SystemExit("error: --dataset folder reads <dataset-dir>/train/<label>/ and "
                         "<dataset-dir>/test/<label>/, no list files; drop --train-image-list and "
                         "--test-image-list, or use --dataset covid or csv")
    for key, value in {**defaults, **RECIPES[args.recipe]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if folder:  # no list is read: args.json and messages must not name the paper's list files
        args.train_image_list = args.test_image_list = None
    if args.dataset == "demo":
        args.train_image_list = args.train_image_list or str(Path(args.dataset_dir) / "train_split.txt")
        args.test_image_list = args.test_image_list or str(Path(args.dataset_dir) / "test_split.txt")
    if LIST_FORMAT[args.dataset] in WHOLE_FOLDER_FORMATS:  # the lists as the data set ships them
        train_list, test_list = default_lists(args.dataset, args.dataset_dir)
        if args.train_image_list in (None, PAPER_DEFAULTS["train_image_list"]):
            args.train_image_list = train_list
        if args.test_image_list in (None, PAPER_DEFAULTS["test_image_list"]):
            args.test_image_list = test_list
    if LIST_FORMAT[args.val_dataset or args.dataset] == "folder":
        if args.val_image_list:  # a folder layout is scanned: a list would be silently ignored
            raise SystemExit("error: a folder-layout validation set is read from --val-dataset-dir "
                             "(<dir>/<label>/ images), no list; drop --val-image-list, or give the "
                             "list's format with --val-dataset")
    else:
        args.val_dataset_dir = args.val_dataset_dir or str(split_folder(args.val_dataset or args.dataset,
                                                                         args.dataset_dir, "train"))
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"error: --val-fraction {args.val_fraction} must be at least 0 and below 1")
    args.batch_size = p * args.samples_per_label
    if args.vit_patch_size is not None and (args.vit_patch_size < 1 or args.img_size % args.vit_patch_size):
        raise SystemExit(f"error: --vit-patch-size {args.vit_patch_size} must be positive and divide "
                         f"--img-size {args.img_size}")
    if args.vit_stem == "conv" and args.vit_patch_size and (args.vit_patch_size < 2 or
                                                            args.vit_patch_size & (args.vit_patch_size - 1)):
        raise SystemExit(f"error: --vit-stem conv halves the image per layer: --vit-patch-size "
                         f"{args.vit_patch_size} must be a power of two (e.g. 8 or 16)")
    if args.vit_stem == "conv" and args.pretrained and args.model in ("hybrid_convnext_vit", "vit"):
        raise SystemExit("error: --vit-stem conv has no pre-trained weights; train from scratch "
                         "(--no-pretrained) or keep the ViT's own stem (--vit-stem patch)")
    if args.backbone_lr_mult is None:
        args.backbone_lr_mult = 0.1 if args.pretrained else 1.0
    args.amp = resolve_amp(args.amp, args.device)
    if args.channels_last is None:
        args.channels_last = args.device != "cpu" and torch.cuda.is_available()
    return args


def parse_args(argv=None):
    return resolve_args(get_args_parser().parse_args(argv))


# The model config of checkpoints saved before a key existed (build_model's defaults).
LEGACY_CONFIG = dict(neck="none", fusion="seed", mxa="both", vit_patch_size=None, vit_stem="patch",
                     branch_heads=False)


def model_config(args):
    """What build_model needs (and the checkpoint stores). Hybrid-only and branch-only options
    are stored only where they apply, so a ConvNeXt baseline's config names no ViT patch size."""
    config = dict(name=args.model, embedding_dim=args.embedding_dim, img_size=args.img_size,
                  convnext_name=args.convnext_name, vit_name=args.vit_name, neck=args.neck)
    if args.model in ("hybrid_convnext_vit", "convnextv2"):
        config["mxa"] = args.mxa
    if args.model in ("hybrid_convnext_vit", "vit"):
        config.update(vit_patch_size=args.vit_patch_size, vit_stem=args.vit_stem)
    if args.model == "hybrid_convnext_vit":
        config.update(fusion=args.fusion, branch_heads=args.branch_loss_weight > 0)
    return config
