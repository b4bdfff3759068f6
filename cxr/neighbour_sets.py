"""The neighbour sets re-ranking is made of (cxr/reranking.py, cxr/kreciprocal.py): which gallery
films leave a query's ranking, and each gallery film's exact top list."""
import torch

ELEMENTS_PER_CHUNK = 2**25  # (rows x gallery) similarities held at once by gallery_neighbours


class Exclusion:
    """Which gallery items leave a query's ranking: itself (leave-one-out) and its group's."""

    def __init__(self, query_codes, gallery_codes, leave_one_out, n_query, n_gallery):
        self.query_codes, self.gallery_codes = query_codes, gallery_codes
        self.leave_one_out = leave_one_out
        self.most = most_excluded(query_codes, gallery_codes, leave_one_out, n_query)

    def of(self, start, count, items):
        """(count, *items.shape) bool: item `items` leaves the ranking of query start + row."""
        rows = torch.arange(start, start + count, device=items.device).view(-1, *([1] * items.dim()))
        out = torch.zeros((count, *items.shape), dtype=torch.bool, device=items.device)
        if self.query_codes is not None:
            out |= self.query_codes[rows] == self.gallery_codes[items][None]
        if self.leave_one_out:
            out |= rows == items[None]
        return out

    def mask(self, start, count, n_gallery, device):
        """(count, G) bool over the whole gallery."""
        return self.of(start, count, torch.arange(n_gallery, device=device))


def most_excluded(query_codes, gallery_codes, leave_one_out, n_query):
    """The most gallery items one query's ranking leaves out."""
    if query_codes is None:
        return int(leave_one_out)
    values, counts = torch.unique(gallery_codes, return_counts=True)
    where = torch.searchsorted(values, query_codes).clamp(max=len(values) - 1)
    per_query = torch.where(values[where] == query_codes, counts[where], torch.zeros_like(where))
    # leave-one-out: the query is one of its own group's films, counted already
    return int(per_query.max()) if n_query else 0


def gallery_neighbours(gallery, count, chunk_size=None, farthest=False):
    """(G, count) similarities and indices of each gallery item's top `count` other items
    (itself left out), descending; exact, a chunk of rows at a time. farthest: also (G,) each
    item's lowest similarity to any gallery item, from the same pass."""
    n = len(gallery)
    count = min(count, n - 1)
    sims_out = torch.empty(n, count, dtype=torch.float32, device=gallery.device)
    index_out = torch.empty(n, count, dtype=torch.int64, device=gallery.device)
    lowest = torch.empty(n, dtype=torch.float32, device=gallery.device)
    rows = max(1, chunk_size or ELEMENTS_PER_CHUNK // max(n, 1))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = gallery[start:stop].float() @ gallery.float().T
        lowest[start:stop] = sims.amin(1)  # itself (similarity 1) is never the lowest
        sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
        top = sims.topk(count, dim=1) if count else (sims[:, :0], sims[:, :0].long())
        sims_out[start:stop], index_out[start:stop] = top[0], top[1]
    return (sims_out, index_out, lowest) if farthest else (sims_out, index_out)
