"""The out-of-distribution detector fitted on a gallery's embeddings: maximum softmax confidence
over class prototypes, energy, Mahalanobis distance (class means, shared Ledoit-Wolf covariance)
and k-NN distance, every score "higher = more out of distribution", with thresholds calibrated
on held-out in-distribution images; its file, and the rates that judge it."""
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from cxr.checkpoints import load_checkpoint, save_checkpoint
from cxr.errors import UserError
from cxr.retrieval_metrics import rank_topk

SCORES = ("msp", "energy", "mahalanobis", "knn")


FORMAT_VERSION = 1


class OODDetector:
    def __init__(self, temperature=1 / 16, k=10, fingerprint=None):
        """fingerprint: checkpoints.model_fingerprint of the model whose embeddings it is fitted on."""
        if temperature <= 0 or k < 1:
            raise ValueError(f"temperature must be > 0 and k >= 1, got {temperature}, {k}")
        self.temperature, self.k = float(temperature), int(k)
        self.fingerprint = fingerprint
        self.thresholds, self.tpr = {}, None

    # ------------------------------------------------------------------ fitting
    def fit(self, embeddings, labels, classes):
        """Class prototypes, class means and the shared shrunk covariance, and the fitted set
        for the k-NN score. Needs at least 2 classes and more images than classes."""
        x = _as_array(embeddings)
        labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
        present = np.unique(labels)
        if len(present) < 2:
            raise ValueError(f"the OOD detector needs images of at least 2 classes to fit, got "
                             f"{len(present)} ({', '.join(classes[i] for i in present)}); the "
                             "confidence and energy scores compare classes")
        if len(x) <= len(present):
            raise ValueError(f"the OOD detector needs more images than classes to estimate a "
                             f"covariance, got {len(x)} images of {len(present)} classes")
        if len(x) < self.k:
            raise ValueError(f"the k-NN score needs at least k = {self.k} fitted images, got {len(x)}")
        means = np.stack([x[labels == c].mean(0) for c in present])  # (C, D)
        centred = x - means[np.searchsorted(present, labels)]
        # Ledoit-Wolf shrinks towards a scaled identity by the optimal amount, so the estimate
        # is well conditioned even with fewer images than dimensions.
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        self.classes = [classes[i] for i in present]
        self.means = means.astype(np.float32)
        self.prototypes = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
        self.precision = precision.astype(np.float32)
        self.fitted = x.astype(np.float32)
        return self

    def calibrate(self, embeddings, tpr=0.95):
        """Per score, the threshold that accepts a share `tpr` of these in-distribution images
        (held out from the fit: the k-NN score of a fitted image would be its own neighbour)."""
        if not 0.0 < tpr < 1.0:
            raise ValueError(f"tpr must be between 0 and 1, got {tpr}")
        scores = self.scores(embeddings)
        self.thresholds = {name: float(np.quantile(values, tpr, method="higher"))
                           for name, values in scores.items()}
        self.tpr = tpr
        return self.thresholds

    # ------------------------------------------------------------------ scoring
    def logits(self, embeddings):
        return _as_array(embeddings) @ self.prototypes.T / self.temperature  # (Q, C)

    def scores(self, embeddings):
        x = _as_array(embeddings)
        logits = self.logits(x)
        top = logits.max(1, keepdims=True)
        log_sum_exp = top[:, 0] + np.log(np.exp(logits - top).sum(1))  # stable logsumexp
        msp = np.exp(top[:, 0] - log_sum_exp)
        diff = x[:, None, :] - self.means[None]  # (Q, C, D)
        squared = np.einsum("qcd,qcd->qc", diff @ self.precision, diff)  # (Q, C)
        similarity, _ = rank_topk(torch.from_numpy(x), torch.from_numpy(self.fitted), self.k)
        return {"msp": 1.0 - msp, "energy": -self.temperature * log_sum_exp,
                "mahalanobis": np.sqrt(np.clip(squared.min(1), 0.0, None)),
                "knn": 1.0 - similarity[:, -1].numpy()}

    def flags(self, embeddings, scores=None):
        """{score: (Q,) bool}, True = out of distribution; pass `scores` to reuse them."""
        if not self.thresholds:
            raise RuntimeError("the detector has no thresholds: call calibrate() on held-out "
                               "in-distribution embeddings first")
        scores = self.scores(embeddings) if scores is None else scores
        return {name: values > self.thresholds[name] for name, values in scores.items()}

    # ------------------------------------------------------------------ files
    def state_dict(self):
        return {"format_version": FORMAT_VERSION, "temperature": self.temperature, "k": self.k,
                "fingerprint": self.fingerprint,
                "classes": self.classes, "tpr": self.tpr, "thresholds": self.thresholds,
                **{key: torch.from_numpy(getattr(self, key))
                   for key in ("means", "prototypes", "precision", "fitted")}}

    def save(self, path):
        save_checkpoint(self.state_dict(), path)

    @classmethod
    def load(cls, path):
        state = load_checkpoint(path, flag="OOD detector")
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} is not an OOD detector written by ood.py "
                               f"(format {FORMAT_VERSION}); fit one with python ood.py ...")
        detector = cls(state["temperature"], state["k"], state.get("fingerprint"))
        detector.classes, detector.tpr = state["classes"], state["tpr"]
        detector.thresholds = state["thresholds"]
        for key in ("means", "prototypes", "precision", "fitted"):
            setattr(detector, key, state[key].numpy())
        return detector


