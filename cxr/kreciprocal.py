"""k-reciprocal re-ranking (Zhong et al., 2017, "Re-ranking Person Re-identification with
k-reciprocal Encoding"), inside the exact chunked ranking (reranking.py's rescore hook).

For an item p with top-k list N(p, k) (p itself first), its k-reciprocal set is
R(p, k) = {h in N(p, k) : p in N(h, k)}; R*(p) adds R(h, k/2) for every h in R(p, k) that shares
more than 2/3 of it with R(p, k). Distances are the squared distances of unit vectors, d = 2 - 2 s,
divided, as in the authors' code, by the item's largest distance D_p (to any gallery film; for a
query, to any film it keeps), so d / D_p lies in [0, 1] like the Jaccard distance. V_p holds
exp(-d(p, h) / D_p) over R*(p), summing to 1, and is then averaged over p's top k2 (local query
expansion). The Jaccard distance of two items is 1 - sum min(V_p, V_g) / sum max(V_p, V_g), and
the final distance of query q (1 - w) d / D_q + w d_J; ranked here, times D_q / 2 (a constant of
the query, so its order is the same), as the score (1 - w) s - (w / 2) D_q d_J (w =
jaccard_weight; w = 0 leaves every similarity as it was, bit for bit).

The query is not added to the gallery's graph (a new film is not part of the archive's structure,
so gallery vectors carry no weight on it). The query's own films: the query's lists (N(q, k1),
N(q, k2), whether q is in a candidate's top k1) are taken over the gallery less the films that
leave its ranking, exactly, as in reranking.py. The gallery items' sets R(g, .) and vectors V_g
are the gallery's own, built once; for each query their entries on its excluded films are dropped
(so those films add nothing to any Jaccard sum), which is exact for the query's side and leaves
the gallery's structure as the archive has it. The gallery side is built a chunk of rows at a time
(sparse vectors of about k1 entries each), the query side one query at a time with sparse sums;
runs on the CPU. Other details that differ from the authors' code: the half sets are R(p, ceil(k1/2))
(the same as theirs for even k1), and D_p is taken over the gallery (the queries are not part of
it). The gallery's lists hold k1 + m items (m: the most
films one query excludes), so a data set with a patient of many films costs more.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

from cxr.neighbour_sets import gallery_neighbours


def reciprocal_sets(neighbours, k):
    """R(g, k) of every gallery item from its top lists ((G, >= k) indices, itself left out):
    each as a sorted int64 array, g itself included."""
    top = neighbours[:, :k]
    n = len(top)
    back = np.empty(top.shape, dtype=bool)
    step = max(1, 2**22 // max(k * k, 1))
    for a in range(0, n, step):  # h = top[g, j] is reciprocal when g is in h's own top k
        b = min(n, a + step)
        back[a:b] = (top[top[a:b]] == np.arange(a, b)[:, None, None]).any(2)
    return [np.sort(np.concatenate(([g], top[g][back[g]]))) for g in range(n)]


def expand(base, half_sets, exclude=None):
    """R*: base plus each half set of a member that shares more than 2/3 of itself with base."""
    members = set(base.tolist())
    out = set(members)
    for h in base.tolist():
        candidate = half_sets[h]
        if exclude is not None:
            candidate = candidate[~np.isin(candidate, exclude)]
        if len(candidate) and np.isin(candidate, base).sum() > 2 / 3 * len(candidate):
            out.update(candidate.tolist())
    return np.fromiter(sorted(out), dtype=np.int64)


def largest_distance(lowest_similarity):
    """D = 2 - 2 s_min, the largest squared distance of unit vectors; floored so that a set of
    identical films does not divide by zero."""
    return np.maximum(2.0 - 2.0 * np.asarray(lowest_similarity, dtype=np.float64), 1e-6)


class KReciprocal:
    def __init__(self, rerank, gallery, exclusion):
        self.k1, self.k2, self.w, self.exclusion = rerank.k1, rerank.k2, rerank.jaccard_weight, exclusion
        self.gallery = gallery.float().cpu().numpy()
        n = len(self.gallery)
        self.k1 = min(self.k1, n - 1)
        self.k2 = max(1, min(self.k2, n))
        if self.w == 0:
            return
        _, index, lowest = gallery_neighbours(gallery.float().cpu(), self.k1 + exclusion.most, farthest=True)
        self.candidates = index.numpy()
        self.farthest = largest_distance(lowest.numpy())  # D_g  # (G, k1 + m): enough left after any query's exclusions
        self.full = reciprocal_sets(self.candidates, self.k1)
        self.half = reciprocal_sets(self.candidates, max(1, (self.k1 + 1) // 2))
        # (G, G) CSR: rows V_g before and after the gallery's local query expansion
        self.base_vectors = self._reciprocal_vectors()
        self.vectors = self._expanded(self.base_vectors)
        self.columns = self.vectors.tocsc()
        self.row_sums = np.asarray(self.vectors.sum(1)).ravel()

    def _weights(self, item_vector, members, farthest):
        """exp(-d / D) of one item to its R* members, summing to 1."""
        d = 2.0 - 2.0 * (self.gallery[members] @ item_vector)
        w = np.exp(-d / farthest)
        return w / w.sum()

    def _reciprocal_vectors(self):
        n = len(self.gallery)
        rows, cols, vals = [], [], []
        for g in range(n):
            members = expand(self.full[g], self.half)
            rows.append(np.full(len(members), g))
            cols.append(members)
            vals.append(self._weights(self.gallery[g], members, self.farthest[g]))
        return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))

    def _expanded(self, v):
        """Local query expansion: each row the mean of the (unexpanded) rows of g and its top k2 - 1."""
        width = min(self.k2 - 1, self.candidates.shape[1])
        if width == 0:
            return v
        n = v.shape[0]
        qe_rows = np.repeat(np.arange(n), width + 1)
        qe_cols = np.concatenate([np.arange(n)[:, None], self.candidates[:, :width]], 1).ravel()
        mean = sparse.csr_matrix((np.full(len(qe_rows), 1.0 / (width + 1)), (qe_rows, qe_cols)), shape=(n, n))
        return (mean @ v).tocsr()

    def __call__(self, start, sims):
        if self.w == 0:
            return sims
        c, n = sims.shape
        excluded = self.exclusion.mask(start, c, n, sims.device).cpu().numpy()
        plain = sims.cpu().numpy().astype(np.float64)
        jaccard = np.empty((c, n))
        for row in range(c):
            farthest = largest_distance(plain[row][~excluded[row]].min(initial=1.0))  # D_q over the kept films
            jaccard[row] = farthest * self._query_jaccard(plain[row], excluded[row], farthest)
        sims.mul_(1 - self.w).sub_(torch.from_numpy((self.w / 2) * jaccard).to(sims))
        return sims

    def _query_jaccard(self, s, excluded, farthest):
        """d_J of one query to every gallery item (s: its plain similarities; farthest: D_q)."""
        out = np.flatnonzero(excluded)
        allowed = np.where(excluded, -np.inf, s)
        order = np.argsort(-allowed, kind="stable")[:int((~excluded).sum())]  # the items the query keeps
        top = order[:self.k1]
        # h is reciprocal when the query would enter h's top k1 among the items the query keeps
        kept_lists = [self.candidates[h][~excluded[self.candidates[h]]][:self.k1] for h in top]
        reciprocal = np.array([h for h, lst in zip(top, kept_lists)
                               if len(lst) < self.k1 or s[h] >= self.gallery[h] @ self.gallery[lst[-1]]],
                              dtype=np.int64)
        members = expand(np.sort(reciprocal), self.half, exclude=out) if len(reciprocal) else reciprocal
        if len(members) == 0:
            return np.ones(len(s))
        w = np.exp(-(2.0 - 2.0 * s[members]) / farthest)
        vector = sparse.csr_matrix((w / w.sum(), (np.zeros(len(members), dtype=np.int64), members)),
                                   shape=(1, len(s)))
        if self.k2 > 1 and len(order):  # local query expansion: the query's top k2 - 1 (unexpanded)
            expansion = self.base_vectors[order[:self.k2 - 1]]
            vector = (vector + expansion.sum(0)) / (1 + expansion.shape[0])
            vector = sparse.csr_matrix(vector)
        support, values = vector.indices, vector.data
        keep = ~excluded[support]  # the excluded films' entries of the neighbours' vectors leave
        support, values = support[keep], values[keep]
        block = self.columns[:, support].tocoo()  # (G, |S|): the gallery's entries on the support
        minimum = np.zeros(len(s))
        np.add.at(minimum, block.row, np.minimum(block.data, values[block.col]))
        norms = self.row_sums - (np.asarray(self.columns[:, out].sum(1)).ravel() if len(out) else 0.0)
        union = values.sum() + norms - minimum
        return 1.0 - np.divide(minimum, union, out=np.zeros(len(s)), where=union > 0)
