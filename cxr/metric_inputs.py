"""Checks of what evaluate_retrieval and rank_topk are given (shapes, dtypes, ks, patient
groups), each failing with a message that says what to give instead; and the patient codes the
same-patient exclusion ranks by."""
import operator

import numpy as np
import torch


def as_embeddings(x, name, device=None):
    """(N, D) float32 tensor on `device` (default: x's own, CPU for numpy)."""
    x = torch.as_tensor(x).detach()
    if device is not None:
        x = x.to(device)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); give at least one embedding")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    x = x.float().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinity; fix or drop those embeddings")
    return x


def as_gallery(gallery_emb, query):
    gallery = as_embeddings(gallery_emb, "gallery_emb", query.device)
    if gallery.shape[1] != query.shape[1]:
        raise ValueError(f"query_emb has dimension {query.shape[1]} but gallery_emb has "
                         f"{gallery.shape[1]}; embed both with the same model")
    return gallery


def as_labels(labels, name, n, device):
    """(N,) int64 tensor on `device`."""
    labels = torch.as_tensor(labels).to(device)
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got {labels.dtype}")
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels but there are {n} embeddings; "
                         f"give one label per embedding")
    return labels.long()


def check_ks(ks, name, n_gallery, leave_one_out):
    """ks as a tuple of ints, each at least 1 and at most the items a query is ranked against."""
    try:
        ks = tuple(operator.index(k) for k in ks)
    except TypeError:
        raise ValueError(f"{name} must be positive integers, got {ks!r}") from None
    if any(k < 1 for k in ks):
        raise ValueError(f"{name} must be positive integers, got {ks!r}")
    available = n_gallery - int(leave_one_out)
    if ks and max(ks) > available:
        what = "N - 1 for leave-one-out" if leave_one_out else "the gallery size"
        raise ValueError(f"{name} asks for {max(ks)} neighbours but each query has only "
                         f"{available} ({what}); use smaller k or a larger gallery")
    return ks


def check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def exclusion_codes(query_groups, gallery_groups, n_query, n_gallery, leave_one_out, device):
    """(query codes (Q,), gallery codes (G,)) int64 tensors, equal where the groups are equal;
    (None, None) when no gallery item shares a query's group beyond the query itself."""
    if query_groups is None:
        if gallery_groups is not None:
            raise ValueError("gallery_groups needs query_groups too")
        return None, None
    if leave_one_out:
        if gallery_groups is not None:
            raise ValueError("leave-one-out: give query_groups only (the gallery is the queries)")
        gallery_groups = query_groups
    elif gallery_groups is None:
        raise ValueError("query-gallery: give gallery_groups with query_groups, or neither")
    query_groups, gallery_groups = as_group_array(query_groups), as_group_array(gallery_groups)
    for name, groups, n in (("query_groups", query_groups, n_query), ("gallery_groups", gallery_groups, n_gallery)):
        if len(groups) != n:
            raise ValueError(f"{name} has {len(groups)} entries but there are {n} embeddings; "
                             "give one group (patient id) per embedding")
    both = np.concatenate([query_groups, gallery_groups]) if not leave_one_out else query_groups
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    query_codes = codes[:n_query]
    gallery_codes = query_codes if leave_one_out else codes[n_query:]
    if leave_one_out and len(np.unique(query_codes)) == n_query:
        return None, None  # one image per group: only the query itself leaves, as without groups
    if not leave_one_out and not np.isin(query_codes, gallery_codes).any():
        return None, None
    return torch.from_numpy(query_codes).to(device), torch.from_numpy(gallery_codes).to(device)


def as_group_array(groups):
    if isinstance(groups, torch.Tensor):
        groups = groups.cpu().numpy()
    array = np.asarray(groups)
    if array.ndim != 1:
        raise ValueError(f"groups must be 1-D (one id per embedding), got shape {array.shape}")
    if array.dtype == object:  # mixed types: compare them as text
        array = array.astype(str)
    return array


def group_name(groups, index):
    value = as_group_array(groups)[index]
    return value.item() if hasattr(value, "item") else value
