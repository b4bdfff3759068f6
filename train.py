"""Train an embedding model for chest X-ray retrieval with PK batches and a triplet loss.

Single GPU (the paper's configuration, pretrained backbones, COVIDx lists):
    python train.py --model hybrid_convnext_vit --embedding-dim 1024 --dataset covid \
        --dataset-dir ./data --train-image-list ./train_split.txt \
        --test-image-list ./test_COVIDx4.txt --epochs 50 --lr 0.0001 --batch-size 16
Several GPUs / nodes (each rank draws its own P x K batches):
    torchrun --nproc_per_node=4 train.py ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...
CPU, no data, no weights (synthetic phantoms, small backbones; a few minutes):
    python train.py --dataset demo

Outputs in --save-dir: args.json, metrics.jsonl (one line per evaluation), checkpoints
`{dataset}_{model}_embed_{dim}_seed_{seed}_epoch_{epoch}_ckpt.pth` and `..._best_ckpt.pth`
(best R@1 on the test list).
"""
import argparse
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import demo_data
import utils
from dataset import ImageListDataset, build_transform
from loss import MININGS, TripletMarginLoss
from metrics import evaluate_retrieval
from model import DEFAULT_CONVNEXT, DEFAULT_VIT, MODEL_NAMES, build_model
from sampler import PKSampler

DATASETS = ("covid", "demo", "csv", "folder")
LIST_FORMAT = {"covid": "covidx", "demo": "covidx", "csv": "csv", "folder": "folder"}

# Flags left unset on the command line take these: the paper's setup, or for --dataset demo a
# configuration that trains from scratch on a laptop CPU in a few minutes.
PAPER_DEFAULTS = dict(
    convnext_name=DEFAULT_CONVNEXT, vit_name=DEFAULT_VIT, img_size=384, embedding_dim=1024,
    pretrained=True, epochs=50, lr=1e-4, labels_per_batch=3, samples_per_label=16,
    workers=min(8, os.cpu_count() or 1),
    eval_batch_size=64, dataset_dir="./data", train_image_list="./train_split.txt",
    test_image_list="./test_COVIDx4.txt", save_dir="./checkpoints", warmup_epochs=1,
    mining="batch_hard",
)
DEMO_DEFAULTS = dict(
    convnext_name="convnextv2_atto", vit_name="vit_tiny_patch16_224", img_size=64,
    embedding_dim=128, pretrained=False, epochs=10, lr=5e-4, labels_per_batch=5,
    samples_per_label=8, workers=2, eval_batch_size=100, dataset_dir="./data/demo",
    train_image_list=None, test_image_list=None, save_dir="./checkpoints/demo", warmup_epochs=1,
    # From random weights on 300 images, batch-hard mining collapses the embedding (every
    # loss stuck at the margin); averaging over all active triplets learns steadily.
    mining="batch_all",
)
DEMO_DATA = dict(train_per_class=60, test_per_class=20, size=128, seed=0)


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Train a chest X-ray retrieval embedding",
                                     add_help=add_help)
    # Model
    parser.add_argument("--model", default="hybrid_convnext_vit", choices=MODEL_NAMES,
                        help="hybrid_convnext_vit (the paper's) or a single-backbone baseline")
    parser.add_argument("--embedding-dim", type=int, help="embedding size (paper: 1024)")
    parser.add_argument("--img-size", type=int, help="input size, multiple of 32 (paper: 384)")
    parser.add_argument("--convnext-name", help=f"timm ConvNeXt(V2) name (paper: {DEFAULT_CONVNEXT})")
    parser.add_argument("--vit-name", help=f"timm ViT name (paper: {DEFAULT_VIT})")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                        help="start from ImageNet weights (default: yes; no for --dataset demo)")
    parser.add_argument("--weights-dir", help="folder with <timm name>.safetensors/.pth files, "
                        "for machines without hub access")
    parser.add_argument("--convnext-weights", help="ConvNeXt weights file (overrides the hub)")
    parser.add_argument("--vit-weights", help="ViT weights file (overrides the hub)")
    # Data
    parser.add_argument("--dataset", default="covid", choices=DATASETS,
                        help="covid: COVIDx lists; csv: filename,label lists; folder: "
                        "<dir>/<split>/<label>/*; demo: synthetic phantoms, generated if absent")
    parser.add_argument("--dataset-dir", help="images under <dir>/train and <dir>/test")
    parser.add_argument("--train-image-list", help="training list (COVIDx txt or CSV)")
    parser.add_argument("--test-image-list", help="test list, evaluated leave-one-out")
    parser.add_argument("--rand-resize", action="store_true",
                        help="RandomResizedCrop instead of a centre crop for training")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips (note: a flip moves the heart to the right)")
    parser.add_argument("--workers", type=int, help="data loading processes per rank")
    # Batches and loss
    parser.add_argument("-p", "--labels-per-batch", type=int, help="P: labels per batch (COVIDx: 3)")
    parser.add_argument("-k", "--samples-per-label", type=int, help="K: images per label")
    parser.add_argument("--batch-size", type=int,
                        help="P x K; given alone, K = batch-size // P (seed-compatible)")
    parser.add_argument("--batches-per-epoch", type=int,
                        help="default: one pass over the training images across all ranks")
    parser.add_argument("--margin", type=float, default=0.2, help="triplet margin (try 0.1-0.3)")
    parser.add_argument("--mining", choices=MININGS,
                        help="triplet mining (default batch_hard; batch_all for --dataset demo)")
    # Optimisation
    parser.add_argument("--epochs", type=int, help="training epochs (paper: 50-100)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the new layers (paper: 1e-4)")
    parser.add_argument("--backbone-lr-mult", type=float,
                        help="backbone lr = lr x this (default: 0.1 when pretrained, else 1)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=float, help="linear warmup, then cosine decay")
    parser.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="PK batches per optimiser step (a larger effective batch)")
    parser.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (off)")
    # Speed
    parser.add_argument("--amp", default="auto", choices=("auto", *utils.AMP_DTYPES),
                        help="mixed precision; auto = bf16 on CUDA, none on CPU")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute backbone activations in backward: less memory, ~25%% slower")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: on for CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                        help="fused AdamW kernels (one launch for all parameters)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    # Evaluation, logging, checkpoints
    parser.add_argument("--eval-batch-size", type=int, help="images per batch when embedding")
    parser.add_argument("--eval-freq", type=int, default=1, help="evaluate every N epochs")
    parser.add_argument("--print-freq", type=int, default=10, help="check the loss every N steps")
    parser.add_argument("--save-dir", help="checkpoints, args.json and metrics.jsonl")
    parser.add_argument("--keep-checkpoints", type=int, default=3,
                        help="epoch checkpoints kept (older ones deleted; 0 keeps all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a fresh run in a --save-dir that already holds one")
    parser.add_argument("--resume", help="checkpoint to continue from (full training state)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and initialisation")
    return parser


