"""Embedding extraction (batched, under inference mode, gathered across DDP ranks), class
prototypes, and each branch's share of a hybrid's similarities."""
import torch

from cxr.progress import progress as progress_of
from cxr.runtime import all_gather_varlen, autocast


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def extract_embeddings(model, loader, runtime, amp="none", channels_last=False, progress=True,
                       branch_features=False):
    """(embeddings (N, D) float32, labels (N,)) of a whole loader, on the runtime's device.
    With branch_features (hybrid models), a third item: {branch: (N, C) float32} pooled
    features of each branch from the same forward pass (for branch attribution).

    Under DDP the loader holds this rank's shard (see eval_sampler) and the shards are gathered
    back into the dataset's order on every rank.
    """
    model.eval()
    embeddings, labels, features = [], [], {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    bar = progress_of(loader, "embed", enabled=progress and runtime.is_main)
    for images, targets in bar:
        images = images.to(runtime.device, non_blocking=True, memory_format=memory_format)
        with autocast(runtime.device, amp):
            if branch_features:
                parts, _ = model.branch_features(images)
                embeddings.append(model.fuse(parts).float())
                for name, value in parts.items():
                    features.setdefault(name, []).append(value.float())
            else:
                embeddings.append(model(images).float())
        labels.append(targets.to(runtime.device))
    embeddings = torch.cat(embeddings)
    labels = torch.cat(labels)
    features = {name: torch.cat(values) for name, values in features.items()}
    if runtime.distributed:
        order = torch.as_tensor(list(iter(loader.sampler)), device=runtime.device)
        order = all_gather_varlen(order, runtime)
        embeddings = all_gather_varlen(embeddings, runtime)
        labels = all_gather_varlen(labels, runtime)
        features = {name: all_gather_varlen(value, runtime) for name, value in features.items()}
        # Distributed eval samplers interleave indices across ranks; restore dataset order.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        embeddings, labels = embeddings[inverse], labels[inverse]
        features = {name: value[inverse] for name, value in features.items()}
    if branch_features:
        return embeddings, labels, features
    return embeddings, labels


def has_branches(model):
    """True for a model with a per-branch fusion (the hybrid)."""
    return hasattr(model, "branch_features") and hasattr(model, "fuse")


@torch.inference_mode()
def mean_branch_shares(model, features, neighbours, gallery_embeddings, gallery_features, chunk_size=4096):
    """{branch: percent of the query-to-neighbour similarity that branch carries}, the mean
    over the queries (model.branch_attribution against the gallery's mean features); queries
    whose drops are both 0 are left out. neighbours: (Q,) gallery index of each query's top-1."""
    means = {b: f.mean(0) for b, f in gallery_features.items()}
    neighbours = torch.as_tensor(neighbours, device=gallery_embeddings.device)
    sums, count = {b: 0.0 for b in features}, 0
    for start in range(0, len(neighbours), chunk_size):
        chunk = {b: f[start:start + chunk_size] for b, f in features.items()}
        out = model.branch_attribution(chunk, gallery_embeddings[neighbours[start:start + chunk_size]], means)
        valid = ~torch.isnan(out[f"{next(iter(features))}_share"])
        count += int(valid.sum())
        for b in features:
            sums[b] += float(out[f"{b}_share"][valid].sum())
    if count == 0:
        return None
    return {b: round(100.0 * sums[b] / count, 2) for b in features}


def class_prototypes(embeddings, labels, num_classes, chunk_size=65536):
    """(num_classes, D) normalised mean embedding of each class (zeros for a class without
    images), on the embeddings' device; summed chunk by chunk in float32, so a float16 numpy
    index of millions is never copied whole."""
    embeddings, labels = torch.as_tensor(embeddings), torch.as_tensor(labels)
    sums = torch.zeros(num_classes, embeddings.shape[1], device=embeddings.device)
    for start in range(0, len(embeddings), chunk_size):
        sums.index_add_(0, labels[start:start + chunk_size].to(embeddings.device),
                        embeddings[start:start + chunk_size].float())
    return torch.nn.functional.normalize(sums, dim=1)
