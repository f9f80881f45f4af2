"""One-dimensional k-means: the exact optimum by dynamic programming, and Lloyd's algorithm.

Each row of a (B, n) tensor is clustered on its own (B = 1: one codebook per layer; B = output
channels: one per channel). Centers are float64 (B, k), sorted; arithmetic is float64.

- Exact (`kmeans_1d_dp`, `optimal_sse_curve`): Wang & Song 2011, "Ckmeans.1d.dp: optimal k-means
  clustering in one dimension by dynamic programming", Eq. 2-3. On sorted values the optimal
  clusters are intervals, and D[q][i] = min_j D[q-1][j-1] + SSE(x_j..x_i) is the best cost of the
  first i+1 values in q+1 clusters; SSE(j, i) comes from prefix sums in O(1). The interval cost is
  Monge (Gronlund et al. 2017, "Fast exact k-means, k-medians and Bregman divergence clustering in
  1D", Lemma 2.1), so the leftmost argmin j(i) is non-decreasing in i (and in q): each row is
  filled by divide and conquer in O(n log n), all sub-problems of one recursion depth in one numpy
  pass. It runs on the distinct values with their multiplicities; backtracking reads a (k, n)
  table of argmins, and any k up to the largest has its optimum in the same table.
- Lloyd (`kmeans_1d_lloyd`, Lloyd 1982) on sorted values: one iteration is O(k log n) (cluster
  boundaries by binary search at the midpoints of the centers, sums by prefix sums); the SSE never
  increases, so the result is never worse than the start.
- `kmeans_1d` / `kmeans_1d_all`: the exact DP when (distinct values) x k <= `DP_LIMIT` (time and
  the argmin table grow with it). Above, the DP on a summary of each row (at most
  `SUMMARY_POINTS` points: the union of equal-count and equal-width bins, each at its mean with
  its count as weight; the DP is then exact among partitions that do not split a bin) refined by
  Lloyd on all values, and Lloyd from the uniform grid over [min, max]; per row the lower SSE wins,
  so the result is never worse than uniform quantization with k levels. benchmarks/quant_kmeans.py
  measures this against the exact DP and against Lloyd from k-means++ seeding on a 1M-value layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from tensorslim.decompose.large import one_thread

# Largest (distinct values x k) solved exactly: about 1 s on one core (4096 values, k = 256).
DP_LIMIT = 1 << 20
# Points each row is summarised into above DP_LIMIT (half equal-count, half equal-width bins).
SUMMARY_POINTS = 4096
# Lloyd stops when no cluster boundary moves, or after this many iterations.
LLOYD_ITERS = 300

F = TypeVar("F", bound=Callable)


def _single_threaded(fn: F) -> F:
    """Run `fn` on one thread: its many small gathers are dominated by thread synchronisation on
    a shared CPU (an 8k-element gather took 0.2 ms on one thread, 50 ms on two under load)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


# -- helpers --------------------------------------------------------------------------------------
def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as sorted float64 rows (B, n); a 1-D tensor is one row."""
    x = x.detach().to(device="cpu", dtype=torch.float64)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    if x.numel() == 0:
        raise ValueError("k-means of an empty tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means of a tensor with NaN or infinite values")
    return torch.sort(x, dim=1).values


def _distinct(xs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of each sorted row of `xs` (B, n), rows concatenated: (values, counts,
    row starts (B + 1,))."""
    a = xs.numpy()
    b, n = a.shape
    new = np.ones(a.shape, dtype=bool)
    new[:, 1:] = a[:, 1:] != a[:, :-1]
    pos = np.flatnonzero(new)
    counts = np.diff(np.append(pos, b * n)).astype(np.float64)
    starts = np.zeros(b + 1, dtype=np.int64)
    starts[1:] = np.cumsum(new.sum(axis=1))
    return a.reshape(-1)[pos], counts, starts


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of `x` (B, n)) of the nearest of each row's sorted `centers` (B, k),
    by binary search at the midpoints (a value exactly at a midpoint goes to the lower one)."""
    c = centers.to(x.dtype)
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, x.contiguous())


@_single_threaded
def sse(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared distance of each value of each row of `x` ((n,) or (B, n)) to its nearest center
    ((B, k), any order), summed per row: float64 (B,)."""
    xs = _sorted_rows(x)
    c = torch.sort(centers.to(torch.float64).reshape(xs.shape[0], -1), dim=1).values
    return ((xs - c.gather(1, nearest(xs, c))) ** 2).sum(dim=1)


