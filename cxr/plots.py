"""Figures: learning curves of a training run, and the confusion matrix, embedding map and
risk-coverage curve of an evaluation. matplotlib with the non-interactive Agg backend, so they
render on a server without a display; every function writes one PNG and returns its path."""
import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib  # here: only the programs that draw need matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    _pyplot().close(fig)
    return path


def read_metrics_log(path):
    """Records of a metrics.jsonl; for a resumed run, the last record of each epoch wins."""
    by_epoch = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def learning_curves(metrics_path, out_path=None, title=None):
    """Loss terms, active triplets, and validation / test R@1 and mAP per epoch, the epoch kept
    as best marked; default output: learning_curves.png beside metrics.jsonl."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    records = read_metrics_log(metrics_path)
    out_path = out_path or Path(metrics_path).with_name("learning_curves.png")

    def series(key):
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        return ([e for e, _ in points], [v for _, v in points]) if points else None

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("loss", [("train_loss", "total"), ("train_triplet", "triplet"), ("train_id", "identity")]),
        ("active triplets (share)", [("active_triplets", "active")]),
        ("R@1 (%)", [("val_R@1", "validation"), ("test_R@1", "test")]),
        ("mAP (%)", [("val_mAP", "validation"), ("test_mAP", "test")]),
    ]
    best = [r.get("best_epoch") for r in records if r.get("best_epoch") is not None]
    for ax, (title, keys) in zip(axes, panels):
        for key, label in keys:
            data = series(key)
            if data:
                ax.plot(*data, marker="o", markersize=3, label=label)
        if best:
            ax.axvline(best[-1], color="grey", linestyle=":", linewidth=1, label=f"best (epoch {best[-1]})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title or Path(metrics_path).parent.name}: the best epoch is chosen on validation "
                 "mAP; test is logged only", fontsize=10, y=1.02)
    return _save(fig, out_path)


def confusion_matrix(matrix, classes, out_path, title="majority vote"):
    """Counts with row-normalised shading (recall per true class on the diagonal)."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    rows = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = 1.2 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, out_path)


def project_2d(embeddings, method="pca", seed=0):
    """(N, 2) coordinates: PCA (centred SVD), or t-SNE (scikit-learn, PCA-initialised)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if method == "pca":
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown projection '{method}'; choose pca or tsne")


def embedding_map(embeddings, labels, classes, out_path, method="pca", title=None):
    """Scatter of the embeddings in 2-D, coloured by class."""
    plt = _pyplot()
    xy = project_2d(embeddings, method)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(classes):
        mask = labels == i
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=10, alpha=0.75, color=colours(i % 10),
                       label=f"{name} ({int(mask.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = {"pca": "PCA", "tsne": "t-SNE"}[method]
    ax.set_xlabel(f"{shown} 1")
    ax.set_ylabel(f"{shown} 2")
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_title(title or f"test embeddings ({shown})", fontsize=10)
    return _save(fig, out_path)


def risk_coverage(abstention, out_path):
    """Risk-coverage curve(s) and the reliability diagram of the vote share."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    curves = {f"vote share (AURC {abstention['risk_coverage']['aurc']:.1f})": abstention["risk_coverage"]}
    for name, curve in abstention.get("ood", {}).items():
        curves[f"OOD {name} (AURC {curve['aurc']:.1f})"] = curve
    for label, curve in curves.items():  # risk[i] holds on coverage (coverage[i-1], coverage[i]]
        left.step([0.0, *curve["coverage"]], [curve["risk"][0], *curve["risk"]], where="pre", label=label)
    left.set_ylim(bottom=0)
    left.set_xlabel("coverage (%)")
    left.set_ylabel("risk: wrong among answered (%)")
    left.set_title(f"abstention of the majority vote, k = {abstention['vote_k']}", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    bins = abstention["reliability"]
    centres = [100 * (b["low"] + b["high"]) / 2 for b in bins]
    right.bar(centres, [b["accuracy"] for b in bins], width=9, alpha=0.7, label="accuracy")
    right.plot([0, 100], [0, 100], color="grey", linestyle=":", label="calibrated")
    right.set_xlabel("vote share (%)")
    right.set_ylabel("accuracy (%)")
    right.set_title(f"reliability of the vote share (ECE {abstention['ece']:.1f})", fontsize=10)
    right.legend(fontsize=8)
    return _save(fig, out_path)
