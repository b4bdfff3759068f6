"""ROAD (Rong et al., 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods"): removal curves whose removed pixels are filled in from their neighbours by noisy
linear imputation, instead of a constant or a blur.

Why: a deletion curve that paints removed pixels grey measures, besides the map, how far out of
the training distribution grey patches are, and the shape of the patch itself tells the model
where the removed pixels were (the "class information leakage" of the paper). Imputing each
removed pixel as the weighted mean of its 8 neighbours (direct neighbours 1/6, diagonal 1/12),
solved jointly for all removed pixels, gives a smooth fill that carries nothing of what was
removed; a little Gaussian noise keeps the fill from being recognisably flat.

- MoRF: most relevant pixels removed first; a lower area is more faithful.
- LeRF: least relevant pixels removed first; a higher area is more faithful.

The imputation is written here by hand (about forty lines with scipy.sparse) rather than taken
from the authors' package: it is the point of this evaluation, so every step of it is in view
and under test (tests/test_road.py).
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse.linalg import splu

# (row offset, column offset): weight, as in the paper; each removed pixel is the mean of its
# neighbours inside the image weighted by these (renormalised where a neighbour is off the image)
NEIGHBOUR_WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
                     (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}
NOISE = 0.01  # std of the noise on imputed pixels, in the model's input units (the paper's 0.01)


def impute(image, removed, noise=NOISE, seed=0):
    """`image` (C, H, W) with the pixels where `removed` (H, W, bool) is True replaced by noisy
    linear imputation; the other pixels are returned unchanged. One sparse system over all
    removed pixels, factorised once and solved for every channel (multiple right-hand sides).
    The noise is drawn from numpy's generator seeded by `seed` (an int or a sequence of ints),
    so a seed gives the same image every time. With every pixel removed nothing is left to
    impute from: the fill is then the image's mean per channel (the grey of the deletion curve),
    plus the noise."""
    tensor = torch.as_tensor(image)
    values = tensor.detach().cpu().double().numpy()
    channels, height, width = values.shape
    removed = np.asarray(removed, dtype=bool).reshape(height, width)
    unknown = np.flatnonzero(removed)
    if unknown.size == 0:
        return tensor.clone()
    flat = values.reshape(channels, -1)
    if unknown.size == removed.size:
        solution = np.broadcast_to(flat.mean(1), (unknown.size, channels)).copy()
    else:
        solution = solve(flat, removed, unknown)
    solution += noise * np.random.default_rng(seed).standard_normal(solution.shape)
    filled = flat.copy()
    filled[:, unknown] = solution.T
    return torch.from_numpy(filled.reshape(values.shape)).to(tensor.device, tensor.dtype)


def solve(flat, removed, unknown):
    """The imputed values (len(unknown), C): for each removed pixel i with neighbour weights w,
    sum_j w_ij * x_i - sum_(removed j) w_ij * x_j = sum_(kept k) w_ik * v_k over its neighbours
    inside the image, i.e. x_i is the weighted mean of its neighbours, removed ones included."""
    height, width = removed.shape
    variable = np.full(removed.size, -1)
    variable[unknown] = np.arange(unknown.size)  # pixel index -> unknown's index in the system
    rows, cols = np.divmod(unknown, width)
    is_removed = removed.ravel()
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, flat.shape[0]))
    entries, columns, weights = [], [], []
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS.items():
        y, x = rows + dy, cols + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        equation = np.flatnonzero(inside)
        neighbour = y[inside] * width + x[inside]
        diagonal[equation] += weight  # off-image neighbours drop out of the mean
        kept = ~is_removed[neighbour]
        rhs[equation[kept]] += weight * flat[:, neighbour[kept]].T
        entries.append(equation[~kept])
        columns.append(variable[neighbour[~kept]])
        weights.append(np.full(int((~kept).sum()), -weight))
    matrix = sparse.csc_matrix((np.concatenate(weights), (np.concatenate(entries), np.concatenate(columns))),
                               shape=(unknown.size, unknown.size)) + sparse.diags(diagonal, format="csc")
    return splu(matrix.tocsc()).solve(rhs)


@torch.inference_mode()
def curves(model, image, target, saliency, baselines, steps=16, seed=0, noise=NOISE):
    """ROAD curves of one image (3, H, W): the similarity to `target` as `steps` equal parts of
    the pixels are removed and imputed, most relevant first (MoRF) and least relevant first
    (LeRF), for `saliency` and for each of `baselines` ({name: (H, W) map}), areas over 0..1.
    The noise of step s is seeded by (`seed`, s), the same for every map of the image: the
    paired differences between maps then hold no noise of their own."""
    target = F.normalize(target.float(), dim=0)
    pixels = image.shape[-2] * image.shape[-1]
    counts = torch.linspace(0, pixels, steps + 1).round().long().tolist()
    seed = list(np.atleast_1d(seed))

    def curve(order):
        batch = []
        for step, n in enumerate(counts):
            removed = np.zeros(pixels, dtype=bool)
            removed[order[:n]] = True
            batch.append(impute(image.cpu(), removed.reshape(image.shape[-2:]), noise, [*seed, step]))
        return (model(torch.stack(batch).to(image.device)).float() @ target).tolist()

    result = {}
    for name, ranked in (("", saliency), *((f"{k}_", m) for k, m in baselines.items())):
        scores = torch.as_tensor(ranked, dtype=torch.float32).flatten().cpu()
        # stable: flat regions of a map are taken in the same order every run
        morf = curve(torch.argsort(scores, descending=True, stable=True).numpy())
        lerf = curve(torch.argsort(scores, descending=False, stable=True).numpy())
        result[f"{name}road_morf_auc"] = float(np.trapezoid(morf, dx=1 / steps))
        result[f"{name}road_lerf_auc"] = float(np.trapezoid(lerf, dx=1 / steps))
        if not name:
            result["road_morf_curve"], result["road_lerf_curve"] = morf, lerf
    return result
