"""Train an embedding model for chest X-ray retrieval with PK batches and a triplet loss.

Single GPU (the paper's configuration, pretrained backbones, COVIDx lists):
    python train.py --model hybrid_convnext_vit --embedding-dim 1024 --dataset covid \
        --dataset-dir ./data --train-image-list ./train_split.txt \
        --test-image-list ./test_COVIDx4.txt --epochs 50 --lr 0.0001 --batch-size 16
The seed's loss and optimisation (Adam at a constant 1e-4, batch-hard triplet loss only): add --recipe seed.
Several GPUs / nodes (each rank draws its own P x K batches):
    torchrun --nproc_per_node=4 train.py ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...
CPU, no data, no weights (synthetic phantoms, small backbones; about 5 minutes on 2 cores):
    python train.py --dataset demo

Model selection never sees the test set: the best checkpoint is the one with the best mAP on
the validation data (--val-image-list, or by default a patient-grouped --val-fraction of the
training list); test metrics are logged every epoch for reference only.

Outputs in --save-dir: args.json, metrics.jsonl (one line per epoch; loss terms start with
train_, retrieval numbers with val_ or test_), checkpoints
`{dataset}_{model}_embed_{dim}_seed_{seed}_epoch_{epoch}_ckpt.pth` and `..._best_ckpt.pth` (best
validation mAP).
"""
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cxr import engine, faults, memory_check, progress, splits
from cxr.atomic_files import write_json
from cxr.checkpoints import (
    CHECKPOINT_FORMAT_VERSION,
    checkpoint_name,
    is_weights_only,
    link_best,
    load_model_weights,
    prune_checkpoints,
    save_checkpoint,
)
from cxr.cli import print_args, run_cli
from cxr.errors import UserError
from cxr.recipe import (
    PARAM_GROUPING,
    ModelWithLoss,
    build_criterion,
    build_optimizer,
    build_scheduler,
    collapse_warning,
)
from cxr.run_data import build_datasets
from cxr.runtime import (
    ShardSampler,
    average_buffers,
    cleanup_runtime,
    distributed_module,
    log,
    log_record,
    rng_states,
    seed_everything,
    set_rng_states,
    setup_runtime,
)
from cxr.splits import digest
from cxr.tensorboard_log import TensorBoardLog
from cxr.train_args import LEGACY_CONFIG, get_args_parser, model_config, parse_args
from model import build_model, check_pretrained
from sampler import PKSampler

# Below this many images in a class of the validation or test data, a warning: one query more
# or less right moves the numbers by many points.
MIN_PER_CLASS = 5


def main(args):
    progress.set_mode(args.progress)
    runtime = setup_runtime(args.device)
    try:
        with faults.stop_on_signals():
            return run(args, runtime)
    except faults.StopRequested as stop:  # SIGTERM / Ctrl-C: the last completed epoch is on disk
        faults.report_stop(stop, args.save_dir, checkpoint_name(args, "epoch_*"), runtime)
        raise SystemExit(stop.exit_code)
    finally:
        cleanup_runtime(runtime)


def run(args, runtime):
    """The whole run, phase by phase; the order matters (every random draw is seeded)."""
    print_args(args, runtime, get_args_parser())
    save_dir, checkpoint, warm_start = prepare_save_dir(args, runtime)
    board = None
    if args.tensorboard is not None:  # before the data: a missing package stops the run at once
        # --overwrite starts the default folder afresh; a folder the user named may hold other runs.
        board = TensorBoardLog(Path(args.tensorboard) if args.tensorboard else save_dir / "tensorboard", runtime,
                               fresh=args.overwrite and checkpoint is None and not args.tensorboard)
    seed_everything(args.seed + runtime.rank)
    data = load_data(args, runtime)
    config = model_config(args)
    check_resume_fits(args, config, checkpoint, warm_start)
    parts = build_training(args, runtime, config, data, checkpoint, warm_start, save_dir)
    start_epoch, best_metric, best_epoch = restore(args, runtime, parts, data, checkpoint, warm_start, save_dir)
    if runtime.distributed:
        parts.objective = distributed_module(parts.objective, runtime)
    try:
        best_metric, best_epoch = fit(args, runtime, parts, data, save_dir, start_epoch, best_metric, best_epoch,
                                      board)
    finally:
        if board is not None:
            board.close()
    log(runtime, f"done; best {data.select_split} mAP {best_metric:.2f} at epoch {best_epoch} "
                 f"({checkpoint_name(args, 'best')}); checkpoints in {save_dir}")
    metrics_log = save_dir / "metrics.jsonl"
    if runtime.is_main and metrics_log.exists():
        from cxr import plots  # here: matplotlib only when a run ends

        log(runtime, f"learning curves: {plots.learning_curves(metrics_log)}")
    return best_metric