def resolve_args(args):
    """Fill unset flags from the paper or demo defaults and check the batch geometry."""
    defaults = DEMO_DEFAULTS if args.dataset == "demo" else PAPER_DEFAULTS
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
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset == "demo":
        args.train_image_list = args.train_image_list or str(Path(args.dataset_dir) / "train_split.txt")
        args.test_image_list = args.test_image_list or str(Path(args.dataset_dir) / "test_split.txt")
    args.batch_size = p * args.samples_per_label
    if args.backbone_lr_mult is None:
        args.backbone_lr_mult = 0.1 if args.pretrained else 1.0
    if args.amp == "auto":
        args.amp = "bf16" if torch.cuda.is_available() and args.device != "cpu" else "none"
    if args.channels_last is None:
        args.channels_last = args.device != "cpu" and torch.cuda.is_available()
    return args


def parse_args(argv=None):
    return resolve_args(get_args_parser().parse_args(argv))


def checkpoint_name(args, tag):
    return f"{args.dataset}_{args.model}_embed_{args.embedding_dim}_seed_{args.seed}_{tag}_ckpt.pth"


def build_datasets(args, runtime):
    if args.dataset == "demo":
        if runtime.is_main:
            demo_data.ensure_demo_dataset(args.dataset_dir, **DEMO_DATA)
        utils.barrier(runtime)  # the other ranks wait for rank 0 to write the phantoms
    root = Path(args.dataset_dir)
    list_format = LIST_FORMAT[args.dataset]
    train_set = ImageListDataset(
        root / "train", args.train_image_list, list_format,
        transform=build_transform(args.img_size, True, args.rand_resize, args.hflip))
    test_set = ImageListDataset(root / "test", args.test_image_list, list_format,
                                classes=train_set.classes,
                                transform=build_transform(args.img_size, False))
    return train_set, test_set


def build_optimizer(model, args, device):
    """AdamW with two groups: pretrained backbones at lr x backbone-lr-mult, new layers at lr.
    Norms and biases get no weight decay."""
    backbone_ids = {id(p) for m in model.backbone_modules() for p in m.parameters()}
    groups = {}
    for name, param in model.named_parameters():
        lr_mult = args.backbone_lr_mult if id(param) in backbone_ids else 1.0
        decay = 0.0 if param.ndim <= 1 or name.endswith(".bias") else args.weight_decay
        group = groups.setdefault((lr_mult, decay), {"params": [], "lr_mult": lr_mult,
                                                     "weight_decay": decay, "lr": args.lr * lr_mult})
        group["params"].append(param)
    fused = args.fused_optimizer and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, fused=fused)


