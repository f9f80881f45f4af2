"""Fast paths for large conv kernels: the same decompositions as `decompose.tensor` (HOSVD / HOOI,
TT-SVD, CP-ALS), computed so that a kernel of tens of millions of entries (a 1024 x 256 x 64
Conv1d kernel) takes seconds instead of minutes on a few CPU cores, and closed-form error curves
over every rank for the allocators.

Where the time went (profiles of compress(..., 0.5) on the 22M-parameter 1-D CNN of
benchmarks/compress_speed.py): TensorLy's CP-ALS (60 sweeps from a random start) at each of 6-12
keep levels of every layer (hours in all); TensorLy's HOOI and TT-SVD, and the HOSVD energies,
through LAPACK SVDs of wide unfoldings (1024 x 16384: 45-65 s each with MKL on 2 threads of a CPU
shared with other jobs, ~15 s on one thread), once per rank or sweep; and small LAPACK calls
(eigh, solve) that MKL's 2 OpenMP threads ran 10-80x slower than one thread under such load.
Here:

- Leading singular subspaces and spectra of a channel unfolding come from the eigendecomposition
  of its Gram matrix (float64), `thin_svd` does a QR first on a tall or wide matrix; both give
  the exact decomposition (to rounding) in a fraction of the time.
- Tucker-2 (HOSVD energies for every rank pair, HOOI from the HOSVD) and TT-SVD (errors of every
  rank from nested truncations: one Gram of the first unfolding, and right Grams of the second
  unfolding accumulated over r1) share these Grams.
- CP: `SlicedCP` is an explicit CP of the kernel with a closed-form error at every rank: rotate
  every mode but two (p, q) to its principal axes, take the SVD of each (p, q) slice, and keep the
  R largest singular triplets of all slices. The terms are orthogonal, so the error of keeping R is
  the energy of the rest. Its error is an upper bound of the best CP error at R, and the start of
  `cp_als`: CP-ALS whose mode products run as two large matrix products per sweep (the largest
  mode's MTTKRP as K_(h) @ khatri_rao(others), the others from P = A_h^T K_(h)), warm-started from
  the sliced CP, never returning a worse fit than its start.
- LAPACK factorizations of small matrices (eigh, the SVD of an R factor, Cholesky of ALS's normal
  equations excepted) run on one thread (`one_thread`).

Pure math on tensors: imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Entries of the largest temporary block (khatri-rao product or mode product) formed at once.
BLOCK = 1 << 23
# QR factorizations of matrices up to this many entries run on one thread (`thin_svd`): a 2048 x 128
# QR took 2 s on 2 threads of a loaded CPU (TT-SVD steps, once per rank under objective "feature").
SMALL_QR = 1 << 22


# -- threads ----------------------------------------------------------------------------------
@contextmanager
def one_thread() -> Iterator[None]:
    """Run LAPACK factorizations of small matrices (eigh, SVD of an R factor) on one thread: with
    MKL's OpenMP threads on a CPU shared with other processes, a 1024 x 1024 float64 eigh took
    8-16 s on 2 threads and 0.2 s on one (benchmarks/compress_speed.py). Large matrix products
    keep every thread."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


