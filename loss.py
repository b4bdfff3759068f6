"""Triplet margin loss with online mining inside a PK batch.

    loss_fn = TripletMarginLoss(margin=0.2, mining="batch_hard")
    loss, active = loss_fn(embeddings, labels)   # active: fraction of triplets with loss > 0

batch_hard (Hermans et al., 2017): for every anchor, its farthest positive and nearest negative.
batch_all: every valid (anchor, positive, negative) triplet; the loss is averaged over the
active ones (loss > 0), so easy triplets do not dilute the gradient as training progresses.
Distances are Euclidean, computed in fp32 whatever the autocast dtype.

Multi-label batches: labels may be a (B, F) 0/1 table of findings instead of (B,) class ids; two
films are then positives when they share a finding (the relevance test.py scores with
--relevance any), and the identity loss becomes one logit per finding (binary cross-entropy).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MININGS = ("batch_hard", "batch_all")


def pairwise_distances(x):
    """Euclidean distance matrix (B, B) whose gradient stays finite where two rows coincide."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    # sqrt'(0) is infinite: take the root only where d2 > 0, so identical embeddings get
    # distance 0 with a zero (not NaN) gradient.
    zero = d2 == 0
    return torch.where(zero, torch.zeros_like(d2), torch.sqrt(torch.where(zero, torch.ones_like(d2), d2)))


def share_a_label(labels):
    """(B, B) bool: whether two films are positives; (B,) class ids: the same class, (B, F)
    finding tables: at least one finding in common."""
    if labels.dim() == 2:
        labels = labels.float()
        return labels @ labels.T > 0
    return labels[:, None] == labels[None, :]


class TripletMarginLoss(nn.Module):
    def __init__(self, margin=0.2, mining="batch_hard", soft=False):
        """soft: log(1 + exp(d_ap - d_an)) instead of max(0, d_ap - d_an + margin) (the soft
        margin of Hermans et al., 2017; margin unused). Every triplet then has a gradient;
        "active" counts the violated ones (d_ap > d_an) and batch_all averages over all."""
        super().__init__()
        if mining not in MININGS:
            raise ValueError(f"unknown mining '{mining}'; choose one of {', '.join(MININGS)}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = 0.0 if soft else margin
        self.mining = mining
        self.soft = soft

    def forward(self, embeddings, labels):
        """Returns (loss, fraction of active triplets) as 0-dim tensors; both 0 without triplets.

        Masked sums rather than boolean indexing keep the step free of host-device syncs.
        """
        dist = pairwise_distances(embeddings.float())  # (B, B)
        same = share_a_label(labels)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive = same & ~eye  # (B, B): j is a positive of anchor i
        negative = ~same
        if self.mining == "batch_hard":
            valid = positive.any(dim=1) & negative.any(dim=1)  # (B,) anchors with a triplet
            hardest_pos = torch.where(positive, dist, torch.zeros_like(dist)).amax(dim=1)
            hardest_neg = torch.where(negative, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
            excess = torch.where(valid, hardest_pos - hardest_neg + self.margin, 0.0)
        else:
            # (B, B, 1) - (B, 1, B): the excess of every (anchor a, positive p, negative n)
            valid = positive[:, :, None] & negative[:, None, :]
            excess = torch.where(valid, dist[:, :, None] - dist[:, None, :] + self.margin, 0.0)
        active = valid & (excess > 0)
        if self.soft:
            losses = torch.where(valid, F.softplus(excess), 0.0)
            denominator = valid.sum()
        else:
            losses = excess.clamp_min(0.0)
            # batch_all averages over the active triplets, batch_hard over the anchors
            denominator = active.sum() if self.mining == "batch_all" else valid.sum()
        loss = losses.sum() / denominator.clamp_min(1)
        return loss, active.sum() / valid.sum().clamp_min(1)


class CosineSoftmaxLoss(nn.Module):
    """Identity (classification) loss on the unit embeddings: NormFace-style cosine softmax.

    logits = scale * cos(embedding, class weight); cross-entropy with label smoothing. The
    weights are this module's own parameters (one row per training class), trained with the
    model and saved in the checkpoint; retrieval never uses them. With (B, F) finding tables as
    labels, each row is one finding's logit and the loss is binary cross-entropy per finding
    (targets smoothed towards 1/2 by label_smoothing / 2), averaged over findings and films. On unit vectors a cosine
    classifier asks for what retrieval needs (each class in its own direction), and unlike a
    triplet loss it sees every class in every step, which is what makes training from random
    weights fast and stable (Luo et al., 2019; Wang et al., 2017).
    """

    def __init__(self, embedding_dim, num_classes, scale=16.0, label_smoothing=0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an identity loss needs at least 2 classes (or findings), got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * embedding_dim ** -0.5)
        self.scale = scale
        self.label_smoothing = label_smoothing

    def forward(self, embeddings, labels):
        weight = nn.functional.normalize(self.weight.float(), dim=1)
        logits = self.scale * embeddings.float() @ weight.T  # (B, classes)
        if labels.dim() == 2:
            targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
            return nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class RetrievalLoss(nn.Module):
    """triplet + id_weight x identity loss; returns (loss, stats) with 0-dim tensor stats.

    stats: "triplet" and "id" (the two terms), "active" (fraction of active triplets) and
    "spread" (mean pairwise distance in the batch: near 0 means the embedding collapsed).
    With id_weight 0 this is the paper's pure triplet loss.
    """

    def __init__(self, triplet, identity=None, id_weight=0.0):
        super().__init__()
        if id_weight > 0 and identity is None:
            raise ValueError("id_weight > 0 needs an identity loss module")
        self.triplet = triplet
        self.identity = identity if id_weight > 0 else None
        self.id_weight = id_weight

    def forward(self, embeddings, labels):
        triplet, active = self.triplet(embeddings, labels)
        identity = self.identity(embeddings, labels) if self.identity is not None else triplet.new_zeros(())
        with torch.no_grad():
            spread = pairwise_distances(embeddings.float()).mean() * len(embeddings) / max(len(embeddings) - 1, 1)
        loss = triplet + self.id_weight * identity
        return loss, {"triplet": triplet.detach(), "id": identity.detach(), "active": active,
                      "spread": spread}
