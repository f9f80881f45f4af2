"""Tensor decompositions of convolution kernels: CP, Tucker-2, tensor-train and spatial SVD.

A kernel K has shape (out, in, *k) with k = (kh, kw) for Conv2d or (kw,) for Conv1d, as in torch.
Every function returns plain tensors (factors) and the facts an allocator or a plan needs
(iterations, final relative error). Parameter counts of each format are given by `*_params`, the
largest rank that fits a fraction of the dense kernel by `*_rank_for_keep`. Kernels are decomposed
in float64 when they are float64 and in float32 otherwise (float16 and bfloat16 included, see
`compute_dtype`); the factors come back in that dtype and the caller casts them to the layer's.

Methods and their sources:
- CP (canonical polyadic), K[o,i,h,w] = sum_r A[o,r] B[i,r] C[h,r] D[w,r], fitted by alternating least
  squares (Carroll & Chang 1970; Kolda & Bader 2009, Sec. 3.4) with TensorLy's `parafac` on the torch
  backend. Used for convolutions by Lebedev et al. (ICLR 2015) and by Schuurmans et al. (ICLR 2023),
  whose setup we follow: random uniform initialisation, seeded. The mode products inside ALS
  (MTTKRP) run through TensorLy's einsum tenalg backend so that the Khatri-Rao product is never
  formed: memory stays O(numel(K) / in * R) instead of O(numel(K) * R) (a 512x512x3x3 kernel at rank
  1145 peaks below 0.5 GB).
- Tucker-2 (Kim et al., ICLR 2016): K = G x_0 U_out x_1 U_in with the spatial modes kept at full rank,
  G (r_out, r_in, *k). HOSVD (De Lathauwer, De Moor & Vandewalle 2000a): U = leading left singular
  vectors of each channel unfolding. HOOI (De Lathauwer et al. 2000b): alternating refinement starting
  from the HOSVD, via TensorLy's `partial_tucker`.
- Tensor-train / MPS (Oseledets 2011, TT-SVD), on the kernel reordered to (in, kh, kw, out) as in
  Schuurmans et al.: cores in x r1, r1 x kh x r2, r2 x kw x r3, r3 x out; via TensorLy's
  `tensor_train`.
- Spatial SVD (Jaderberg, Vedaldi & Zisserman 2014, scheme 2; closed form of Tai et al., ICLR 2016):
  the matrix M[(i,h),(o,w)] = K[o,i,h,w] truncated to rank r gives a vertical kh x 1 conv into r
  channels followed by a horizontal 1 x kw conv.

- Data-aware Tucker-2 (`DataTucker2`) and the spatial SVD's output errors on calibration inputs
  (`spatial_output_errors`), see the section at the end.

Pure math on tensors: this module imports nothing else from tensorslim but decompose.large's
`one_thread` (imports run downward).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker, tensor_train

from tensorslim.decompose.large import one_thread

# Largest explicit Khatri-Rao product (entries) CP-ALS may form; above it MTTKRP runs as einsum.
KHATRI_RAO_MAX = 1 << 16

# --------------------------------------------------------------------------------------------
# shapes and parameter counts


def _split(shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    if len(shape) not in (3, 4):
        raise ValueError(
            f"expected a Conv1d/Conv2d kernel (out, in, *k) with 1 or 2 spatial dims, got {shape}"
        )
    return shape[0], shape[1], tuple(shape[2:])


def cp_params(shape: tuple[int, ...], rank: int) -> int:
    """CP stores one factor per mode: R (out + in + sum(k))."""
    out, inp, k = _split(shape)
    return rank * (out + inp + sum(k))


def tucker2_params(shape: tuple[int, ...], ranks: tuple[int, int]) -> int:
    """Tucker-2 stores U_in (in x r_in), the core (r_out x r_in x prod(k)) and U_out (out x r_out)."""
    out, inp, k = _split(shape)
    r_out, r_in = ranks
    return inp * r_in + r_out * r_in * math.prod(k) + out * r_out


def tt_params(shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """TT cores of the kernel ordered (in, *k, out): in r1 + r1 kh r2 (+ r2 kw r3) + r_last out."""
    out, inp, k = _split(shape)
    dims = [inp, *k, out]
    bonds = [1, *ranks, 1]
    return sum(bonds[j] * dims[j] * bonds[j + 1] for j in range(len(dims)))


def spatial_svd_params(shape: tuple[int, ...], rank: int) -> int:
    """Vertical (r x in x kh) plus horizontal (out x r x kw) kernels: r (in kh + out kw)."""
    out, inp, k = _split(shape)
    if len(k) != 2:
        raise ValueError("spatial SVD needs a 2-D kernel (out, in, kh, kw)")
    return rank * (inp * k[0] + out * k[1])


def tt_full_ranks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The TT ranks at which TT-SVD is exact: min of the two sides' sizes at each bond."""
    out, inp, k = _split(shape)
    dims = [inp, *k, out]
    return tuple(
        min(math.prod(dims[: j + 1]), math.prod(dims[j + 1 :])) for j in range(len(dims) - 1)
    )