# ---------------------------------------------------------------- save folder and resume
def prepare_save_dir(args, runtime):
    """(save_dir, checkpoint to continue or None, weights-only warm start or None), with the
    folder checked and readied: a run already there is refused unless resumed or overwritten."""
    save_dir = Path(args.save_dir)
    metrics_log = save_dir / "metrics.jsonl"
    if runtime.is_main:
        faults.check_save_dir(save_dir)  # an unwritable folder fails now, not after an epoch
    checkpoint = faults.resolve_resume(args, checkpoint_name(args, "epoch_*"), runtime)
    warm_start = None
    if is_weights_only(checkpoint):  # a best or exported file: the weights, no training state
        warm_start, checkpoint = checkpoint, None
        log(runtime, f"warm start: --resume {args.resume} holds weights only (no optimiser, "
                     "schedule or epoch); this is a new run from epoch 1 starting from those "
                     "weights. To continue a run, resume from an epoch checkpoint")
    if checkpoint is not None:
        for key in ("model", "optimizer", "scheduler", "epoch", "model_config"):
            if key not in checkpoint:
                raise SystemExit(f"error: --resume {args.resume} is not a full training checkpoint "
                                 f"(no '{key}'); to fine-tune from bare weights, start a new run")
    elif runtime.is_main and metrics_log.exists() and not args.overwrite:
        if warm_start is not None:
            raise SystemExit(f"error: {save_dir} already holds a run ({metrics_log}) and a warm start "
                             "from weights is a new run: choose another --save-dir, or pass --overwrite")
        raise SystemExit(f"error: {save_dir} already holds a run ({metrics_log}); continue it with "
                         "--resume <checkpoint>, choose another --save-dir, or pass --overwrite")
    if args.pretrained and checkpoint is None and warm_start is None:
        # Every missing weights file named before the data is read.
        check_pretrained(args.model, args.convnext_name, args.vit_name, args.weights_dir,
                         args.convnext_weights, args.vit_weights)
    if runtime.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and checkpoint is None and metrics_log.exists():
            metrics_log.unlink()
        if checkpoint is not None:  # one line per epoch up to the checkpoint's, whatever a kill left
            faults.trim_metrics(metrics_log, checkpoint["epoch"], checkpoint.get("metrics"))
        if faults.remove_stale_temporaries(save_dir):
            print(f"removed the temporary files of interrupted saves in {save_dir}", flush=True)
        write_json(save_dir / "args.json", vars(args))
    return save_dir, checkpoint, warm_start


