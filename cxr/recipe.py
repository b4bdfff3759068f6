"""The training objective and its optimisation, as train.py builds them from its flags: the model
and its loss as one module (with the hybrid's per-branch losses), the loss, AdamW/Adam with
parameter groups, the warmup + cosine schedule, and the collapse check of a triplet embedding."""
import math

import torch
import torch.nn as nn

from cxr.runtime import autocast
from loss import CosineSoftmaxLoss, RetrievalLoss, TripletMarginLoss


class ModelWithLoss(nn.Module):
    """The model and its loss as one module, so that DDP all-reduces the gradients of the
    identity classifier too; the model runs under autocast, the loss in fp32."""

    def __init__(self, model, criterion, device, amp, branch_criteria=None, branch_weight=0.0, label_table=None):
        """label_table: (classes, findings) bool for multi-label training: the batch's class
        (finding combination) ids become their rows of findings before the losses."""
        super().__init__()
        self.register_buffer("label_table", None if label_table is None else label_table.to(device),
                             persistent=False)
        self.model, self.criterion = model, criterion
        self.device, self.amp = device, amp
        # Per-branch losses: each branch's own head gets the full objective (its own identity
        # classifier), so a branch that learns slower is still pushed to learn.
        self.branch_criteria = branch_criteria
        self.branch_weight = branch_weight

    def forward(self, images, labels):
        if self.label_table is not None:
            labels = self.label_table[labels]
        with autocast(self.device, self.amp):
            if self.branch_criteria is None:
                embeddings = self.model(images)
            else:
                embeddings, branch_embeddings = self.model(images, return_branch_embeddings=True)
        loss, stats = self.criterion(embeddings, labels)
        if self.branch_criteria is not None:
            for branch, criterion in self.branch_criteria.items():
                branch_loss, _ = criterion(branch_embeddings[branch], labels)
                loss = loss + self.branch_weight * branch_loss
                stats[f"branch_{branch}"] = branch_loss.detach()
        return loss, stats


def build_criterion(args, num_classes):
    identity = None
    if args.id_loss_weight > 0:
        identity = CosineSoftmaxLoss(args.embedding_dim, num_classes, args.id_loss_scale,
                                     args.label_smoothing)
    triplet = TripletMarginLoss(args.margin, args.mining, soft=args.soft_margin)
    return RetrievalLoss(triplet, identity, args.id_loss_weight)


# Parameters that are positions or tokens rather than weights: decaying them pulls every
# position towards the same embedding (timm's and DeiT's recipes exempt them too).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


# Checkpoints record how their optimiser's parameters were grouped: 1 (before position
# embeddings and class tokens were exempt from decay) or 2; a resume rebuilds the same groups.
PARAM_GROUPING = 2


def build_optimizer(objective, args, device, grouping=PARAM_GROUPING):
    """Adam(W) with two groups: pretrained backbones at lr x backbone-lr-mult, new layers (head,
    MXA, identity classifier) at lr. Norms, biases, position embeddings and class tokens get no
    weight decay."""
    backbone_ids = {id(p) for m in objective.model.backbone_modules() for p in m.parameters()}
    groups = {}
    for name, param in objective.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = args.backbone_lr_mult if id(param) in backbone_ids else 1.0
        exempt = param.ndim <= 1 or name.endswith(".bias")
        exempt = exempt or (grouping >= 2 and name.split(".")[-1] in NO_DECAY_NAMES)
        decay = 0.0 if exempt else args.weight_decay
        group = groups.setdefault((lr_mult, decay), {"params": [], "lr_mult": lr_mult,
                                                     "weight_decay": decay, "lr": args.lr * lr_mult})
        group["params"].append(param)
    fused = args.fused_optimizer and device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer(list(groups.values()), lr=args.lr, fused=fused)


def build_scheduler(optimizer, args, steps_per_epoch):
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, args.epochs * steps_per_epoch)

    def factor(step):  # linear warmup from lr/warmup, then cosine to min_lr_ratio
        if args.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def collapse_warning(record, args):
    """A message when the embedding has collapsed, else None. Collapse: all images map to
    (nearly) one point, so every triplet costs exactly the margin; batch-hard mining from
    random weights falls into it, and a zero gradient at distance 0 keeps it there."""
    at_collapse = math.log(2.0) if args.soft_margin else args.margin  # the loss when d_ap = d_an = 0
    pinned = abs(record["train_triplet"] - at_collapse) < 0.05 * at_collapse
    if not args.soft_margin:  # with the soft margin a collapsed batch counts no triplet as violated
        pinned = pinned and record["active_triplets"] > 0.95
    if record["embedding_spread"] < 0.05 or pinned:
        return (f"warning: the embedding looks collapsed at epoch {record['epoch']} (mean pairwise "
                f"distance {record['embedding_spread']:.3f} in a batch, {record['active_triplets']:.0%} "
                f"of triplets active, triplet loss {record['train_triplet']:.3f}, its value at "
                f"collapse {at_collapse:.3f}). Try --recipe strong (BN neck and identity loss), --mining "
                "batch_all, or a lower --lr")
    return None