def build_scheduler(optimizer, args, steps_per_epoch):
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, args.epochs * steps_per_epoch)

    def factor(step):  # linear warmup from lr/warmup, then cosine to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(loss_sum, steps, epoch, step, save_dir):
    loss = (loss_sum / max(steps, 1)).item()
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss} at epoch {epoch}, step {step}: stopping. The checkpoints in "
            f"{save_dir} are from before the divergence; lower --lr, use --amp bf16 or none, or "
            "set --clip-grad 1.0, then --resume from the last one")
    return loss


def train_one_epoch(model, loss_fn, optimizer, scheduler, scaler, loader, epoch, args, runtime):
    """One pass of the PK sampler; returns the epoch's mean loss, active fraction and speed."""
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)  # summed on device: no sync per step
    active_sum = torch.zeros((), device=runtime.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    start, images_seen = time.perf_counter(), 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not runtime.is_main)
    for step, (images, labels) in enumerate(bar):
        images = images.to(runtime.device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(runtime.device, non_blocking=True)
        last_micro_step = (step + 1) % args.grad_accum == 0 or step + 1 == len(loader)
        # DDP: all-reduce gradients only on the micro-batch that ends an accumulation.
        sync = model.no_sync() if runtime.distributed and not last_micro_step else nullcontext()
        with sync:
            with utils.autocast(runtime.device, args.amp):
                embeddings = model(images)
            loss, active = loss_fn(embeddings, labels)  # fp32 inside the loss
            scaler.scale(loss / args.grad_accum).backward()
        if last_micro_step:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += loss.detach()
        active_sum += active
        images_seen += images.shape[0]
        if (step + 1) % args.print_freq == 0:
            mean_loss = check_finite(loss_sum, step + 1, epoch, step, args.save_dir)
            bar.set_postfix(loss=f"{mean_loss:.4f}", active=f"{(active_sum / (step + 1)).item():.2f}",
                            img_s=f"{images_seen * runtime.world_size / (time.perf_counter() - start):.1f}")
    steps = len(loader)
    elapsed = time.perf_counter() - start
    return {"train_loss": check_finite(loss_sum, steps, epoch, steps, args.save_dir),
            "active_triplets": (active_sum / steps).item(),
            "images_per_s": images_seen * runtime.world_size / elapsed, "train_time_s": elapsed}


def evaluate(model, loader, args, runtime):
    """Leave-one-out R@1, mAP and mP@1 on the test list, in percent (main process only)."""
    embeddings, labels = utils.extract_embeddings(model, loader, runtime, args.amp, args.channels_last)
    if not runtime.is_main:
        return {}
    result = evaluate_retrieval(embeddings, labels, ks=(1,), vote_ks=())
    return {"R@1": result["recall_at_k"]["1"], "mAP": result["map"],
            "mP@1": result["precision_at_k"]["1"]}


def prune_checkpoints(save_dir, args):
    if args.keep_checkpoints <= 0:
        return
    pattern = checkpoint_name(args, "epoch_*")
    epochs = sorted(save_dir.glob(pattern), key=lambda p: int(p.name.split("_epoch_")[1].split("_")[0]))
    for old in epochs[: -args.keep_checkpoints]:
        old.unlink()


def main(args):
    runtime = utils.setup_runtime(args.device)
    try:
        return run(args, runtime)
    finally:
        utils.cleanup_runtime(runtime)


def run(args, runtime):
    utils.print_args(args, runtime)
    save_dir = Path(args.save_dir)
    metrics_log = save_dir / "metrics.jsonl"
    checkpoint = None
    if args.resume:
        checkpoint = utils.load_checkpoint(args.resume)
        for key in ("model", "optimizer", "scheduler", "epoch", "model_config"):
            if key not in checkpoint:
                raise SystemExit(f"error: --resume {args.resume} is not a full training checkpoint "
                                 f"(no '{key}'); to fine-tune from bare weights, start a new run")
    elif runtime.is_main and metrics_log.exists() and not args.overwrite:
        raise SystemExit(f"error: {save_dir} already holds a run ({metrics_log}); continue it with "
                         "--resume <checkpoint>, choose another --save-dir, or pass --overwrite")
    if runtime.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume and metrics_log.exists():
            metrics_log.unlink()
        utils.write_json(save_dir / "args.json", vars(args))
    utils.seed_everything(args.seed + runtime.rank)

    # ---------------------------------------------------------------- data
    train_set, test_set = build_datasets(args, runtime)
    utils.log(runtime, f"train: {len(train_set)} images, test: {len(test_set)} images, "
                       f"classes: {', '.join(train_set.classes)}")
    sampler = PKSampler(train_set.targets.tolist(), args.labels_per_batch, args.samples_per_label,
                        args.batches_per_epoch, args.seed, runtime.rank, runtime.world_size)
    # Workers are not persistent: a new loader iterator each epoch draws its worker seeds from
    # the restored RNG, so a resumed run augments exactly as the uninterrupted one.
    loader_kwargs = dict(num_workers=args.workers, pin_memory=runtime.device.type == "cuda")
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    test_loader = DataLoader(test_set, batch_size=args.eval_batch_size,
                             sampler=utils.ShardSampler(len(test_set), runtime), **loader_kwargs)

    # ---------------------------------------------------------------- model
    config = dict(name=args.model, embedding_dim=args.embedding_dim, img_size=args.img_size,
                  convnext_name=args.convnext_name, vit_name=args.vit_name)
    if checkpoint is not None and checkpoint["model_config"] != config:
        raise SystemExit(f"error: --resume {args.resume} was trained with {checkpoint['model_config']}, "
                         f"but the flags ask for {config}; drop the contradicting flags")
    model = build_model(**config, pretrained=args.pretrained and checkpoint is None,
                        weights_dir=args.weights_dir, convnext_weights=args.convnext_weights,
                        vit_weights=args.vit_weights, grad_checkpointing=args.grad_checkpointing)
    model.to(runtime.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    raw_model = model  # what checkpoints hold: no DDP or compile wrappers
    optimizer = build_optimizer(model, args, runtime.device)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=args.amp == "fp16")
    loss_fn = TripletMarginLoss(args.margin, args.mining)
    utils.log(runtime, f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
                       f"parameters; batch {args.labels_per_batch} x {args.samples_per_label} per rank "
                       f"x {runtime.world_size} rank(s); {len(train_loader)} batches per epoch")

    start_epoch, best_metric = 1, -1.0
    if checkpoint is not None:
        utils.load_model_weights(raw_model, checkpoint["model"], args.resume)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        utils.set_rng_states(checkpoint["rng_states"][min(runtime.rank, len(checkpoint["rng_states"]) - 1)])
        start_epoch, best_metric = checkpoint["epoch"] + 1, checkpoint["best_metric"]
        utils.log(runtime, f"resumed from {args.resume} (epoch {checkpoint['epoch']})")
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    # ---------------------------------------------------------------- training
    if start_epoch == 1:  # epoch 0: the untrained model, the baseline the gain is measured from
        record = {"epoch": 0, **evaluate(raw_model, test_loader, args, runtime), "lr": 0.0}
        utils.log_record(runtime, metrics_log, record)
    for epoch in range(start_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        record = {"epoch": epoch, **train_one_epoch(model, loss_fn, optimizer, scheduler, scaler,
                                                    train_loader, epoch, args, runtime)}
        record["lr"] = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]
        evaluated = epoch % args.eval_freq == 0 or epoch == args.epochs
        if evaluated:
            record.update(evaluate(raw_model, test_loader, args, runtime))
        record["time_s"] = time.perf_counter() - epoch_start
        # RNG states of every rank, so a resumed run draws what the uninterrupted one would have.
        states = [utils.rng_states()]
        if runtime.distributed:
            states = [None] * runtime.world_size
            torch.distributed.all_gather_object(states, utils.rng_states())
        if not runtime.is_main:
            continue
        utils.log_record(runtime, metrics_log, record)
        is_best = evaluated and record["R@1"] > best_metric
        if is_best:
            best_metric = record["R@1"]
        state = {
            "format_version": utils.CHECKPOINT_FORMAT_VERSION, "model": raw_model.state_dict(),
            "model_config": config, "classes": train_set.classes, "epoch": epoch,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng_states": states,
            "args": vars(args),
            "best_metric": best_metric, "metrics": record,
        }
        utils.save_checkpoint(state, save_dir / checkpoint_name(args, f"epoch_{epoch}"))
        if is_best:
            utils.save_checkpoint(state, save_dir / checkpoint_name(args, "best"))
        prune_checkpoints(save_dir, args)
    utils.log(runtime, f"done; best R@1 {best_metric:.2f}; checkpoints in {save_dir}")
    return best_metric


if __name__ == "__main__":
    main(parse_args())