def check_resume_fits(args, config, checkpoint, warm_start):
    """A resumed run (or a warm start) must have the checkpoint's model, and a resumed run its
    loss: continuing with another one would silently be another run."""
    source = checkpoint if checkpoint is not None else warm_start  # a warm start must fit the flags too
    if source is not None:
        stored = {**LEGACY_CONFIG, **source["model_config"]}  # keys saved before they existed
        asked = {**LEGACY_CONFIG, **config}
        if stored != asked:
            flags = {"name": "model", "branch_heads": "branch-loss-weight"}
            shown = {True: "> 0", False: "0"}  # branch_heads is --branch-loss-weight > 0

            def flag(key, value):
                return f"--{flags.get(key, key).replace('_', '-')} {shown.get(value, value)}"
            differ = [f"{flag(k, stored.get(k))} (flags: {flag(k, asked.get(k))})"
                      for k in sorted(set(stored) | set(asked)) if stored.get(k) != asked.get(k)]
            raise SystemExit(f"error: --resume {args.resume} was trained with another model: "
                             f"{'; '.join(differ)}; give the checkpoint's values (a checkpoint "
                             "saved before --fusion existed: --fusion seed --vit-stem patch "
                             "--branch-loss-weight 0), or drop the contradicting flags")
    if checkpoint is not None:
        # The loss, and how the labels are read (a multi-label run's views, uncertain-label policy,
        # label files: other values are other labels for the same films).
        loss_args = ("mining", "margin", "soft_margin", "id_loss_weight", "id_loss_scale", "label_smoothing",
                     "label_mode", "views", "uncertain", "label_file", "metadata_file", "shuffle_labels",
                     "branch_loss_weight")
        trained_with = {"soft_margin": False, "shuffle_labels": False, **checkpoint.get("args", {})}
        if args.model != "hybrid_convnext_vit":  # the weight of heads that only the hybrid has
            loss_args = loss_args[:-1]
        changed = [f"--{k.replace('_', '-')} {trained_with[k]} -> {getattr(args, k)}"
                   for k in loss_args if k in trained_with and trained_with[k] != getattr(args, k)]
        if changed:
            raise SystemExit(f"error: --resume {args.resume} was trained with another loss or labels ("
                             f"{', '.join(changed)}); give the checkpoint's values, or start a new "
                             "run in another --save-dir")


# ---------------------------------------------------------------- data
@dataclass
class TrainData:
    train_set: object
    val_set: object
    test_set: object
    sampler: PKSampler
    train_loader: DataLoader
    eval_loaders: dict  # split -> loader
    select_split: str  # "val", or "test" without validation data (the seed's way)
    split_digest: str  # of the images the best checkpoint is chosen on
    label_mode: str = "findings"  # multi-label lists: train on findings or on combinations

    @property
    def classes(self):
        return self.train_set.classes

    @property
    def by_findings(self):
        """Whether the losses and the sampler see findings (a multi-label list, --label-mode findings)."""
        return self.train_set.multilabel and self.label_mode == "findings"

    @property
    def loss_labels(self):
        """Names of what the identity head has one logit for: findings or classes."""
        return self.train_set.findings if self.by_findings else self.classes

    @property
    def selection_key(self):
        return f"{self.select_split}_mAP"