# -- singular subspaces -----------------------------------------------------------------------
def unfold(k: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-`mode` unfolding (d_mode, numel / d_mode), other modes in their order."""
    return k.movedim(mode, 0).reshape(k.shape[mode], -1)


def gram(m: torch.Tensor) -> torch.Tensor:
    """M M^T in float64 (rows x rows), accumulated over column blocks to bound memory."""
    rows, cols = m.shape
    out = torch.zeros(rows, rows, dtype=torch.float64)
    step = max(1, BLOCK // max(rows, 1))
    for s in range(0, cols, step):
        b = m[:, s : s + step].to(torch.float64)
        out += b @ b.T
    return out


def eig_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) of a symmetric PSD matrix, largest first, eigenvalues >= 0."""
    with one_thread():
        vals, vecs = torch.linalg.eigh(g)
    return vals.flip(0).clamp_min(0), vecs.flip(1)


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64; a tall or wide matrix (aspect >= 2) is reduced by a QR first (on one
    thread up to SMALL_QR entries), and the SVD of its R factor runs on one thread (the direct LAPACK SVD of a wide 1024 x 16384 matrix
    took 45 s on 2 threads of a shared CPU, this 2 s)."""
    a = m.to(torch.float64)
    rows, cols = a.shape
    if cols >= 2 * rows:
        u, s, vh = thin_svd(a.T)
        return vh.T, s, u.T
    if rows >= 2 * cols:
        with one_thread() if a.numel() <= SMALL_QR else contextlib.nullcontext():
            q, r = torch.linalg.qr(a)
        with one_thread():
            u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ u, s, vh
    with one_thread():
        return torch.linalg.svd(a, full_matrices=False)


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """All singular values of `m` (float64, non-increasing), by the SVD of the R factor of a QR
    of the tall orientation (as accurate as the direct SVD, several times faster on a long
    matrix)."""
    a = m.to(torch.float64)
    if a.shape[0] < a.shape[1]:
        a = a.T
    if a.shape[0] >= 2 * a.shape[1]:
        a = torch.linalg.qr(a, mode="r")[1]
    with one_thread():
        return torch.linalg.svdvals(a)


# -- Tucker-2 ---------------------------------------------------------------------------------
def hosvd_energy(k: torch.Tensor, grams: dict[int, torch.Tensor]) -> torch.Tensor:
    """As compressors.tucker2.hosvd_energy (E[a-1, b-1]: fraction of ||K||^2 the HOSVD keeps at
    ranks (a, b)), from the channel Grams `grams` {0: out x out, 1: in x in}."""
    _, u_out = eig_desc(grams[0])
    _, u_in = eig_desc(grams[1])
    total = float(grams[0].trace()) or 1.0
    r_out, r_in = min(k.shape[0], k[0].numel()), min(k.shape[1], k.numel() // k.shape[1])
    u_out, u_in = u_out[:, :r_out].to(k.dtype), u_in[:, :r_in].to(k.dtype)
    proj = torch.einsum("oi...,oa,ib->ab...", k, u_out, u_in)
    energy = (proj.to(torch.float64) ** 2).reshape(r_out, r_in, -1).sum(-1)
    return energy.cumsum(0).cumsum(1) / total


def _top(g: torch.Tensor, r: int) -> torch.Tensor:
    return eig_desc(g)[1][:, :r]


def hooi_sweep_flops(shape: tuple[int, ...], ranks: tuple[int, int]) -> float:
    """Floating-point operations of one `tucker2_hooi` sweep (projections and Grams)."""
    r_out, r_in = ranks
    out, inp, p = shape[0], shape[1], math.prod(shape[2:])
    return 2.0 * math.prod(shape) * (r_in + r_out) + 2.0 * p * (out * out * r_in + inp * inp * r_out)


def hooi_sweeps(shape: tuple[int, ...], ranks: tuple[int, int], n_iter_max: int, work: float) -> int:
    """Sweeps `tucker2_hooi` may run: at most `n_iter_max`, at least 1, within `work`."""
    return max(1, min(n_iter_max, int(work // hooi_sweep_flops(shape, ranks))))


def tucker2_hooi(
    k: torch.Tensor,
    ranks: tuple[int, int],
    grams: dict[int, torch.Tensor],
    *,
    n_iter_max: int,
    tol: float,
    work: float,
) -> tuple[list[torch.Tensor], int, bool, list[float]]:
    """HOOI (De Lathauwer et al. 2000b) of Tucker-2 from the HOSVD, each factor the leading
    eigenvectors of the Gram of the kernel projected on the other: at most `hooi_sweeps` sweeps
    (`n_iter_max`, and `work` floating-point operations in all), stopping early when the relative
    error changes by less than `tol` (TensorLy's rule). Returns ([core, U_out, U_in], sweeps run,
    converged, relative errors per sweep)."""
    r_out, r_in = ranks
    out, inp = k.shape[0], k.shape[1]
    u_out = _top(grams[0], r_out).to(k.dtype)
    u_in = _top(grams[1], r_in).to(k.dtype)
    norm2 = float(grams[0].trace()) or 1.0
    errors: list[float] = []
    converged = False
    for _ in range(hooi_sweeps(tuple(k.shape), ranks, n_iter_max, work)):
        y = torch.einsum("oi...,ib->ob...", k, u_in)  # (out, r_in, *k)
        u_out = _top(gram(y.reshape(out, -1)), r_out).to(k.dtype)
        z = torch.einsum("oi...,oa->ai...", k, u_out)  # (r_out, in, *k)
        g_in = gram(z.movedim(1, 0).reshape(inp, -1))
        vals, vecs = eig_desc(g_in)
        u_in = vecs[:, :r_in].to(k.dtype)
        kept = float(vals[:r_in].sum())
        errors.append(math.sqrt(max(0.0, norm2 - kept) / norm2))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            converged = True
            break
    core = torch.einsum("oi...,oa,ib->ab...", k, u_out, u_in)
    return [core.contiguous(), u_out.contiguous(), u_in.contiguous()], len(errors), converged, errors


# -- tensor train -----------------------------------------------------------------------------
def tt_errors_3way(
    ordered: torch.Tensor, ranks: list[tuple[int, int]], g_first: torch.Tensor
) -> list[float]:
    """Relative squared TT-SVD error of a 3-way tensor (n1, n2, n3) at each (r1, r2) of `ranks`,
    exact: TT-SVD keeps the leading r1 left vectors of the (n1, n2 n3) unfolding (Gram `g_first`),
    then the leading r2 of the ((r1 n2), n3) projection; the two dropped parts are orthogonal,
    so the error is the first step's dropped energy plus the second's. The second step's Gram is
    accumulated over r1 (nested), so all ranks cost one projection and one n3 x n3 Gram."""
    n1, n2, n3 = ordered.shape
    vals, u1 = eig_desc(g_first)
    total = float(vals.sum()) or 1.0
    top_r1 = max(r1 for r1, _ in ranks)
    m = torch.einsum("abc,ar->rbc", ordered, u1[:, :top_r1].to(ordered.dtype))  # (r1, n2, n3)
    out: dict[tuple[int, int], float] = {}
    g = torch.zeros(n3, n3, dtype=torch.float64)
    done = 0
    for r1 in sorted({r1 for r1, _ in ranks}):
        if r1 > done:
            g += gram(m[done:r1].reshape(-1, n3).T)
            done = r1
        ev = eig_desc(g)[0]
        for rr1, r2 in ranks:
            if rr1 == r1:
                out[(rr1, r2)] = max(0.0, total - float(ev[:r2].sum())) / total
    return [out[r] for r in ranks]


def tt_errors(
    ordered: torch.Tensor, ranks: list[tuple[int, ...]], g_first: torch.Tensor
) -> list[float]:
    """Relative squared TT-SVD error at each rank tuple of `ranks` (exact): `tt_errors_3way` for
    a 3-way tensor; otherwise the first step is shared (leading vectors of `g_first`) and the
    others run per rank, the error being the energy the last step drops in all (the dropped
    parts of the steps are orthogonal)."""
    if ordered.ndim == 3:
        return tt_errors_3way(ordered, [tuple(r) for r in ranks], g_first)  # type: ignore[misc]
    dims = ordered.shape
    vals, u1 = eig_desc(g_first)
    total = float(vals.sum()) or 1.0
    top = max(r[0] for r in ranks)
    proj = u1[:, :top].T @ ordered.reshape(dims[0], -1).to(torch.float64)  # (top, rest)
    out = []
    for r in ranks:
        rest, bond = proj[: r[0]], r[0]
        for j in range(1, len(dims) - 1):
            _, s, vh = thin_svd(rest.reshape(bond * dims[j], -1))
            bond = min(r[j], s.numel())
            rest = s[:bond, None] * vh[:bond]
        out.append(max(0.0, total - float((rest**2).sum())) / total)
    return out


def tt_svd(
    ordered: torch.Tensor, ranks: tuple[int, ...], g_first: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011) with `thin_svd` at each step (the first step from the leading
    eigenvectors of its Gram `g_first` when given): cores (r_{j-1}, n_j, r_j), the last one
    carrying the singular values (as TensorLy's `tensor_train`)."""
    dims = ordered.shape
    bonds = [1, *ranks, 1]
    cores: list[torch.Tensor] = []
    rest = ordered.to(torch.float64)
    for j in range(len(dims) - 1):
        mat = rest.reshape(bonds[j] * dims[j], -1)
        if j == 0 and g_first is not None:
            r = min(bonds[1], mat.shape[0], mat.shape[1])
            u = eig_desc(g_first)[1][:, :r]
            bonds[1] = r
            cores.append(u.reshape(1, dims[0], r))
            rest = u.T @ mat
            continue
        u, s, vh = thin_svd(mat)
        r = min(bonds[j + 1], s.numel())
        bonds[j + 1] = r
        cores.append(u[:, :r].reshape(bonds[j], dims[j], r))
        rest = s[:r, None] * vh[:r]
    cores.append(rest.reshape(bonds[-2], dims[-1], 1))
    return [c.to(ordered.dtype).contiguous() for c in cores]


# -- CP ---------------------------------------------------------------------------------------
class SlicedCP:
    """Explicit CP terms of a kernel with orthogonal terms, for every pair (p, q) of modes: the
    other modes rotated to their principal axes (eigenvectors of their Grams), the SVD of every
    (p, q) slice. `errors(R)` is the relative squared error of keeping the R strongest terms
    (best pair per R); `factors(R)` builds them."""

    def __init__(self, k: torch.Tensor, grams: dict[int, torch.Tensor]) -> None:
        self.k = k
        self.n = k.ndim
        self.bases = {m: eig_desc(grams[m])[1] for m in range(self.n)}
        self.total = float(grams[0].trace()) or 1.0
        self.pairs = [(p, q) for p in range(self.n) for q in range(p + 1, self.n)]
        self.cum: dict[tuple[int, int], torch.Tensor] = {}
        self.energy: dict[tuple[int, int], torch.Tensor] = {}  # (S, c), largest first per slice
        for pair in self.pairs:
            slices = self._slices(pair)  # (S, d_p, d_q)
            small = min(slices.shape[1], slices.shape[2])
            side = slices if slices.shape[1] == small else slices.transpose(1, 2)
            side = side.to(torch.float64)
            with one_thread():
                energy = torch.linalg.eigvalsh(side @ side.transpose(1, 2))
            energy = energy.clamp_min(0).flip(-1)
            self.energy[pair] = energy
            self.cum[pair] = torch.sort(energy.reshape(-1), descending=True).values.cumsum(0)

    def _others(self, pair: tuple[int, int]) -> list[int]:
        return [m for m in range(self.n) if m not in pair]

    def _slices(self, pair: tuple[int, int]) -> torch.Tensor:
        """The kernel with the other modes rotated, as (S, d_p, d_q) slices (S = their product,
        row-major over the other modes in order)."""
        t = self.k
        for m in self._others(pair):
            t = torch.tensordot(t, self.bases[m].to(t.dtype), dims=([m], [0])).movedim(-1, m)
        p, q = pair
        t = t.permute(*self._others(pair), p, q).reshape(-1, self.k.shape[p], self.k.shape[q])
        return t.contiguous()

    def best_pair(self, rank: int) -> tuple[int, int]:
        def err(pair):
            cum = self.cum[pair]
            return -float(cum[min(rank, cum.numel()) - 1])

        return min(self.pairs, key=err)

    def errors(self, rank: int) -> float:
        """Relative squared error of the sliced CP at `rank` (best pair)."""
        cum = self.cum[self.best_pair(rank)]
        return max(0.0, 1.0 - float(cum[min(rank, cum.numel()) - 1]) / self.total)

    def factors(self, rank: int) -> list[torch.Tensor]:
        """CP factors (d_m, rank) of the `rank` strongest terms of the best pair (columns beyond
        the kernel's terms are zero), float64."""
        pair = self.best_pair(rank)
        p, q = pair
        others = self._others(pair)
        energy = self.energy[pair]
        c = energy.shape[1]
        take = torch.argsort(energy.reshape(-1), descending=True)[:rank]
        idx_slice, idx_comp = take // c, take % c
        needed = torch.unique(idx_slice)  # SVD only the slices that hold a kept term
        where = torch.full((energy.shape[0],), -1, dtype=torch.long)
        where[needed] = torch.arange(needed.numel())
        slices = self._slices(pair)[needed].to(torch.float64)  # (N, d_p, d_q)
        # singular vectors from the Gram of each slice's smaller side (the batched LAPACK SVD of
        # 64 slices 1024 x 256 took 30-70 s on 2 shared cores)
        flip = slices.shape[1] < slices.shape[2]
        side = slices.transpose(1, 2) if flip else slices  # (N, big, small)
        with one_thread():
            vals, vecs = torch.linalg.eigh(side.transpose(1, 2) @ side)
        vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)  # (N, c), (N, small, c)
        row = where[idx_slice]
        sigma = vals[row, idx_comp].sqrt()
        small_vec = vecs[row, :, idx_comp]  # (n, small)
        big_vec = (side @ vecs)[row, :, idx_comp]  # (n, big): sigma * unit vector
        tiny = sigma <= 1e-12 * float(sigma.max()) if sigma.numel() else sigma.bool()
        big_vec[tiny] = 0.0  # a term of (numerically) zero energy: no direction to keep
        out = [torch.zeros(self.k.shape[m], rank, dtype=torch.float64) for m in range(self.n)]
        n = take.numel()
        first, second = (big_vec, small_vec) if not flip else (small_vec, big_vec)
        out[p][:, :n] = first.T
        out[q][:, :n] = second.T
        sizes = [self.k.shape[m] for m in others]
        rem = idx_slice.clone()
        for m, size in reversed(list(zip(others, sizes))):
            out[m][:, :n] = self.bases[m][:, rem % size]
            rem = rem // size
        return out


