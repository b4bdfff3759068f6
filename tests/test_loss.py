import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss import TripletMarginLoss


def brute_force(embeddings, labels, margin, mining):
    x = embeddings.double().numpy()
    labels = labels.numpy()
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    n = len(labels)
    if mining == "batch_hard":
        losses = []
        for a in range(n):
            pos = [d[a, p] for p in range(n) if p != a and labels[p] == labels[a]]
            neg = [d[a, q] for q in range(n) if labels[q] != labels[a]]
            if pos and neg:
                losses.append(max(0.0, max(pos) - min(neg) + margin))
        if not losses:
            return 0.0, 0.0
        return float(np.mean(losses)), float(np.mean([v > 0 for v in losses]))
    losses = [max(0.0, d[a, p] - d[a, q] + margin)
              for a, p, q in itertools.product(range(n), repeat=3)
              if a != p and labels[a] == labels[p] and labels[q] != labels[a]]
    active = [v for v in losses if v > 0]
    if not active:
        return 0.0, 0.0
    return float(np.sum(active) / len(active)), len(active) / len(losses)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
@pytest.mark.parametrize("trial", range(10))
def test_matches_brute_force(mining, trial):
    rng = np.random.default_rng(trial)
    n, dim = int(rng.integers(4, 13)), int(rng.integers(2, 9))
    labels = torch.as_tensor(rng.integers(0, int(rng.integers(2, 4)), size=n))
    embeddings = torch.as_tensor(rng.normal(size=(n, dim)), dtype=torch.float32)
    if trial % 2:
        embeddings = F.normalize(embeddings, dim=1)
    margin = float(rng.choice([0.1, 0.2, 1.0]))
    loss, active = TripletMarginLoss(margin, mining)(embeddings, labels)
    expected_loss, expected_active = brute_force(embeddings, labels, margin, mining)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert active.item() == pytest.approx(expected_active, abs=1e-6)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_gradients_finite_with_identical_embeddings(mining):
    base = F.normalize(torch.randn(6, 8), dim=1)
    base[1] = base[0]  # a positive pair at distance 0
    base[3] = base[0]  # and a negative at distance 0
    embeddings = base.clone().requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = TripletMarginLoss(0.2, mining)(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_no_valid_triplet_gives_zero(mining):
    embeddings = torch.randn(4, 3, requires_grad=True)
    loss, active = TripletMarginLoss(0.2, mining)(embeddings, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and active.item() == 0.0


def test_loss_is_fp32_under_bf16_inputs():
    embeddings = F.normalize(torch.randn(8, 16), dim=1).bfloat16()
    loss, _ = TripletMarginLoss()(embeddings, torch.arange(2).repeat(4))
    assert loss.dtype == torch.float32


def test_unknown_mining_and_negative_margin():
    with pytest.raises(ValueError, match="batch_hard"):
        TripletMarginLoss(mining="semi_hard")
    with pytest.raises(ValueError, match="margin"):
        TripletMarginLoss(margin=-1)


def test_cosine_softmax_loss_matches_a_hand_computation():
    from loss import CosineSoftmaxLoss
    torch.manual_seed(0)
    loss_fn = CosineSoftmaxLoss(embedding_dim=4, num_classes=3, scale=10.0, label_smoothing=0.0)
    embeddings = F.normalize(torch.randn(5, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    w = loss_fn.weight.detach().double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    logits = 10.0 * embeddings.double().numpy() @ w.T
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean(log_p[np.arange(5), labels.numpy()])
    assert loss_fn(embeddings, labels).item() == pytest.approx(expected, rel=1e-5)
    smoothed = CosineSoftmaxLoss(4, 3, 10.0, label_smoothing=0.3)
    smoothed.weight.data.copy_(loss_fn.weight.data)
    uniform = -np.mean(log_p.mean(1))
    assert smoothed(embeddings, labels).item() == pytest.approx(0.7 * expected + 0.3 * uniform, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CosineSoftmaxLoss(4, 1)


def test_retrieval_loss_combines_terms_and_reports_spread():
    from loss import CosineSoftmaxLoss, RetrievalLoss
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(8, 6), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    triplet = TripletMarginLoss(0.2, "batch_hard")
    plain, stats = RetrievalLoss(triplet)(embeddings, labels)
    assert plain.item() == pytest.approx(triplet(embeddings, labels)[0].item())
    assert stats["id"].item() == 0.0
    identity = CosineSoftmaxLoss(6, 4)
    both, stats = RetrievalLoss(triplet, identity, 0.5)(embeddings, labels)
    expected = triplet(embeddings, labels)[0] + 0.5 * identity(embeddings, labels)
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)
    d = torch.cdist(embeddings.double(), embeddings.double())
    assert stats["spread"].item() == pytest.approx((d.sum() / (8 * 7)).item(), rel=1e-5)
    collapsed = F.normalize(torch.ones(8, 6), dim=1)
    assert RetrievalLoss(triplet)(collapsed, labels)[1]["spread"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_soft_margin_matches_brute_force(mining):
    torch.manual_seed(1)
    embeddings = F.normalize(torch.randn(10, 5), dim=1).double()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    x, y = embeddings.numpy(), labels.numpy()
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    if mining == "batch_hard":
        excess = [max(d[a, p] for p in range(10) if p != a and y[p] == y[a])
                  - min(d[a, q] for q in range(10) if y[q] != y[a]) for a in range(10)]
    else:
        excess = [d[a, p] - d[a, q] for a, p, q in itertools.product(range(10), repeat=3)
                  if a != p and y[a] == y[p] and y[q] != y[a]]
    expected = np.mean(np.log1p(np.exp(excess)))
    loss, active = TripletMarginLoss(0.2, mining, soft=True)(embeddings, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert active.item() == pytest.approx(np.mean(np.array(excess) > 0), abs=1e-6)