def load_data(args, runtime):
    """The training, validation and test sets, checked for leakage, the PK sampler and loaders."""
    train_set, val_set, test_set = build_datasets(args, runtime)
    splits.check_splits([splits.Split.from_dataset(name, dataset) for name, dataset in
                         (("train", train_set), ("validation", val_set), ("test", test_set)) if dataset],
                        args.allow_patient_overlap, log=lambda message: log(runtime, message))
    if args.shuffle_labels:
        shuffle_labels(train_set, args.seed)
        log(runtime, "--shuffle-labels: the training images' labels are permuted at random (the "
                     "data-randomisation check); validation and test keep theirs")
    classes = train_set.classes
    log(runtime, f"train: {len(train_set)} images, validation: "
                 f"{len(val_set) if val_set else 0}, test: {len(test_set)}; classes: {', '.join(classes)}")
    if train_set.multilabel:
        log(runtime, f"multi-label: {len(train_set.findings)} findings ({', '.join(train_set.findings)}) in "
                     f"{len(classes)} combinations; training on the "
                     f"{'findings' if args.label_mode == 'findings' else 'combinations as classes'} "
                     "(--label-mode); validation relevance: a shared finding")
    # What the best checkpoint was chosen on: a resumed run compares bests only on the same images.
    selection_set = val_set or test_set
    split_digest = digest(sorted(str(p.relative_to(selection_set.image_root)) for p in selection_set.paths))
    for name, dataset in (("validation", val_set), ("test", test_set)):
        fewest = None
        if dataset is not None:
            fewest = int(dataset.finding_matrix().sum(0).min()) if train_set.multilabel else \
                min(torch.bincount(dataset.targets, minlength=len(classes)).tolist())
        if dataset is not None and fewest < MIN_PER_CLASS:
            log(runtime, f"warning: the {name} images number {len(dataset)}, {fewest} in the "
                         f"smallest class (fewer than {MIN_PER_CLASS}): one image more or less "
                         f"right moves mAP by many points, so the {name} numbers"
                         f"{' and the choice of the best epoch' if name == 'validation' else ''} "
                         "cannot be trusted; use more images per class")
    if val_set is None:
        log(runtime, "warning: no validation data (--val-fraction 0): the best checkpoint is "
                     "chosen on the test list, as the seed did; its test numbers are optimistic")
    by_findings = train_set.multilabel and args.label_mode == "findings"
    try:
        sampler = PKSampler(train_set.finding_matrix().numpy() if by_findings else train_set.targets.tolist(),
                            args.labels_per_batch, args.samples_per_label,
                            args.batches_per_epoch, args.seed, runtime.rank, runtime.world_size,
                            label_names=train_set.findings if by_findings else classes)
    except ValueError as error:  # P larger than the classes, P or K below 1: the user's flags
        raise UserError(str(error)) from error
    # Workers are not persistent: a new loader iterator each epoch draws its worker seeds from
    # the restored RNG, so a resumed run augments exactly as the uninterrupted one.
    loader_kwargs = dict(num_workers=args.workers, pin_memory=runtime.device.type == "cuda")
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    eval_loaders = {split: DataLoader(dataset, batch_size=args.eval_batch_size,
                                      sampler=ShardSampler(len(dataset), runtime), **loader_kwargs)
                    for split, dataset in (("val", val_set), ("test", test_set)) if dataset is not None}
    return TrainData(train_set, val_set, test_set, sampler, train_loader, eval_loaders,
                     "val" if val_set is not None else "test", split_digest, args.label_mode)


def shuffle_labels(dataset, seed):
    """Permute `dataset`'s labels among its images in place (a finding set moves whole): every
    class keeps its count, so the PK batches are drawn as before, from labels that say nothing."""
    order = torch.randperm(len(dataset.targets), generator=torch.Generator().manual_seed(seed))
    dataset.targets = dataset.targets[order]


# ---------------------------------------------------------------- model, loss and optimiser
@dataclass
class Training:
    config: dict
    model: nn.Module  # what checkpoints hold: no DDP or compile wrappers
    criterion: nn.Module
    branch_criteria: nn.ModuleDict | None
    objective: nn.Module  # model + losses, compiled and DDP-wrapped as asked
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    guard: faults.NonFiniteGuard
    grouping: int