def khatri_rao_block(factors: list[torch.Tensor], cols: slice) -> torch.Tensor:
    """Rows (i_1, ..., i_m) row-major, columns `cols`: prod_j factors[j][i_j, r]."""
    out = factors[0][:, cols]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, cols]).reshape(-1, out.shape[1])
    return out


def _solve(v: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """X (d, R) with X (V + ridge I) = rhs (d, R), V symmetric PSD (the ridge is added to V in
    place): Cholesky in V's dtype (float32 for float32 kernels, as TensorLy's parafac), again in
    float64 where that fails, least squares last."""
    v.diagonal().add_(ridge)
    chol, info = torch.linalg.cholesky_ex(v)
    if int(info) != 0:
        chol, info = torch.linalg.cholesky_ex(v.double())
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T.to(chol.dtype), chol).T.to(rhs.dtype)
    del chol
    return torch.linalg.lstsq(v.double(), rhs.T.double()).solution.T.to(rhs.dtype)


def _hadamard(grams: list[torch.Tensor], skip: int) -> torch.Tensor:
    """The elementwise product of every Gram but grams[skip] (a new R x R tensor)."""
    rest = [g for i, g in enumerate(grams) if i != skip]
    out = rest[0].clone()
    for g in rest[1:]:
        out.mul_(g)
    return out