def tucker2_full_ranks(shape: tuple[int, ...]) -> tuple[int, int]:
    """(r_out, r_in) at which Tucker-2 is exact: the ranks of the two channel unfoldings' sides."""
    out, inp, k = _split(shape)
    p = math.prod(k)
    return min(out, inp * p), min(inp, out * p)


def _scaled(full: tuple[int, ...], rho: float) -> tuple[int, ...]:
    """Ranks proportional to the full ranks (tltorch's `rank=<float>` rule), at least 1."""
    return tuple(max(1, min(f, round(rho * f))) for f in full)


def tt_feasible(shape: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Clamp TT ranks to what TT-SVD can produce: r_j <= r_{j-1} n_j and r_j <= n_{j+1} r_{j+1}."""
    out, inp, k = _split(shape)
    dims = [inp, *k, out]
    r = [1, *ranks, 1]
    for j in range(1, len(r) - 1):
        r[j] = min(r[j], r[j - 1] * dims[j - 1])
    for j in range(len(r) - 2, 0, -1):
        r[j] = min(r[j], dims[j] * r[j + 1])
    return tuple(r[1:-1])


def _largest_rho(
    params_of, full: tuple[int, ...], budget: float, feasible=lambda r: r
) -> tuple[int, ...] | None:
    """The largest rank tuple on the proportional path rho * full with params <= budget, then
    filled up one rank at a time (the rank furthest below its share first) while it still fits,
    so that the parameter count lands just under the budget rather than a whole step below."""

    def path(rho: float) -> tuple[int, ...]:
        return feasible(_scaled(full, rho))

    if params_of(path(0.0)) > budget:
        return None
    if params_of(full) <= budget:
        return tuple(full)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if params_of(path(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    ranks = list(path(lo))
    while True:
        order = sorted(range(len(ranks)), key=lambda j: ranks[j] / full[j])
        for j in order:
            if ranks[j] < full[j]:
                trial = ranks.copy()
                trial[j] += 1
                if feasible(tuple(trial)) == tuple(trial) and params_of(tuple(trial)) <= budget:
                    ranks = trial
                    break
        else:
            return tuple(ranks)


def cp_rank_for_keep(shape: tuple[int, ...], keep: float, extra: int = 0) -> int:
    """Largest CP rank with cp_params + extra <= keep * (numel + extra); 0 if none."""
    numel = math.prod(shape)
    out, inp, k = _split(shape)
    return max(0, math.floor((keep * (numel + extra) - extra) / (out + inp + sum(k)) + 1e-9))


def tucker2_ranks_for_keep(
    shape: tuple[int, ...], keep: float, extra: int = 0
) -> tuple[int, int] | None:
    """Largest (r_out, r_in) proportional to the full ranks that keeps <= keep of the parameters."""
    budget = keep * (math.prod(shape) + extra) - extra
    return _largest_rho(lambda r: tucker2_params(shape, r), tucker2_full_ranks(shape), budget)


def tt_ranks_for_keep(
    shape: tuple[int, ...], keep: float, extra: int = 0
) -> tuple[int, ...] | None:
    """Largest TT ranks proportional to the full TT ranks that keep <= keep of the parameters."""
    budget = keep * (math.prod(shape) + extra) - extra
    return _largest_rho(
        lambda r: tt_params(shape, r),
        tt_full_ranks(shape),
        budget,
        lambda r: tt_feasible(shape, r),
    )


def spatial_svd_rank_for_keep(shape: tuple[int, ...], keep: float, extra: int = 0) -> int:
    """Largest spatial-SVD rank that keeps <= keep of the parameters; 0 if none."""
    out, inp, k = _split(shape)
    r = math.floor((keep * (math.prod(shape) + extra) - extra) / (inp * k[0] + out * k[1]) + 1e-9)
    return max(0, min(r, inp * k[0], out * k[1]))


# --------------------------------------------------------------------------------------------
# decompositions


@dataclass
class Decomposition:
    """Factors of one kernel and how they were obtained.

    `factors` depends on the method (see each function). `rel_error` is ||K - K_hat|| / ||K||
    computed from the reconstruction; `iterations` / `converged` are set for iterative methods.
    """

    method: str
    rank: int | tuple[int, ...]
    factors: list[torch.Tensor]
    rel_error: float
    iterations: int | None = None
    converged: bool | None = None
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The facts worth writing into a plan."""
        out = {"decomposition": self.method, "kernel_rel_error": round(self.rel_error, 6)}
        if self.iterations is not None:
            out["iterations"] = self.iterations
            out["converged"] = bool(self.converged)
        out.update(self.info)
        return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel of `dtype` is decomposed in: float64 for float64 kernels, float32 for
    every other one (float16 / bfloat16 kernels are decomposed in float32; the factorized layer
    casts the factors back to the layer's dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_kernel(kernel: torch.Tensor) -> torch.Tensor:
    _split(tuple(kernel.shape))
    if not kernel.is_floating_point():
        raise ValueError(f"kernel must be a floating-point tensor, got {kernel.dtype}")
    k = kernel.detach().to(compute_dtype(kernel.dtype)).cpu().contiguous()
    if not torch.isfinite(k).all():
        raise ValueError("kernel contains NaN or Inf")
    return k


def _rel_error(k: torch.Tensor, k_hat: torch.Tensor) -> float:
    k64, h64 = k.to(torch.float64), k_hat.to(torch.float64)
    norm = torch.linalg.norm(k64)
    if norm == 0:
        return 0.0
    return float(torch.linalg.norm(k64 - h64) / norm)


def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    """sum_r outer(f_0[:, r], f_1[:, r], ...) of factors f_i (dim_i, R); any CP weights folded in."""
    letters = "abcd"[: len(factors)]
    return torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)


def cp(
    kernel: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 60,
    tol: float = 1e-5,
    init: str = "random",
    seed: int = 0,
    ridge: float = 1e-6,
) -> Decomposition:
    """CP-ALS (TensorLy `parafac`, torch backend, einsum MTTKRP) of a kernel at `rank`.

    Returns factors [A (out, R), B (in, R), C (kh, R), (D (kw, R))] with the CP weights spread by
    `balance_cp` (every factor's entries of component r have the same root-mean-square). `init`
    "random" follows Schuurmans et al. (random uniform, seeded by `seed`); "svd" uses the leading
    singular vectors of each unfolding. Stops after `n_iter_max` sweeps or when the
    relative error changes by less than `tol` between sweeps.

    The kernel is scaled to unit norm for ALS and a ridge `ridge * I` is added to each normal
    equation (TensorLy's `l2_reg`): at ranks near the largest useful one the Gram matrices of the
    factors are singular and unregularised ALS returns NaN.
    """
    k = _check_kernel(kernel)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"CP rank must be a positive integer, got {rank!r}")
    scale = float(torch.linalg.norm(k)) or 1.0
    # Explicit Khatri-Rao products are fastest while tiny; above KHATRI_RAO_MAX entries the einsum
    # MTTKRP (torch.einsum with opt_einsum's contraction order) is faster and bounded in memory.
    explicit = k.numel() // min(k.shape) * rank <= KHATRI_RAO_MAX
    with (
        tl.backend_context("pytorch"),
        tl.tenalg.backend_context("core" if explicit else "einsum"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # TensorLy: SVD init rank > mode size
        (weights, factors), errors = parafac(
            k / scale,
            rank,
            n_iter_max=n_iter_max,
            init=init,
            tol=tol,
            random_state=seed,
            return_errors=True,
            normalize_factors=False,
            l2_reg=ridge,
        )
    factors = [f.detach().clone() for f in factors]
    factors[0] = factors[0] * (weights.detach() * scale)[None, :]
    factors = balance_cp(factors)
    rel = _rel_error(k, cp_reconstruct(factors))
    iterations = len(errors)
    return Decomposition("cp", rank, factors, rel, iterations, iterations < n_iter_max)


def balance_cp(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale CP factors f_i (dim_i, R) so that, for each component r, every factor column has the
    same root-mean-square entry; the reconstruction is unchanged (the scales multiply to 1).

    ALS leaves the scale wherever it fell (here: all of it in f_0 with the kernel norm). Fine-tuning
    with Adam or SGD moves every entry by steps of similar absolute size, so a factor with tiny
    entries is changed far more, relatively, than one with large entries, and the 4-way product
    drifts; Lebedev et al. (ICLR 2015) report CP-decomposed layers as unstable to fine-tune. In
    `benchmarks/cnn_fashion.py` (GaripovNet, keep 0.25, 1 epoch Adam 2e-4) one epoch of
    fine-tuning took unbalanced CP from 0.868 to 0.875 accuracy and balanced CP to 0.907.
    """
    f64 = [f.to(torch.float64) for f in factors]
    rms = torch.stack([f.pow(2).mean(dim=0).sqrt() for f in f64])  # (N, R)
    keep = (rms > 0).all(
        dim=0
    )  # a component with a zero factor is left as it is (its product is 0)
    safe = torch.where(rms > 0, rms, torch.ones_like(rms))
    target = safe.log().mean(dim=0).exp()  # geometric mean: the product of the scales is 1
    scale = torch.where(keep[None, :], target[None, :] / safe, torch.ones_like(safe))
    return [(f * s[None, :]).to(f_orig.dtype) for f, s, f_orig in zip(f64, scale, factors)]


def _leading_left(unfolding: torch.Tensor, r: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(unfolding.to(torch.float64), full_matrices=False)
    return u[:, :r].to(unfolding.dtype)


def tucker2_reconstruct(
    core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
) -> torch.Tensor:
    """K_hat = core x_0 U_out x_1 U_in."""
    return torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in)


def tucker2(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    *,
    algorithm: str = "hooi",
    n_iter_max: int = 50,
    tol: float = 1e-6,
) -> Decomposition:
    """Tucker-2 of a kernel with the spatial modes kept at full rank.

    Returns factors [core (r_out, r_in, *k), U_out (out, r_out), U_in (in, r_in)] with orthonormal
    columns in U_out and U_in. algorithm "hosvd" (one SVD per channel unfolding) or "hooi" (TensorLy
    `partial_tucker`, initialised by the HOSVD, at most `n_iter_max` sweeps).
    """
    k = _check_kernel(kernel)
    r_out, r_in = (int(r) for r in ranks)
    full = tucker2_full_ranks(tuple(k.shape))
    if not (1 <= r_out <= full[0] and 1 <= r_in <= full[1]):
        raise ValueError(f"Tucker-2 ranks must be in [1, {full}] for {tuple(k.shape)}, got {ranks}")
    if algorithm == "hosvd":
        u_out = _leading_left(k.reshape(k.shape[0], -1), r_out)
        u_in = _leading_left(k.transpose(0, 1).reshape(k.shape[1], -1), r_in)
        core = torch.einsum("oi...,oa,ib->ab...", k, u_out, u_in)
        iterations, converged = None, None
    elif algorithm == "hooi":
        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TensorLy: SVD rank > matrix side
            (core, (u_out, u_in)), errors = partial_tucker(
                k, rank=[r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd", tol=tol
            )
        iterations = len(errors)
        converged = iterations < n_iter_max
    else:
        raise ValueError(f"algorithm must be 'hosvd' or 'hooi', got {algorithm!r}")
    factors = [core.contiguous(), u_out.contiguous(), u_in.contiguous()]
    rel = _rel_error(k, tucker2_reconstruct(*factors))
    return Decomposition(
        "tucker2", (r_out, r_in), factors, rel, iterations, converged, {"algorithm": algorithm}
    )


def tt_reconstruct(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores (r_{j-1}, n_j, r_j) of the (in, *k, out) tensor back to (out, in, *k)."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([full.ndim - 1], [0]))
    full = full.squeeze(0).squeeze(-1)  # (in, *k, out)
    order = [full.ndim - 1, 0, *range(1, full.ndim - 1)]
    return full.permute(order).contiguous()


def tt(kernel: torch.Tensor, ranks: tuple[int, ...]) -> Decomposition:
    """TT-SVD (TensorLy `tensor_train`) of the kernel reordered to (in, *k, out).

    `ranks` are the inner bonds (r1, r2, r3) for Conv2d, (r1, r2) for Conv1d, each at most the
    full TT rank at that bond. Returns the cores [(1, in, r1), (r1, kh, r2), ..., (r_last, out, 1)].
    """
    k = _check_kernel(kernel)
    full = tt_full_ranks(tuple(k.shape))
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != len(full) or any(not (1 <= r <= f) for r, f in zip(ranks, full)):
        raise ValueError(f"TT ranks must be {len(full)} values in [1, {full}], got {ranks}")
    if tt_feasible(tuple(k.shape), ranks) != ranks:
        raise ValueError(
            f"TT ranks {ranks} are not reachable by TT-SVD for {tuple(k.shape)} (need "
            f"r_j <= r_(j-1) n_j and r_j <= n_(j+1) r_(j+1)): use {tt_feasible(tuple(k.shape), ranks)}"
        )
    ordered = k.permute(1, *range(2, k.ndim), 0).contiguous()  # (in, *k, out)
    with tl.backend_context("pytorch"):
        cores = tensor_train(ordered, rank=[1, *ranks, 1])
    cores = [c.detach().contiguous() for c in cores]
    got = tuple(c.shape[2] for c in cores[:-1])
    rel = _rel_error(k, tt_reconstruct(cores))
    return Decomposition("tt", got, cores, rel)


def spatial_svd(kernel: torch.Tensor, rank: int) -> Decomposition:
    """Truncated SVD of M[(i,h),(o,w)] = K[o,i,h,w] (Jaderberg et al. 2014; Tai et al. 2016).

    Returns [vertical (r, in, kh, 1), horizontal (out, r, 1, kw)]; conv with the vertical kernel
    then the horizontal one computes conv with K_hat[o,i,h,w] = sum_r V[r,i,h] H[o,r,w].
    """
    k = _check_kernel(kernel)
    out, inp, ks = _split(tuple(k.shape))
    if len(ks) != 2:
        raise ValueError("spatial SVD needs a 2-D kernel (out, in, kh, kw)")
    kh, kw = ks
    full = min(inp * kh, out * kw)
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= full):
        raise ValueError(f"spatial SVD rank must be in [1, {full}], got {rank!r}")
    m = k.permute(1, 2, 0, 3).reshape(inp * kh, out * kw).to(torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    v = (u[:, :rank] * s[:rank].sqrt()).to(k.dtype)  # (in*kh, r)
    h = (s[:rank].sqrt()[:, None] * vh[:rank]).to(k.dtype)  # (r, out*kw)
    vertical = v.reshape(inp, kh, rank).permute(2, 0, 1).unsqueeze(-1).contiguous()
    horizontal = h.reshape(rank, out, kw).permute(1, 0, 2).unsqueeze(2).contiguous()
    tail = float((s[rank:] ** 2).sum() / (s**2).sum()) if float(s.sum()) > 0 else 0.0
    rel = _rel_error(k, spatial_svd_reconstruct(vertical, horizontal))
    return Decomposition("spatial_svd", rank, [vertical, horizontal], rel, info={"tail": tail})


def spatial_svd_reconstruct(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """K_hat[o,i,h,w] = sum_r V[r,i,h,0] H[o,r,0,w]."""
    return torch.einsum("rih,orw->oihw", vertical[..., 0], horizontal[:, :, 0, :])


def spatial_svd_errors(kernel: torch.Tensor) -> torch.Tensor:
    """Relative squared error of the spatial SVD at every rank r = 0..full (Eckart-Young)."""
    k = _check_kernel(kernel)
    out, inp, (kh, kw) = _split(tuple(k.shape))
    m = k.permute(1, 2, 0, 3).reshape(inp * kh, out * kw).to(torch.float64)
    s2 = torch.linalg.svdvals(m) ** 2
    total = s2.sum()
    if total == 0:
        return torch.zeros(s2.numel() + 1, dtype=torch.float64)
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64)]) / total


# --------------------------------------------------------------------------------------------
# data-aware Tucker-2 and output errors on calibration inputs
#
# A conv y = K * x is the matrix product W X^T with W = K.reshape(out, in p) (p = prod(k)) and X
# the unfolded input patches (rows (i, s), channel-major as torch's F.unfold). With the patch Gram
# G = X^T X the output error of a replacement W_hat is ||(W - W_hat) X^T||^2 = tr(E G E^T),
# E = W - W_hat (the objective of data-aware low-rank methods: whitened SVD in SVD-LLM, Wang et al.
# 2024, Eq. 3; activation-aware SVD, ASVD, Yuan et al. 2023).

# Damping of the patch Gram in the data-aware Tucker-2 solves, relative to its mean diagonal.
DATA_DAMP = 1e-9


def patch_marginals(gram: torch.Tensor, inp: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_c (in x in), G_s (p x p)) of a patch Gram G ((in p) x (in p), rows (i, s)): its partial
    traces over the kernel offsets, G_c[i, j] = sum_s G[(i, s), (j, s)] (the input channels'
    second moments), and over the channels, G_s[s, t] = sum_i G[(i, s), (i, t)]."""
    g4 = gram.reshape(inp, p, inp, p)
    return torch.einsum("isjs->ij", g4), torch.einsum("isit->st", g4)


def _psd_roots(g: torch.Tensor, rel_floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^(1/2), G^(-1/2)) of a symmetric PSD matrix (float64), eigenvalues floored at rel_floor
    times the largest (so that the inverse root exists)."""
    with one_thread():
        vals, vecs = torch.linalg.eigh((g + g.T) / 2)
    top = float(vals.max()) if vals.numel() else 0.0
    vals = vals.clamp_min(rel_floor * top if top > 0 else 1.0)
    root = vals.sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def _eigvecs_desc(g: torch.Tensor) -> torch.Tensor:
    with one_thread():
        return torch.linalg.eigh((g + g.T) / 2)[1].flip(1)


def kernel_input_basis(w3: torch.Tensor, in_gram: torch.Tensor | None = None) -> torch.Tensor:
    """The HOSVD input basis (in x in, orthonormal, strongest first): eigenvectors of the input
    unfolding's Gram K_(1) K_(1)^T (`in_gram` if given) of the kernel w3 (out, in, p)."""
    if in_gram is None:
        u = w3.transpose(0, 1).reshape(w3.shape[1], -1)
        in_gram = u @ u.T
    return _eigvecs_desc(in_gram.to(torch.float64))


def data_input_basis(w3: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """A data-weighted input basis (in x in, orthonormal columns, nested: its first r columns span
    the chosen r-dimensional input subspace) of the kernel w3 (out, in, p) under the patch Gram.

    With G approximated by the Kronecker product G_c (x) G_s of its marginals (`patch_marginals`),
    the least output error of K_hat = K x_1 (U (U^T G_c U)^-1 U^T G_c) over r-dimensional input
    subspaces span(U) is reached at U = G_c^(-1/2) Q, Q the leading eigenvectors of the whitened
    input-mode Gram G_c^(1/2) (sum_o K_o G_s K_o^T) G_c^(1/2) (K_o the (in x p) slice of output
    o): the input-mode step of HOSVD (De Lathauwer et al. 2000a) on the kernel whitened by the
    data, as whitened SVD whitens a matrix (SVD-LLM, Wang et al. 2024) and ASVD scales its input
    channels (Yuan et al. 2023). The columns are orthonormalised in order (QR), which keeps every
    leading span."""
    inp, p = w3.shape[1], w3.shape[2]
    g_c, g_s = patch_marginals(gram, inp, p)
    half, inv_half = _psd_roots(g_c)
    inner = torch.einsum("oip,pq,ojq->ij", w3, g_s, w3)
    q = _eigvecs_desc(half @ inner @ half)
    with one_thread():
        return torch.linalg.qr(inv_half @ q)[0]


def _rotated_gram(g4: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(U_l (x) I_p)^T G (U_r (x) I_p), ((a p) x (b p)), of G viewed as (in, p, in, p)."""
    inp, p = g4.shape[0], g4.shape[1]
    a, b = left.shape[1], right.shape[1]
    t = (left.T @ g4.reshape(inp, -1)).reshape(a * p * inp, p)  # (a, s, j, t) -> ((a s j), t)
    t = t.reshape(a * p, inp, p).transpose(1, 2).reshape(a * p * p, inp) @ right  # ((a s t), b)
    return t.reshape(a * p, p, b).transpose(1, 2).reshape(a * p, b * p)


class _NotDefinite(Exception):
    """A Cholesky factorization failed (raise the damping)."""


@dataclass
class _InputFit:
    """The reduced-rank regression of the outputs on the inputs projected on the leading
    r_max input directions of `basis`: B = (W G_d P) L^-T (out x r_max p), L L^T = P^T G_d P."""

    basis: torch.Tensor
    chol: torch.Tensor
    b: torch.Tensor


class DataTucker2:
    """Data-aware Tucker-2 of a conv kernel: the factors of least output error on calibration
    inputs with patch Gram G, for every rank pair from a few factorizations.

    For a fixed input factor U_in (P = U_in (x) I_p), K_hat = core x_0 U_out x_1 U_in is
    W_hat = U_out C P^T, and the best U_out, C are a reduced-rank regression (Izenman 1975) of the
    outputs W X^T on the projected inputs P^T X^T: with H = W G P and P^T G P = L L^T (Cholesky),
    B = H L^-T, U_out = the r_out leading eigenvectors of M = B B^T, C = U_out^T B L^-1, and the
    output error is tr(W G W^T) - (sum of the r_out largest eigenvalues of M). Input factors are
    nested (the leading r_in columns of an orthonormal basis), so the Cholesky factor and B of the
    largest r_in contain those of every smaller one (leading blocks) and M(r_in) is a prefix sum:
    every rank pair costs one out x out eigendecomposition.

    Two bases are tried and the better one is used at each rank pair: "data" (`data_input_basis`)
    and "kernel" (the HOSVD's, `kernel_input_basis`). The kernel basis makes the result never
    worse in output error than the HOSVD of Kim et al. (ICLR 2016) at the same ranks (the
    regression refits its U_out and core); at full ranks it is exact. G is damped by
    lam = `damp` x its mean diagonal (the errors are those on G + lam I: they exceed the output
    error on G by lam ||E||^2)."""

    BASES = ("data", "kernel")

    def __init__(
        self,
        kernel: torch.Tensor,
        gram: torch.Tensor,
        *,
        damp: float = DATA_DAMP,
        in_gram: torch.Tensor | None = None,
    ) -> None:
        k = _check_kernel(kernel)
        self.shape = tuple(k.shape)
        self.dtype = k.dtype
        out, inp, ks = _split(self.shape)
        self.p = math.prod(ks)
        n = inp * self.p
        g = gram.detach().to("cpu", torch.float64)
        if tuple(g.shape) != (n, n):
            raise ValueError(
                f"the patch Gram must be ({n}, {n}) (in x prod(kernel) squared) for kernel "
                f"{self.shape}, got {tuple(g.shape)}"
            )
        self.g4 = ((g + g.T) / 2).reshape(inp, self.p, inp, self.p)
        self.w3 = k.to(torch.float64).reshape(out, inp, self.p)
        w2 = self.w3.reshape(out, n)
        self.total = float(((w2 @ self.g4.reshape(n, n)) * w2).sum().clamp_min(0.0))
        mean = float(torch.diagonal(self.g4.reshape(n, n)).mean()) if n else 0.0
        self.lam = damp * (mean if mean > 0 else 1.0)
        self.total_d = self.total + self.lam * float((w2**2).sum())
        self.bases = {
            "data": data_input_basis(self.w3, self.g4.reshape(n, n)),
            "kernel": kernel_input_basis(self.w3, in_gram),
        }
        self._spectra: dict[tuple[str, int], torch.Tensor] = {}

    def _fit(self, name: str, r_max: int) -> _InputFit:
        """The regression on the leading r_max directions of basis `name`."""
        out, inp, p = self.w3.shape
        basis = self.bases[name]
        k = r_max * p
        g_rot = _rotated_gram(self.g4, basis, basis[:, :r_max])  # (in p, k): P^T G P_k
        w_rot = torch.einsum("oip,ib->obp", self.w3, basis).reshape(out, inp * p)  # W P
        h = w_rot @ g_rot + self.lam * w_rot[:, :k]  # W G_d P_k
        g_kk = g_rot[:k].clone()
        g_kk.diagonal().add_(self.lam)
        del g_rot
        with one_thread():
            chol, info = torch.linalg.cholesky_ex(g_kk)
        if int(info) != 0:
            raise _NotDefinite
        b = torch.linalg.solve_triangular(chol, h.T, upper=False).T  # H L^-T
        return _InputFit(basis, chol, b)

    def _damped(self, compute):
        """`compute()`; where a rotated Gram is not numerically positive definite (inputs of
        lower rank than the patches), again with 100x the damping (at most 6 times)."""
        for _ in range(6):
            try:
                return compute()
            except _NotDefinite:
                self.lam *= 100
                self.total_d = self.total + self.lam * float((self.w3**2).sum())
                self._spectra.clear()
        raise ValueError("the patch Gram is not positive definite even with damping")

    def errors(self, ranks: list[tuple[int, int]]) -> list[tuple[float, str]]:
        """(relative output error tr(E G_d E^T) / tr(W G W^T), basis used) of the best basis at
        each (r_out, r_in) of `ranks`."""
        return self._damped(lambda: self._errors(ranks))

    def _errors(self, ranks: list[tuple[int, int]]) -> list[tuple[float, str]]:
        r_ins = sorted({int(r_in) for _, r_in in ranks})
        p = self.p
        for name in self.BASES:
            todo = [r for r in r_ins if (name, r) not in self._spectra]
            if not todo:
                continue
            fit = self._fit(name, max(todo))
            m = torch.zeros(self.shape[0], self.shape[0], dtype=torch.float64)
            done = 0
            for r in todo:
                block = fit.b[:, done * p : r * p]
                m += block @ block.T
                done = r
                with one_thread():
                    vals = torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0)
                self._spectra[(name, r)] = vals.cumsum(0)
            del fit
        out = []
        for r_out, r_in in ranks:
            best = min(
                ((self._error(name, int(r_out), int(r_in)), name) for name in self.BASES),
                key=lambda t: t[0],
            )
            out.append(best)
        return out

    def _error(self, name: str, r_out: int, r_in: int) -> float:
        kept = self._spectra[(name, r_in)]
        kept = float(kept[min(r_out, kept.numel()) - 1])
        if self.total <= 0:
            return 0.0
        return max(0.0, self.total_d - kept) / self.total

    def decompose(self, ranks: tuple[int, int]) -> Decomposition:
        """Factors [core (r_out, r_in, *k), U_out (out, r_out), U_in (in, r_in)] (the kernel's
        compute dtype) of the best basis at `ranks`; info: the basis and the damping."""
        r_out, r_in = (int(r) for r in ranks)
        full = tucker2_full_ranks(self.shape)
        if not (1 <= r_out <= full[0] and 1 <= r_in <= full[1]):
            raise ValueError(f"Tucker-2 ranks must be in [1, {full}] for {self.shape}, got {ranks}")
        return self._damped(lambda: self._decompose(r_out, r_in))

    def _decompose(self, r_out: int, r_in: int) -> Decomposition:
        _, name = self._errors([(r_out, r_in)])[0]
        fit = self._fit(name, r_in)
        k = r_in * self.p
        u_out = _eigvecs_desc(fit.b @ fit.b.T)[:, :r_out]
        c = torch.linalg.solve_triangular(  # C = U_out^T B L^-1
            fit.chol[:k, :k], u_out.T @ fit.b, upper=False, left=False
        )
        core = c.reshape(r_out, r_in, *self.shape[2:])
        u_in = fit.basis[:, :r_in]
        k_hat = tucker2_reconstruct(core, u_out, u_in)
        k64 = self.w3.reshape(self.shape)
        factors = [t.to(self.dtype).contiguous() for t in (core, u_out, u_in)]
        info = {"algorithm": "data", "basis": name, "damping": self.lam}
        return Decomposition(
            "tucker2", (r_out, r_in), factors, _rel_error(k64, k_hat), info=info
        )


def spatial_output_errors(
    kernel: torch.Tensor,
    gram: torch.Tensor,
    ranks: list[int],
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """Relative output error tr(E G E^T) / tr(W G W^T) of the spatial SVD (`spatial_svd`) at
    each rank of `ranks`, exact, from one SVD: with the rank-one terms T_j[o, (i, h, w)] =
    s_j u_j[(i, h)] v_j[(o, w)] of K_hat_r = sum_{j<r} T_j, the error is
    tr(W G W^T) - 2 sum_{j<r} <T_j, W>_G + sum_{j,l<r} <T_j, T_l>_G, and the G-inner products of
    the terms need one contraction of G per kernel-column pair (w, w'): O(n^2 R) in all
    (n = in kh kw, R the largest rank) instead of O(out n^2) per rank. `svd`: (U, S, V^T) of
    M[(i, h), (o, w)] = K[o, i, h, w] if already computed."""
    k = _check_kernel(kernel).to(torch.float64)
    out, inp, (kh, kw) = _split(tuple(k.shape))
    n = inp * kh * kw
    g = gram.detach().to("cpu", torch.float64)
    g = (g + g.T) / 2
    w2 = k.reshape(out, n)
    wg = w2 @ g
    total = float((wg * w2).sum())
    if total <= 0 or not ranks:
        return [0.0 for _ in ranks]
    r_max = max(int(r) for r in ranks)
    if svd is None:
        m = k.permute(1, 2, 0, 3).reshape(inp * kh, out * kw)
        with one_thread():
            svd = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = (t.to(torch.float64) for t in svd)
    r_max = min(r_max, s.numel())
    a = u[:, :r_max] * s[:r_max]  # (in kh, R)
    v = vh[:r_max].reshape(r_max, out, kw)  # (R, out, kw)
    g6 = g.reshape(inp * kh, kw, inp * kh, kw)
    ga = torch.empty(kw, kw, r_max, r_max, dtype=torch.float64)
    for w in range(kw):
        for w2_ in range(kw):
            ga[w, w2_] = a.T @ g6[:, w, :, w2_] @ a
    vv = torch.einsum("jow,kov->wvjk", v, v)
    q = (ga * vv).sum((0, 1))  # (R, R): <T_j, T_l>_G
    wg6 = wg.reshape(out, inp * kh, kw)
    c = torch.einsum("ocw,cj,jow->j", wg6, a, v)  # <T_j, W>_G
    kept = 2 * c.cumsum(0) - q.cumsum(0).cumsum(1).diagonal()
    return [max(0.0, total - float(kept[min(int(r), r_max) - 1])) / total for r in ranks]
