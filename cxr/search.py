"""Exact top-k search of float16 galleries of millions: retrieve.py's scan, fast and tie-exact.

    scores, indices = search(queries, gallery, k)   # as a full stable sort of each row would rank

Written by hand rather than with torch.topk alone: topk's order among equal scores is not
specified, and the index (and test.py's metrics) promise the lower gallery index first.
"""
import torch


@torch.no_grad()
def search(queries, gallery, k, chunk_size=65536):
    """Exact top-k by dot product: (similarities (Q, k) float32, indices (Q, k) int64).

    Exactly the first k columns of a stable descending sort of each query's similarities to the
    whole gallery: the same neighbours and scores, ties ranked by gallery index (lower first),
    as in test.py. NaN similarities rank first, as in torch.sort. The gallery (any float dtype,
    e.g. float16 to halve its memory) is scanned `chunk_size` rows at a time: each chunk is
    converted to float32 into one reused buffer and multiplied into one reused (Q, chunk_size)
    similarity buffer, so the extra memory is about chunk_size * (D + Q) * 4 bytes (90 MB for
    the defaults, D = 256, Q = 100), not a second copy of the gallery. A chunk keeps its top k
    by torch.topk with one item of slack (see _chunk_topk), not a full sort, so the scan runs at
    the speed of the matrix products.

    A similarity is one float32 matrix product per chunk, so it may differ in the last bit from
    one computed in another matrix shape (BLAS uses other kernels for a handful of columns):
    compare results at the same chunk_size.
    """
    queries = torch.as_tensor(queries).float()
    gallery = torch.as_tensor(gallery)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k = min(k, len(gallery))
    best_scores = queries.new_empty(len(queries), 0)
    best_indices = torch.empty(len(queries), 0, dtype=torch.int64, device=queries.device)
    if k == 0:
        return best_scores, best_indices
    rows = min(chunk_size, len(gallery))
    convert = gallery.dtype != torch.float32 or gallery.device != queries.device
    block_buffer = queries.new_empty(rows * gallery.shape[1]) if convert else None
    sims_buffer = queries.new_empty(len(queries) * rows)
    for start in range(0, len(gallery), chunk_size):
        block = gallery[start:start + chunk_size]
        if convert:  # into the reused buffers: no fresh pages (and their faults) per chunk
            block = block_buffer[:block.numel()].view(block.shape).copy_(block)
        sims = sims_buffer[:len(queries) * len(block)].view(len(queries), len(block))
        torch.mm(queries, block.T, out=sims)  # (Q, chunk)
        scores, indices = _chunk_topk(sims, k)
        if best_scores.shape[1]:  # earlier chunks hold lower indices: a stable sort keeps index order
            scores = torch.cat([best_scores, scores], dim=1)
            indices = torch.cat([best_indices, indices + start], dim=1)
            keep = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            scores, indices = scores.gather(1, keep), indices.gather(1, keep)
        best_scores, best_indices = scores, indices
    return best_scores, best_indices


def _chunk_topk(sims, k):
    """The first min(k, columns) of a stable descending sort of each row of sims, without sorting
    the row: (scores, column indices).

    torch.topk with one item of slack finds the k best scores; where the (k+1)-th best differs
    from the k-th, the k it returns are exactly the items scoring at least the k-th, the set the
    stable sort keeps. Rows where they are equal (a tie across the cut, e.g. duplicate gallery
    rows) keep every item above the k-th score and the lowest-indexed items equal to it. The k
    kept items are then sorted by (-score, index)."""
    n_rows, n_cols = sims.shape
    if k >= n_cols:  # the whole chunk
        columns = torch.arange(n_cols, device=sims.device).expand(n_rows, n_cols)
    else:
        values, columns = torch.topk(sims, k + 1, dim=1)  # descending, NaN first, ties in any order
        kth, after = values[:, k - 1], values[:, k]
        columns = columns[:, :k]
        cut = (after == kth) | torch.isnan(after)  # NaN == NaN is False, yet a tie here
        if cut.any():
            rows = cut.nonzero().squeeze(1)
            columns = columns.clone()
            columns[rows] = _tied_columns(sims[rows], kth[rows], k)
        columns = torch.sort(columns, dim=1).values  # index order, for the stable sort by score
    scores = sims.gather(1, columns)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), columns.gather(1, order)


def _tied_columns(sims, kth, k):
    """(r, k) columns, in index order, of the rows' k best items when several share the k-th
    score `kth`: every item ranked above it (NaN ranks above any number), then the lowest-indexed
    items equal to it."""
    nan = torch.isnan(sims)
    kth_nan = torch.isnan(kth)[:, None]
    above = (sims > kth[:, None]) | (nan & ~kth_nan)
    equal = (sims == kth[:, None]) | (nan & kth_nan)
    needed = k - above.sum(1, keepdim=True)  # >= 1: topk kept the k-th best and all above it
    take = above | (equal & (equal.cumsum(1, dtype=torch.int32) <= needed))
    return take.nonzero()[:, 1].view(len(sims), k)  # row-major: each row's k columns, ascending