def als_sweep_flops(shape: tuple[int, ...], rank: int) -> float:
    """Floating-point operations of one `cp_als` sweep (the two large matrix products)."""
    return 4.0 * math.prod(shape) * rank


def als_sweeps(shape: tuple[int, ...], rank: int, n_iter_max: int, work: float) -> int:
    """Sweeps `cp_als` may run: at most `n_iter_max`, at least 1, within `work`."""
    return max(1, min(n_iter_max, int(work // als_sweep_flops(shape, rank))))


def cp_rel_error(k: torch.Tensor, factors: list[torch.Tensor]) -> float:
    """||K - K_hat|| / ||K|| of CP factors (d_m, R), the reconstruction formed in blocks of R
    (sums of squares in float64)."""
    rank = factors[0].shape[1]
    rest = math.prod(f.shape[0] for f in factors[1:])
    step = max(1, BLOCK // max(rest, 1))
    others = [f.to(k.dtype) for f in factors[1:]]
    diff = -k.reshape(k.shape[0], -1).clone()
    for s in range(0, rank, step):
        cols = slice(s, min(rank, s + step))
        diff += factors[0][:, cols].to(k.dtype) @ khatri_rao_block(others, cols).T
    norm2 = _sumsq(k)
    if norm2 == 0:
        return 0.0
    return math.sqrt(_sumsq(diff) / norm2)


def cp_matrix(factors: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The mode-0 unfolding (d_0, prod of the other d_m) of the CP tensor of factors (d_m, R),
    formed in blocks of R (no (d_0, ..., R) temporary), in `dtype`."""
    rank = factors[0].shape[1]
    others = [f.to(dtype) for f in factors[1:]]
    rest = math.prod(f.shape[0] for f in others)
    step = max(1, BLOCK // max(rest, 1))
    out = torch.zeros(factors[0].shape[0], rest, dtype=dtype)
    for s in range(0, rank, step):
        cols = slice(s, min(rank, s + step))
        out += factors[0][:, cols].to(dtype) @ khatri_rao_block(others, cols).T
    return out


def _sumsq(t: torch.Tensor) -> float:
    """Sum of squares in float64, in blocks."""
    flat = t.reshape(-1)
    return sum(
        float((flat[s : s + BLOCK].to(torch.float64) ** 2).sum())
        for s in range(0, flat.numel(), BLOCK)
    )


def cp_als(
    k: torch.Tensor,
    factors: list[torch.Tensor],
    *,
    n_iter_max: int,
    tol: float,
    ridge: float,
) -> tuple[list[torch.Tensor], list[float], float, bool]:
    """CP-ALS (Kolda & Bader 2009, Sec. 3.4) of `k` (unit norm) from `factors` (d_m, R), with a
    ridge on each normal equation as TensorLy's `l2_reg`. Each sweep updates the largest mode h
    from K_(h) @ khatri_rao(others) and the other modes from P = A_h^T K_(h) (two large matrix
    products per sweep instead of one per mode; P is kept, R x numel / d_h entries). Stops after
    `n_iter_max` sweeps or when the relative error changes by less than `tol`. Returns (factors
    of the best fit met, the start included; relative errors per sweep; relative error of the
    start; whether `tol` stopped it). Errors come from the MTTKRP of the last mode updated:
    ||K - K_hat||^2 = 1 - 2 <K, K_hat> + sum of the Grams' elementwise product."""
    dtype = k.dtype
    shape = tuple(k.shape)
    n = len(shape)
    h = max(range(n), key=lambda m: shape[m])
    others = [m for m in range(n) if m != h]
    kh = unfold(k, h)  # (d_h, rest), rest row-major over `others`
    rest = kh.shape[1]
    rank = factors[0].shape[1]
    f = [x.to(dtype).contiguous() for x in factors]
    grams = [x.T @ x for x in f]  # in the factors' dtype (float32 as TensorLy's parafac)
    step = max(1, BLOCK // max(rest, 1))

    def error_of(last: int, m_last: torch.Tensor, v_last: torch.Tensor | None = None) -> float:
        """Relative error with f[last] just fitted to m_last; v_last: the Hadamard product of
        the other Grams with the ridge on its diagonal (as `_solve` left it), or None."""
        inner = float(torch.dot(f[last].reshape(-1).double(), m_last.reshape(-1).double()))
        ridged = v_last is not None
        v_last = _hadamard(grams, last) if v_last is None else v_last
        norm2 = float(torch.dot(v_last.reshape(-1).double(), grams[last].reshape(-1).double()))
        if ridged:
            norm2 -= ridge * float(grams[last].double().trace())
        return math.sqrt(max(0.0, 1.0 - 2.0 * inner + norm2))

    def mttkrp_head() -> torch.Tensor:
        m = torch.empty(shape[h], rank, dtype=dtype)
        others_f = [f[o] for o in others]
        for s in range(0, rank, step):
            cols = slice(s, min(rank, s + step))
            m[:, cols] = kh @ khatri_rao_block(others_f, cols)
        return m

    letters = "bcdefg"[: len(others)]

    def mttkrp_other(p: torch.Tensor, j: int) -> torch.Tensor:
        """MTTKRP of others[j] from P (R, *others), in blocks of R (no full-size temporaries)."""
        terms = [f"{letters[i]}r" for i in range(len(others)) if i != j]
        spec = f"r{letters}," + ",".join(terms) + f"->{letters[j]}r"
        out = torch.empty(shape[others[j]], rank, dtype=dtype)
        mats = [f[others[i]] for i in range(len(others)) if i != j]
        for s in range(0, rank, step):
            cols = slice(s, min(rank, s + step))
            out[:, cols] = torch.einsum(spec, p[cols], *[x[:, cols] for x in mats])
        return out

    start = [x.clone() for x in f]
    best: tuple[list[torch.Tensor], float] | None = None
    errors: list[float] = []
    start_err = math.inf
    for sweep in range(n_iter_max):
        # head mode (its MTTKRP before the update also gives the start's error)
        m_h = mttkrp_head()
        if sweep == 0:
            start_err = error_of(h, m_h)
            best = (start, start_err)
        f[h] = _solve(_hadamard(grams, h), m_h, ridge)
        grams[h] = f[h].T @ f[h]
        del m_h
        # P = A_h^T K_(h): (R, *others)
        p = torch.empty(rank, rest, dtype=dtype)
        for s in range(0, rank, step):
            cols = slice(s, min(rank, s + step))
            p[cols] = f[h][:, cols].T @ kh
        p = p.reshape(rank, *[shape[o] for o in others])
        for j, o in enumerate(others):
            m_o = mttkrp_other(p, j)
            v = _hadamard(grams, o)
            f[o] = _solve(v, m_o, ridge)
            grams[o] = f[o].T @ f[o]
            if j < len(others) - 1:
                del v, m_o
        del p
        err = error_of(others[-1], m_o, v)
        del v, m_o
        errors.append(err)
        if err < best[1]:
            best = ([x.clone() for x in f], err)
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            return best[0], errors, start_err, True
    if best is None:  # n_iter_max < 1
        return start, errors, error_of(h, mttkrp_head()), False
    return best[0], errors, start_err, False