def build_training(args, runtime, config, data, checkpoint, warm_start, save_dir):
    model = build_model(**config, pretrained=args.pretrained and checkpoint is None and warm_start is None,
                        weights_dir=args.weights_dir, convnext_weights=args.convnext_weights,
                        vit_weights=args.vit_weights, grad_checkpointing=args.grad_checkpointing)
    model.to(runtime.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.memory_check:  # before the first step: a clear stop instead of the kernel's kill
        memory_check.check(model, args, runtime.device, lambda line: log(runtime, line), runtime)
    outputs = len(data.loss_labels)
    criterion = build_criterion(args, outputs).to(runtime.device)
    branch_criteria = None
    if config.get("branch_heads"):
        branch_criteria = nn.ModuleDict({b: build_criterion(args, outputs) for b in
                                         model.BRANCHES}).to(runtime.device)
    label_table = data.train_set.combination_matrix() if data.by_findings else None
    objective = ModelWithLoss(torch.compile(model) if args.compile else model, criterion,
                              runtime.device, args.amp, branch_criteria, args.branch_loss_weight, label_table)
    # A run saved before the grouping was recorded continues with its own groups.
    grouping = PARAM_GROUPING if checkpoint is None else checkpoint.get("param_grouping", 1)
    optimizer = build_optimizer(objective, args, runtime.device, grouping)
    steps_per_epoch = math.ceil(len(data.train_loader) / args.grad_accum)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=args.amp == "fp16")
    guard = faults.NonFiniteGuard(runtime, args.skip_nonfinite, check_grads=not scaler.is_enabled())
    if runtime.is_main:  # room for the checkpoints, before any GPU time is spent
        faults.check_free_space(save_dir, faults.checkpoint_bytes(model, optimizer))
    log(runtime, f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
                 f"parameters; recipe {args.recipe}: {args.mining} "
                 f"{'soft-margin' if args.soft_margin else f'margin {args.margin:g}'} triplet"
                 f"{f' + {args.id_loss_weight:g} x identity loss' if args.id_loss_weight else ''}"
                 f"{f', and {args.branch_loss_weight:g} x the same on each branch' if branch_criteria else ''}, "
                 f"neck {args.neck}, {args.optimizer} lr {args.lr:g} ({args.schedule}); batch "
                 f"{args.labels_per_batch} x {args.samples_per_label} per rank x "
                 f"{runtime.world_size} rank(s); {len(data.train_loader)} batches per epoch")
    return Training(config, model, criterion, branch_criteria, objective, optimizer, scheduler, scaler, guard,
                    grouping)


def restore(args, runtime, parts, data, checkpoint, warm_start, save_dir):
    """(first epoch, best metric, best epoch): the checkpoint's state loaded into `parts` when
    resuming, its weights for a warm start, else a fresh start."""
    if warm_start is not None:
        load_model_weights(parts.model, warm_start["model"], args.resume)
    if checkpoint is None:
        return 1, -1.0, None
    load_model_weights(parts.model, checkpoint["model"], args.resume)
    try:
        parts.criterion.load_state_dict(checkpoint.get("criterion", {}))
        if parts.branch_criteria is not None:
            parts.branch_criteria.load_state_dict(checkpoint.get("branch_criteria", {}))
    except RuntimeError as error:
        raise SystemExit(f"error: --resume {args.resume} was trained with another loss "
                         f"(--id-loss-weight, or its classes): {error}") from error
    try:
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # parameter groups of another recipe or an older version
        raise SystemExit(f"error: the optimiser state in {args.resume} does not fit this run "
                         f"({error}); resume with the flags it was trained with (its args are "
                         "in the checkpoint and in args.json), or start a new run") from error
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng_states"][min(runtime.rank, len(checkpoint["rng_states"]) - 1)])
    start_epoch, best_metric, best_epoch = checkpoint["epoch"] + 1, -1.0, None
    if checkpoint.get("selection") == data.selection_key and checkpoint.get("split") == data.split_digest:
        best_metric, best_epoch = checkpoint["best_metric"], checkpoint.get("best_epoch")
    else:  # another selection rule or validation split: its best cannot be compared
        log(runtime, f"warning: {args.resume} chose its best checkpoint by "
                     f"{checkpoint.get('selection', 'test R@1 (older version)')} or on other "
                     f"validation images; this run selects by {data.selection_key} from epoch "
                     f"{start_epoch} on")
    log(runtime, f"resumed from {args.resume} (epoch {checkpoint['epoch']})")
    best_file = save_dir / checkpoint_name(args, "best")
    resumed_file = Path(args.resume)
    if (runtime.is_main and best_epoch == checkpoint["epoch"]
            and resumed_file.parent.resolve() == save_dir.resolve()
            and not (best_file.exists() and os.path.samefile(best_file, resumed_file))):
        link_best(resumed_file, best_file, checkpoint)  # a kill came before the link
    return start_epoch, best_metric, best_epoch