def load_for_model(checkpoint, fingerprint, path=None):
    """The detector ood.py fitted for this checkpoint (default <checkpoint stem>_ood.pth),
    refused when it was fitted on another model's embeddings (e.g. a best checkpoint that a
    later run replaced)."""
    path = Path(path or default_detector_path(checkpoint))
    if not path.is_file():
        raise UserError(f"no OOD detector {path}; fit it with python ood.py --resume {checkpoint} "
                              "(or give its file)")
    detector = OODDetector.load(path)
    if detector.fingerprint != fingerprint:
        raise UserError(f"the OOD detector {path} was fitted on another model's embeddings "
                              f"than {checkpoint}'s; fit it again with python ood.py --resume {checkpoint}")
    return detector


def _as_array(embeddings):
    if torch.is_tensor(embeddings):
        embeddings = embeddings.detach().float().cpu().numpy()
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    return x


def detection_metrics(in_scores, ood_scores, tpr=0.95, *, threshold):
    """Rates of one score (higher = more OOD) on in-distribution test images and OOD images.

    An image is accepted when its score is <= the threshold (flags() flags the rest), and, as in
    "FPR at 95% TPR", the positives are the in-distribution images: a TPR is the share of
    in-distribution images accepted, an FPR the share of OOD images accepted (missed).
    - deployed_tpr, deployed_fpr: at `threshold`, the one the detector saved (calibrate() on
      held-out images): the rates a user of the guard gets. deployed_tpr falls short of `tpr`
      when the test images score higher than the calibration ones.
    - refit_tpr, refit_fpr: at the threshold re-fitted on these in-distribution scores to accept
      `tpr` of them (refit_tpr: the share it does accept, >= tpr), the usual FPR95 of papers: it
      measures separability only, since a deployed guard cannot see its test scores.
    - auroc: OOD as the positive class; it needs no threshold.
    """
    in_scores, ood_scores = np.asarray(in_scores), np.asarray(ood_scores)
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(ood_scores))]
    auroc = roc_auc_score(y, np.r_[in_scores, ood_scores])
    refit = np.quantile(in_scores, tpr, method="higher")
    return {"auroc": float(auroc),
            "refit_tpr": float(np.mean(in_scores <= refit)), "refit_fpr": float(np.mean(ood_scores <= refit)),
            "deployed_tpr": float(np.mean(in_scores <= threshold)),
            "deployed_fpr": float(np.mean(ood_scores <= threshold))}


def default_detector_path(checkpoint):
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "_ood.pth")
