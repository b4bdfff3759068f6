"""One training run's inner loop, as train.py calls it: a training step, an epoch over the PK
sampler, and the per-epoch retrieval evaluation of a split."""
import time
from contextlib import nullcontext

import torch

from cxr import faults
from cxr.checkpoints import checkpoint_name
from cxr.embeddings import extract_embeddings, has_branches, mean_branch_shares
from cxr.multilabel_metrics import evaluate_multilabel
from cxr.progress import progress
from cxr.retrieval_metrics import evaluate_retrieval
from cxr.runtime import log


def train_step(objective, optimizer, scheduler, scaler, images, labels, args,
               accum_steps=1, step_now=True, guard=None, step=0):
    """Forward, loss and backward of one PK batch; with step_now, also the optimiser step.
    The loss is divided by accum_steps, the number of batches whose gradients this step
    averages. The guard sees the loss and gradient norm (see faults.NonFiniteGuard).
    Returns (loss, stats) as detached 0-dim tensors (no host sync)."""
    loss, stats = objective(images, labels)
    scaler.scale(loss / accum_steps).backward()
    if guard is not None:
        guard.observe_loss(step, loss.detach())
    if step_now:
        grad_norm = None
        if args.clip_grad:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), args.clip_grad)
        if guard is None or guard.allow_step(step, objective.parameters(), grad_norm):
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return loss.detach(), stats


def train_one_epoch(objective, optimizer, scheduler, scaler, loader, epoch, args, runtime, guard=None,
                    on_log=None):
    """One pass of the PK sampler; returns the epoch's mean losses (over its finite steps),
    active fraction, embedding spread, speed and skipped steps. The guard stops the run on a
    NaN/Inf loss or gradient, or skips that step (--skip-nonfinite); a stop signal (SIGTERM,
    Ctrl-C) ends the epoch at the next step, unsaved (faults.py). on_log(global step, {"loss",
    "lr"}) sees the running loss every --print-freq steps (train.py --tensorboard)."""
    objective.train()
    guard = guard or faults.NonFiniteGuard(runtime)
    guard.start_epoch()
    sums = {key: torch.zeros((), device=runtime.device)  # summed on device: no sync per step
            for key in ("loss", "triplet", "id", "active", "spread", "finite")}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    start, images_seen, steps = time.perf_counter(), 0, len(loader)
    pattern = checkpoint_name(args, "epoch_*")
    bar = progress(loader, f"epoch {epoch}", enabled=runtime.is_main)
    for step, (images, labels) in enumerate(bar):
        images = images.to(runtime.device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(runtime.device, non_blocking=True)
        group_start = step - step % args.grad_accum
        group_size = min(args.grad_accum, steps - group_start)  # the last group may be shorter
        last_micro_step = step == group_start + group_size - 1
        # DDP: all-reduce gradients only on the micro-batch that ends an accumulation.
        sync = objective.no_sync() if runtime.distributed and not last_micro_step else nullcontext()
        with sync:
            loss, stats = train_step(objective, optimizer, scheduler, scaler, images, labels, args,
                                     group_size, last_micro_step, guard, step)
        finite = torch.isfinite(loss)  # skipped non-finite steps stay out of the means
        sums["finite"] += finite
        for key, value in (("loss", loss), *stats.items()):  # incl. branch_* losses of the hybrid
            sums[key] = sums.get(key, 0.0) + torch.where(finite, value, 0.0)
        images_seen += images.shape[0]
        faults.check_stop(runtime, step, args.print_freq)
        if (step + 1) % args.print_freq == 0:
            guard.check(epoch, loader, args.save_dir, pattern)
            done = sums["finite"].clamp(min=1)
            running = (sums["loss"] / done).item()
            bar.set_postfix(loss=f"{running:.4f}", active=f"{(sums['active'] / done).item():.2f}",
                            img_s=f"{images_seen * runtime.world_size / (time.perf_counter() - start):.1f}")
            if on_log is not None:
                group = optimizer.param_groups[0]
                on_log((epoch - 1) * steps + step + 1, {"loss": running, "lr": group["lr"] / group.get("lr_mult", 1)})
    guard.check(epoch, loader, args.save_dir, pattern)
    elapsed = time.perf_counter() - start
    done = sums["finite"].clamp(min=1)
    record = {f"train_{key}": (sums[key] / done).item()
              for key in ("loss", "triplet", "id", *(k for k in sums if k.startswith("branch_")))}
    record.update(active_triplets=(sums["active"] / done).item(),
                  embedding_spread=(sums["spread"] / done).item(), train_skipped_steps=guard.skipped,
                  images_per_s=images_seen * runtime.world_size / elapsed, train_time_s=elapsed)
    return record


def evaluate(model, loader, args, runtime, split, keep=None):
    """Leave-one-out R@1, mAP and mP@1 of one split, in percent, keys prefixed by the split
    (main process only); images of the query's own patient are left out, as in test.py. A
    multi-label split is scored with shared-finding relevance (test.py's --relevance any). For
    the hybrid also each branch's share of the similarity to the top-1 neighbour. `keep` (a dict)
    receives the embeddings and labels on the main process (train.py --tensorboard's projector)."""
    with_branches = has_branches(model)
    embeddings, labels, *features = extract_embeddings(model, loader, runtime, args.amp, args.channels_last,
                                                       branch_features=with_branches)
    if not runtime.is_main:
        return {}
    if keep is not None:
        keep.update(embeddings=embeddings, labels=labels)
    dataset = loader.dataset
    if getattr(dataset, "multilabel", False):
        table = dataset.combination_matrix().to(labels.device)[labels]

        def score(**groups):
            return evaluate_multilabel(embeddings, table, ks=(1,), knn_ks=(1,), per_finding=False,
                                       return_per_query=True, **groups)
    else:
        def score(**groups):
            return evaluate_retrieval(embeddings, labels, ks=(1,), vote_ks=(), return_per_query=True, **groups)
    try:
        result, per_query = score(query_groups=dataset.patients)
    except ValueError as error:  # e.g. every class of the split is one patient
        log(runtime, f"warning: {split}: {error}; this split is scored with same-patient images")
        result, per_query = score()
    record = {f"{split}_R@1": result["recall_at_k"]["1"], f"{split}_mAP": result["map"],
              f"{split}_mP@1": result["precision_at_k"]["1"]}
    if with_branches:
        shares = mean_branch_shares(model, features[0], per_query["top_indices"][:, 0], embeddings, features[0])
        record.update({f"{split}_{b}_share": share for b, share in (shares or {}).items()})
    return record