# ---------------------------------------------------------------- training
def fit(args, runtime, parts, data, save_dir, start_epoch, best_metric, best_epoch, board=None):
    """Train from start_epoch to --epochs, evaluating, logging and saving every epoch; the best
    checkpoint is chosen on data.selection_key. `board`: a TensorBoardLog, or None. Returns
    (best metric, best epoch)."""
    metrics_log = save_dir / "metrics.jsonl"
    selection = {}  # the selection split's embeddings, for the projector

    def evaluate_all():
        record = {}
        for split, loader in data.eval_loaders.items():
            keep = selection if board is not None and split == data.select_split else None
            record.update(engine.evaluate(parts.model, loader, args, runtime, split, keep))
        return record

    def logged(record):
        log_record(runtime, metrics_log, record)
        if board is not None:
            board.epoch(record)

    if start_epoch == 1:  # epoch 0: the untrained model, the baseline the gain is measured from
        logged({"epoch": 0, **evaluate_all(), "lr": 0.0})
    for epoch in range(start_epoch, args.epochs + 1):
        faults.check_stop(runtime)  # a stop signal during the last evaluation or save
        data.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        record = {"epoch": epoch, **engine.train_one_epoch(parts.objective, parts.optimizer, parts.scheduler,
                                                           parts.scaler, data.train_loader, epoch, args, runtime,
                                                           parts.guard, board.step if board else None)}
        record["lr"] = parts.optimizer.param_groups[0]["lr"] / parts.optimizer.param_groups[0]["lr_mult"]
        average_buffers(parts.model, runtime)  # one model on every rank, as evaluated and saved
        evaluated = epoch % args.eval_freq == 0 or epoch == args.epochs
        if evaluated:
            record.update(evaluate_all())
        record["time_s"] = time.perf_counter() - epoch_start
        # RNG states of every rank, so a resumed run draws what the uninterrupted one would have.
        states = [rng_states()]
        if runtime.distributed:
            states = [None] * runtime.world_size
            torch.distributed.all_gather_object(states, rng_states())
        if not runtime.is_main:
            continue
        warning = collapse_warning(record, args)
        if warning:
            print(warning, flush=True)
        key = data.selection_key
        is_best = evaluated and record[key] > best_metric
        if evaluated and record[key] == best_metric:
            log(runtime, f"epoch {epoch} ties the best {key} {best_metric:.2f}: the "
                         f"earlier epoch {best_epoch} stays the best")
        if is_best:
            log(runtime, f"epoch {epoch} kept as best: {key} {record[key]:.2f}"
                         + (f" > {best_metric:.2f} (epoch {best_epoch})" if best_epoch else ""))
            best_metric, best_epoch = record[key], epoch
        record["best_epoch"] = best_epoch
        logged(record)
        save_epoch(args, parts, data, save_dir, epoch, record, states, best_metric, best_epoch, is_best)
        if is_best and board is not None and selection:  # after the save: a failure here loses no epoch
            dataset = data.eval_loaders[data.select_split].dataset
            board.projector(selection["embeddings"], selection["labels"], dataset, data.classes, epoch,
                            data.select_split)
    return best_metric, best_epoch


def save_epoch(args, parts, data, save_dir, epoch, record, states, best_metric, best_epoch, is_best):
    """The epoch's full checkpoint (atomically), the best link, and the pruning of old epochs."""
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION, "model": parts.model.state_dict(),
        "model_config": parts.config, "classes": data.classes, "epoch": epoch,
        "findings": data.train_set.findings if data.train_set.multilabel else None,
        "criterion": parts.criterion.state_dict(),
        "branch_criteria": parts.branch_criteria.state_dict() if parts.branch_criteria is not None else {},
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(), "rng_states": states, "args": vars(args),
        "best_metric": best_metric, "best_epoch": best_epoch, "selection": data.selection_key,
        "split": data.split_digest, "bit_depth": data.train_set.bit_depth, "param_grouping": parts.grouping,
        "metrics": record,
    }
    epoch_file = save_dir / checkpoint_name(args, f"epoch_{epoch}")
    save_checkpoint(state, epoch_file)
    if is_best:  # a kill before this link is repaired on resume (see restore)
        link_best(epoch_file, save_dir / checkpoint_name(args, "best"), state)
    prune_checkpoints(save_dir, args, epoch)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