# -- the exact dynamic program --------------------------------------------------------------------
def _dp(
    v: np.ndarray, w: np.ndarray, st: np.ndarray, k: int, ks: Sequence[int]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The DP of Wang & Song (2011) on weighted sorted points, rows concatenated (row r holds
    points st[r]..st[r+1]-1; with `ks`, more than min(ks) of them).

    Row q (q + 1 clusters) is filled by divide and conquer over i, the leftmost argmin j(i) being
    non-decreasing in i and bounded below by row q-1's argmin at the same i.

    Returns (best (k, B): optimal SSE of each row in q + 1 clusters (inf where a row has fewer
    points), {k': cluster starts (B, k') of the k'-cluster optimum} for each k' in `ks`; a row
    with at most k' points gets -1 there)."""
    n_rows, total = st.size - 1, v.size
    p0 = np.concatenate([[0.0], np.cumsum(w)])
    p1 = np.concatenate([[0.0], np.cumsum(w * v)])
    p2 = np.concatenate([[0.0], np.cumsum(w * v * v)])

    def cost(j: np.ndarray, i: np.ndarray) -> np.ndarray:
        s = p1[i + 1] - p1[j]
        return np.maximum(p2[i + 1] - p2[j] - s * s / (p0[i + 1] - p0[j]), 0.0)

    row_start, row_end = st[:-1], st[1:] - 1  # inclusive ends
    lower = np.repeat(row_start, st[1:] - st[:-1])  # row 0's argmins: the row's first point
    prev = cost(lower, np.arange(total))
    best = np.full((k, n_rows), np.inf)
    best[0] = prev[row_end]
    table = np.empty((k, total), dtype=np.int64) if ks else None
    if table is not None:
        table[0] = lower
    for q in range(1, k):
        cur = np.full(total, np.inf)
        arg = lower.copy()
        open_ = row_start + q <= row_end
        ilo, ihi = row_start[open_] + q, row_end[open_]
        jlo, jhi = ilo.copy(), ihi.copy()
        while ilo.size:
            mid = (ilo + ihi) // 2
            top = np.minimum(mid, jhi)
            lo = np.minimum(np.maximum(jlo, lower[mid]), top)
            cnt = top - lo + 1
            offset = np.cumsum(cnt) - cnt
            seg = np.repeat(np.arange(mid.size), cnt)
            j = np.arange(seg.size) - np.repeat(offset - lo, cnt)
            val = prev[j - 1] + cost(j, mid[seg])
            seg_min = np.minimum.reduceat(val, offset)
            jbest = np.minimum.reduceat(np.where(val <= seg_min[seg], j, total), offset)
            cur[mid] = seg_min
            arg[mid] = jbest
            left = ilo <= mid - 1
            right = mid + 1 <= ihi
            ilo, ihi, jlo, jhi = (
                np.concatenate([ilo[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, ihi[right]]),
                np.concatenate([jlo[left], jbest[right]]),
                np.concatenate([jbest[left], jhi[right]]),
            )
        prev, lower = cur, arg
        best[q] = cur[row_end]
        if table is not None:
            table[q] = arg
    cuts: dict[int, np.ndarray] = {}
    for kk in ks if table is not None else ():
        out = np.full((n_rows, kk), -1, dtype=np.int64)
        rows = np.flatnonzero(st[1:] - st[:-1] > kk)
        i = row_end[rows]
        for q in range(kk - 1, -1, -1):
            out[rows, q] = table[q, i]
            i = out[rows, q] - 1
        cuts[kk] = out
    return best, cuts


def _cluster_means(
    v: np.ndarray, w: np.ndarray, st: np.ndarray, rows: np.ndarray, cuts: np.ndarray
) -> np.ndarray:
    """Weighted means (len(rows), k) of the clusters of the given rows (points st[r]..st[r+1]-1)
    starting at the global point indices `cuts` (len(rows), k)."""
    k = cuts.shape[1]
    points = np.concatenate([np.arange(st[r], st[r + 1]) for r in rows])
    label = np.searchsorted(cuts.reshape(-1), points, side="right") - 1
    sums = np.bincount(label, (w * v)[points], rows.size * k)
    wsum = np.bincount(label, w[points], rows.size * k)
    return (sums / wsum).reshape(rows.size, k)


def _solve(
    v: np.ndarray, w: np.ndarray, st: np.ndarray, ks: Sequence[int]
) -> dict[int, np.ndarray]:
    """Optimal centers {k: (B, k)} of weighted sorted points (rows concatenated at `st`); a row
    with at most k points gets them exactly (padded with its largest)."""
    sizes = st[1:] - st[:-1]
    n_rows = sizes.size
    out = {k: np.empty((n_rows, k)) for k in ks}
    need = sizes > min(ks)
    if need.any():
        rows = np.flatnonzero(need)
        idx = np.concatenate([np.arange(st[r], st[r + 1]) for r in rows])
        sub_st = np.zeros(rows.size + 1, dtype=np.int64)
        sub_st[1:] = np.cumsum(sizes[rows])
        sv, sw = v[idx], w[idx]
        # center each row: prefix sums of shifted values lose less to cancellation
        row_of = np.repeat(np.arange(rows.size), sizes[rows])
        shift = np.bincount(row_of, sv * sw) / np.bincount(row_of, sw)
        sv = sv - shift[row_of]
        _, cuts = _dp(sv, sw, sub_st, max(ks), ks)
    for k in ks:
        for r in np.flatnonzero(sizes <= k):  # the distinct values themselves
            vals = v[st[r] : st[r + 1]]
            out[k][r, : vals.size] = vals
            out[k][r, vals.size :] = vals[-1]
        big = np.flatnonzero(sizes > k)
        if big.size:
            sub = np.searchsorted(rows, big)  # positions among the DP's rows
            means = _cluster_means(sv, sw, sub_st, sub, cuts[k][sub])
            out[k][big] = means + shift[sub][:, None]
    return out


@_single_threaded
def kmeans_1d_dp(x: torch.Tensor, k: int) -> torch.Tensor:
    """The optimal k-means centers of each row of `x` ((n,) or (B, n)): float64 (B, k), sorted.
    A row with at most k distinct values gets exactly them (padded by repeating its largest)."""
    _check_k(k)
    v, w, st = _distinct(_sorted_rows(x))
    return torch.from_numpy(_solve(v, w, st, [k])[k])


@_single_threaded
def optimal_sse_curve(x: torch.Tensor, k_max: int) -> torch.Tensor:
    """The optimal k-means SSE of each row of `x` for k = 1..k_max from one DP: float64
    (B, k_max), non-increasing, 0 from a row's number of distinct values on."""
    _check_k(k_max)
    v, w, st = _distinct(_sorted_rows(x))
    row_of = np.repeat(np.arange(st.size - 1), st[1:] - st[:-1])
    shift = np.bincount(row_of, v * w) / np.bincount(row_of, w)
    best, _ = _dp(v - shift[row_of], w, st, k_max, [])
    best[~np.isfinite(best)] = 0.0  # more clusters than distinct values: every value exact
    return torch.from_numpy(np.minimum.accumulate(best, axis=0).T.copy())


# -- Lloyd ----------------------------------------------------------------------------------------
def _lloyd(xs: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd from centers `c` (B, k) on sorted rows `xs` (B, n); an empty cluster keeps its
    center."""
    b, n = xs.shape
    shift = xs.mean(dim=1, keepdim=True)
    xc = (xs - shift).contiguous()
    c = torch.sort(c.to(torch.float64) - shift, dim=1).values
    p1 = torch.cat([torch.zeros(b, 1, dtype=torch.float64), torch.cumsum(xc, 1)], dim=1)
    zero = torch.zeros(b, 1, dtype=torch.int64)
    full = torch.full((b, 1), n, dtype=torch.int64)
    edges = None
    for _ in range(iters):
        cut = torch.searchsorted(xc, ((c[:, 1:] + c[:, :-1]) / 2).contiguous(), right=True)
        new_edges = torch.cat([zero, cut, full], dim=1)
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        cnt = (edges[:, 1:] - edges[:, :-1]).to(torch.float64)
        sums = p1.gather(1, edges[:, 1:]) - p1.gather(1, edges[:, :-1])
        c = torch.sort(torch.where(cnt > 0, sums / cnt.clamp_min(1), c), dim=1).values
    return c + shift


@_single_threaded
def kmeans_1d_lloyd(
    x: torch.Tensor, centers: torch.Tensor, iters: int = LLOYD_ITERS
) -> torch.Tensor:
    """Lloyd's algorithm on each row of `x` ((n,) or (B, n)) from `centers` (B, k): float64
    (B, k), sorted; its SSE is at most the start's."""
    xs = _sorted_rows(x)
    return _lloyd(xs, centers.reshape(xs.shape[0], -1), iters)


@_single_threaded
def kmeans_pp_init(
    x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) of each row of `x`: float64 (B, k), sorted.
    Each next center is drawn with probability proportional to the squared distance to the
    nearest center so far."""
    _check_k(k)
    xs = _sorted_rows(x)
    first = torch.randint(xs.shape[1], (xs.shape[0], 1), generator=generator)
    c = xs.gather(1, first)
    d2 = (xs - c) ** 2
    for _ in range(1, k):
        weights = d2.clone()
        weights[weights.sum(dim=1) <= 0] = 1.0  # every value is a center: draw uniformly
        new = xs.gather(1, torch.multinomial(weights, 1, generator=generator))
        c = torch.cat([c, new], dim=1)
        d2 = torch.minimum(d2, (xs - new) ** 2)
    return torch.sort(c, dim=1).values


def uniform_levels(x: torch.Tensor, k: int) -> torch.Tensor:
    """k evenly spaced levels over [min, max] of each row of `x`: float64 (B, k)."""
    xs = x.detach().to(torch.float64)
    xs = xs.reshape(1, -1) if xs.ndim == 1 else xs
    lo, hi = xs.min(dim=1, keepdim=True).values, xs.max(dim=1, keepdim=True).values
    t = torch.linspace(0, 1, k, dtype=torch.float64)[None] if k > 1 else torch.zeros(1, 1)
    return lo + (hi - lo) * t.to(torch.float64)


# -- the choice -----------------------------------------------------------------------------------
def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")


def _summary(xs: torch.Tensor, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sorted row of `xs` cut at the union of points/2 equal-count and points/2 equal-width
    boundaries; the non-empty bins as weighted points (means, counts, row starts)."""
    a = xs.numpy()
    b, n = a.shape
    half = max(1, points // 2)
    by_count = np.round(np.linspace(0, n, half + 1)[1:-1]).astype(np.int64)
    lo, hi = a[:, :1], a[:, -1:]
    grid = lo + (hi - lo) * np.linspace(0, 1, half + 1)[None, 1:-1]
    by_width = np.stack([np.searchsorted(a[r], grid[r]) for r in range(b)])
    edges = np.concatenate(
        [np.zeros((b, 1), np.int64), np.broadcast_to(by_count, (b, by_count.size)), by_width,
         np.full((b, 1), n, np.int64)], axis=1,
    )
    edges.sort(axis=1)
    p1 = np.concatenate([np.zeros((b, 1)), np.cumsum(a, axis=1)], axis=1)
    cnt = np.diff(edges, axis=1)
    sums = np.take_along_axis(p1, edges[:, 1:], 1) - np.take_along_axis(p1, edges[:, :-1], 1)
    keep = cnt > 0
    starts = np.zeros(b + 1, dtype=np.int64)
    starts[1:] = np.cumsum(keep.sum(axis=1))
    return sums[keep] / cnt[keep], cnt[keep].astype(np.float64), starts


def exact_feasible(x: torch.Tensor, k: int, dp_limit: int = DP_LIMIT) -> bool:
    """Whether `kmeans_1d` solves `x` ((n,) or (B, n)) at k exactly (its DP)."""
    v, _, _ = _distinct(_sorted_rows(x))
    return v.size * k <= dp_limit


@_single_threaded
def kmeans_1d_all(
    x: torch.Tensor,
    ks: Sequence[int],
    *,
    dp_limit: int = DP_LIMIT,
    summary_points: int = SUMMARY_POINTS,
) -> dict[int, torch.Tensor]:
    """k-means centers {k: float64 (B, k), sorted} of each row of `x` ((n,) or (B, n)) for every
    k in `ks`, from one DP: exact when the distinct values times max(ks) are at most
    `dp_limit`, else as the module docstring says (summary DP + Lloyd, or Lloyd from the uniform
    grid, the lower SSE per row)."""
    ks = sorted(set(ks))
    for k in ks:
        _check_k(k)
    xs = _sorted_rows(x)
    v, w, st = _distinct(xs)
    k_max = ks[-1]
    if v.size * k_max <= dp_limit:
        exact = _solve(v, w, st, ks)
        return {k: torch.from_numpy(c) for k, c in exact.items()}
    b = xs.shape[0]
    points = min(summary_points, dp_limit // (k_max * b))
    if points >= 2 * k_max:
        sv, sw, sst = _summary(xs, points)
        starts = {k: torch.from_numpy(c) for k, c in _solve(sv, sw, sst, ks).items()}
    else:  # too little room for a summary: the means of k equal-count chunks
        starts = {k: _chunk_means(xs, k) for k in ks}
    sizes = torch.from_numpy(st[1:] - st[:-1])
    out = {}
    for k in ks:
        a = _lloyd(xs, starts[k], LLOYD_ITERS)
        u = _lloyd(xs, uniform_levels(xs, k), LLOYD_ITERS)
        c = torch.where((_row_sse(xs, u) < _row_sse(xs, a))[:, None], u, a)
        few = torch.nonzero(sizes <= k).squeeze(1)
        if few.numel():  # at most k distinct values: exactly those
            rows = few.numpy()
            idx = np.concatenate([np.arange(st[r], st[r + 1]) for r in rows])
            sub_st = np.zeros(rows.size + 1, dtype=np.int64)
            sub_st[1:] = np.cumsum(st[rows + 1] - st[rows])
            c[few] = torch.from_numpy(_solve(v[idx], w[idx], sub_st, [k])[k])
        out[k] = c
    return out


def _row_sse(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((xs - c.gather(1, nearest(xs, c))) ** 2).sum(dim=1)


def _chunk_means(xs: torch.Tensor, k: int) -> torch.Tensor:
    n = xs.shape[1]
    edges = torch.linspace(0, n, k + 1).round().long()
    return torch.stack(
        [xs[:, a:b].mean(dim=1) if b > a else xs[:, min(a, n - 1)] for a, b in
         zip(edges[:-1].tolist(), edges[1:].tolist())], dim=1,
    )


def kmeans_1d(x: torch.Tensor, k: int, *, dp_limit: int = DP_LIMIT) -> torch.Tensor:
    """k-means centers of each row of `x` ((n,) or (B, n)): float64 (B, k), sorted (see
    `kmeans_1d_all`)."""
    return kmeans_1d_all(x, [k], dp_limit=dp_limit)[k]
