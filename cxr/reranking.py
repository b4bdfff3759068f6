"""Training-free re-ranking: a second pass over the similarities of the exact ranking.

    aqe          alpha-weighted query expansion (Radenovic et al., 2018): the query plus its top k
                 gallery neighbours, weighted by max(s, 0) ** alpha, scores the gallery again.
    dba          database-side augmentation (Arandjelovic & Zisserman, 2012; alpha weights as
                 Radenovic et al.): each gallery item scores as the weighted mean of itself
                 (weight 1) and its top k gallery neighbours (weights max(s, 0) ** alpha).
    kreciprocal  k-reciprocal re-ranking (Zhong et al., 2017): the Jaccard distance of the
                 k-reciprocal neighbour sets, mixed into the original distance with
                 jaccard_weight (Zhong's 1 - lambda).

Exactness and the query's own films. Every neighbour set aqe and dba make a query's new scores
of is taken from the gallery *less the films that leave that query's ranking* (the query itself
in leave-one-out, its own patient's films with groups): a patient's other films never expand its
query or augment the items it is scored against, so re-ranking cannot bring back what the
same-patient exclusion took out. For dba this is exact per query: each gallery item keeps k+m
candidates (m = the most films one query excludes) and, for each query, uses its first k that
the query does not exclude. The augmented item is the weighted mean, not re-normalised to unit
length as in Radenovic et al.'s alpha-DBA: its norm would depend on which neighbours the query's
exclusion removes (the ranking of one query does not change with the length of its own expanded
vector, aqe). k-reciprocal keeps the exclusion on the query's side exactly (its lists, its
reciprocal set, its expansion); the gallery's own reciprocal sets are built once, with every
film, and only their entries on the query's excluded films are dropped (cxr/kreciprocal.py).

k = 0 (aqe, dba) or jaccard_weight = 0 (kreciprocal) gives the plain similarities bit for bit.
The scores are computed one query chunk at a time inside the ranking engine (ranking.rank_chunks'
rescore hook), so memory stays bounded for large galleries; the gallery's own neighbour lists
are computed once, in chunks, exactly.

Written here rather than taken from a library: the methods must see the same-patient exclusion
and run inside the exact chunked ranking of the metrics, which no retrieval library offers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cxr.kreciprocal import KReciprocal
from cxr.neighbour_sets import ELEMENTS_PER_CHUNK, Exclusion, gallery_neighbours

METHODS = ("none", "aqe", "dba", "kreciprocal")
# Gathers of (queries x gallery x candidates) are kept near this many elements.
_ELEMENTS_PER_GATHER = 2**24


@dataclass(frozen=True)
class Rerank:
    """A re-ranking method and its parameters (defaults: the papers' usual values)."""
    method: str = "none"
    k: int = 5  # aqe, dba: neighbours
    alpha: float = 3.0  # aqe, dba: weight exponent (0: plain average)
    k1: int = 20  # kreciprocal: the reciprocal neighbourhood
    k2: int = 6  # kreciprocal: the local query expansion
    jaccard_weight: float = 0.7  # kreciprocal: share of the Jaccard distance (0: plain ranking)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown re-ranking {self.method!r}; choose from {', '.join(METHODS)}")
        for name in ("k", "k1", "k2"):
            if getattr(self, name) < 0:
                raise ValueError(f"re-ranking {name} = {getattr(self, name)} must be >= 0")
        if not 0 <= self.alpha < float("inf"):  # also NaN
            raise ValueError(f"re-ranking alpha = {self.alpha} must be a finite number >= 0")
        if not 0.0 <= self.jaccard_weight <= 1.0:
            raise ValueError(f"re-ranking jaccard weight = {self.jaccard_weight} must be between 0 and 1")
        if self.method == "kreciprocal" and min(self.k1, self.k2) < 1:
            raise ValueError("kreciprocal re-ranking needs k1 >= 1 and k2 >= 1 (k2 = 1: no local query expansion)")

    @property
    def active(self):
        return self.method != "none"

    def describe(self):
        """The method and the parameters it uses, for reports."""
        if self.method in ("aqe", "dba"):
            return {"method": self.method, "k": self.k, "alpha": self.alpha}
        if self.method == "kreciprocal":
            return {"method": self.method, "k1": self.k1, "k2": self.k2, "jaccard_weight": self.jaccard_weight}
        return {"method": "none"}

    def bind(self, query, gallery, query_codes=None, gallery_codes=None, leave_one_out=False):
        """The rescore(start, sims) hook of ranking.rank_chunks for these embeddings: it
        overwrites the (c, G) similarities of queries start..start+c-1 with re-ranked scores.
        codes as metric_inputs.exclusion_codes gives them (None: no groups)."""
        exclusion = Exclusion(query_codes, gallery_codes, leave_one_out, len(query), len(gallery))
        if self.method == "aqe":
            return _QueryExpansion(self, gallery, exclusion)
        if self.method == "dba":
            return _DatabaseAugmentation(self, gallery, exclusion)
        if self.method == "kreciprocal":
            return KReciprocal(self, gallery, exclusion)
        return None


def weights(similarities, alpha):
    """max(s, 0) ** alpha (1 for alpha = 0), 0 where the candidate is missing (-inf)."""
    out = similarities.clamp(min=0) ** alpha
    return torch.where(torch.isfinite(similarities), out, torch.zeros_like(out))


class _QueryExpansion:
    """aqe: the query plus the weighted sum of its top k (not excluded) gallery items."""

    def __init__(self, rerank, gallery, exclusion):
        self.k, self.alpha, self.exclusion = rerank.k, rerank.alpha, exclusion
        self.gallery = gallery.float()

    def __call__(self, start, sims):
        c, n = sims.shape
        allowed = sims.masked_fill(self.exclusion.mask(start, c, n, sims.device), float("-inf"))
        top, index = allowed.topk(min(self.k, n), dim=1)
        w = weights(top, self.alpha)
        expansion = torch.einsum("ck,ckd->cd", w, self.gallery[index])
        # (q + e) . g = q . g + e . g: with k = 0 the plain similarities stay bit for bit
        sims += expansion @ self.gallery.T
        return sims


class _DatabaseAugmentation:
    """dba: each gallery item as the weighted mean of itself and its first k candidates that
    the query does not exclude (candidates: its top k + m other gallery items)."""

    def __init__(self, rerank, gallery, exclusion):
        self.k, self.exclusion = rerank.k, exclusion
        candidates = rerank.k + exclusion.most if rerank.k else 0
        sims, self.index = gallery_neighbours(gallery, candidates)
        self.weight = weights(sims, rerank.alpha)

    def __call__(self, start, sims):
        c, n = sims.shape
        width = self.index.shape[1]
        if width == 0:
            return sims
        step = max(1, _ELEMENTS_PER_GATHER // max(n * width, 1))
        for a in range(0, c, step):
            b = min(c, a + step)
            rows = sims[a:b]
            kept = ~self.exclusion.of(start + a, b - a, self.index)  # (r, G, width)
            kept &= kept.cumsum(2) <= self.k
            w = kept * self.weight[None]
            neighbour_sims = rows[:, self.index]  # (r, G, width): the query's similarity to them
            rows.add_((w * neighbour_sims).sum(2)).div_(1 + w.sum(2))
        return sims


@torch.no_grad()
def search_reranked(queries, gallery, k, rerank, chunk_size=None):
    """Exact top k of new queries (none of the gallery leaves their ranking) by re-ranked score:
    (re-ranked scores (Q, k), plain similarities (Q, k), indices (Q, k)), ties by gallery index.
    The gallery is used in float32 (a float16 index is converted once)."""
    queries, gallery = torch.as_tensor(queries).float(), torch.as_tensor(gallery).float()
    rescore = rerank.bind(queries, gallery)
    k = min(k, len(gallery))
    rows = max(1, chunk_size or ELEMENTS_PER_CHUNK // max(len(gallery), 1))
    scores, similarities, indices = [], [], []
    for start in range(0, len(queries), rows):
        plain = queries[start:start + rows] @ gallery.T
        sims = plain.clone()
        if rescore is not None:
            rescore(start, sims)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        scores.append(sims.gather(1, order))
        similarities.append(plain.gather(1, order))
        indices.append(order)
    return torch.cat(scores), torch.cat(similarities), torch.cat(indices)
