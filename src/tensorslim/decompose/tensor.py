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

Pure math on tensors: this module imports nothing else from tensorslim (imports run downward).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker, tensor_train

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
