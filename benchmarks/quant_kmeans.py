"""How `quant` finds its codebook on a big layer, and how close plan bits are to bits on disk.

Table 1 (per layer, b = 1..8 bits, k = 2^b): the k-means SSE sum (w - c(w))^2 and the time of
- uniform: 2^b evenly spaced levels over [min, max], nearest level (the baseline);
- kmeans++ + Lloyd: k-means++ seeding (seed 0), then Lloyd to convergence (at most LLOYD_ITERS);
- default: decompose.kmeans1d.kmeans_1d as `quant` calls it (the exact DP when distinct values x k
  <= DP_LIMIT, else the DP on a <= SUMMARY_POINTS-point summary refined by Lloyd, and Lloyd from the
  uniform grid, the lower SSE);
- exact: the dynamic program on all distinct values (one run gives the optimal SSE of every k up to
  EXACT_K; above EXACT_K it is too slow to run here).
SSEs are given relative to the exact optimum where it is known, else to the lowest SSE found.

Layers: a synthetic 1024 x 1024 Laplace(0, 0.02) matrix (1,048,576 weights) and, when the
`transformers` extra is installed, MiniLM-L6's encoder.layer.0.intermediate.dense (1536 x 384,
trained weights).

Table 2: for one 1024 x 1024 Linear layer compressed by each spec, the plan's storage bits
(spec_cost, bias included) against 8 x the size of the safetensors file of the compressed layer's
state_dict (safetensors adds a JSON header naming each tensor).

Run: .venv/bin/python benchmarks/quant_kmeans.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _common import write_results  # noqa: E402  (puts src/ on the path)
from tensorslim.core import LayerSite, build_layer, handler_for, parse_spec, spec_cost
from tensorslim.decompose.kmeans1d import (
    DP_LIMIT,
    LLOYD_ITERS,
    SUMMARY_POINTS,
    kmeans_1d,
    kmeans_1d_lloyd,
    kmeans_pp_init,
    optimal_sse_curve,
    sse,
    uniform_levels,
)
from tensorslim.io import save_weights

SEED = 0
EXACT_K = 16
BITS = range(1, 9)


def layers() -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    lap = torch.distributions.Laplace(0.0, 0.02)
    out = {"synthetic Laplace 1024x1024": lap.sample((1024, 1024)).to(torch.float32)}
    try:
        from tensorslim.zoo.minilm import load_minilm

        model, _ = load_minilm()
        w = model.get_submodule("encoder.layer.0.intermediate.dense").weight.detach()
        out["MiniLM-L6 layer.0.intermediate.dense 1536x384"] = w.clone()
    except Exception as exc:  # noqa: BLE001 - the extra is optional
        print(f"MiniLM layer skipped: {exc}")
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def kmeans_rows(name: str, w: torch.Tensor) -> list[dict]:
    x = w.reshape(-1)
    distinct = int(torch.unique(x).numel())
    print(f"{name}: {x.numel()} weights, {distinct} distinct; exact DP up to k={EXACT_K} ...")
    curve, t_exact = timed(lambda: optimal_sse_curve(x, EXACT_K)[0])
    print(f"  exact curve in {t_exact:.1f} s")
    rows = []
    for b in BITS:
        k = 1 << b
        uni, t_uni = timed(lambda k=k: float(sse(x, uniform_levels(x, k))))
        gen = torch.Generator().manual_seed(SEED)
        kpp, t_kpp = timed(
            lambda k=k, gen=gen: float(sse(x, kmeans_1d_lloyd(x, kmeans_pp_init(x, k, gen))))
        )
        dflt, t_dflt = timed(lambda k=k: float(sse(x, kmeans_1d(x, k))))
        exact = float(curve[k - 1]) if k <= EXACT_K else None
        ref = exact if exact is not None else min(uni, kpp, dflt)
        rows.append(
            {
                "layer": name,
                "bits": b,
                "k": k,
                "default path": "exact DP" if distinct * k <= DP_LIMIT else "summary DP + Lloyd",
                "SSE ref": f"{ref:.6g}" + (" (exact)" if exact is not None else " (best found)"),
                "uniform / ref": f"{uni / ref:.4g}" if ref > 0 else None,
                "kmeans++ Lloyd / ref": f"{kpp / ref:.6f}" if ref > 0 else None,
                "default / ref": f"{dflt / ref:.6f}" if ref > 0 else None,
                "uniform s": round(t_uni, 3),
                "kmeans++ Lloyd s": round(t_kpp, 3),
                "default s": round(t_dflt, 3),
                "exact s (all k <= 16)": round(t_exact, 1) if exact is not None else None,
            }
        )
        print(f"  b={b}: {rows[-1]}")
    return rows


def disk_rows() -> list[dict]:
    torch.manual_seed(SEED)
    layer = nn.Linear(1024, 1024)
    site = LayerSite("fc")
    handler = handler_for(layer)
    specs = [
        [{"kind": "quant", "bits": 2}],
        [{"kind": "quant", "bits": 4}],
        [{"kind": "quant", "bits": 8}],
        [{"kind": "binary"}],
        [{"kind": "ternary"}],
        [{"kind": "sparse", "keep": 0.01}],
        [{"kind": "sparse", "keep": 0.1}],
        [{"kind": "lowrank", "rank": 16}, {"kind": "sparse", "keep": 0.01}],
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            sp = parse_spec(spec)
            new, _ = build_layer(layer, handler, sp, site)
            plan_bits = spec_cost(layer, handler, sp, site).bits
            path = Path(tmp) / "layer.safetensors"
            save_weights(new, path)
            disk = os.path.getsize(path) * 8
            rows.append(
                {
                    "spec": " + ".join(
                        c["kind"] + "".join(f" {k}={v}" for k, v in c.items() if k != "kind")
                        for c in spec
                    ),
                    "plan bits": plan_bits,
                    "file bits": disk,
                    "file / plan": round(disk / plan_bits, 4),
                    "difference (bytes)": (disk - plan_bits) // 8,
                }
            )
            print(rows[-1])
    return rows


def main() -> None:
    torch.manual_seed(SEED)
    k_rows = []
    for name, w in layers().items():
        k_rows.extend(kmeans_rows(name, w))
    d_rows = disk_rows()
    notes = (
        f"DP_LIMIT = {DP_LIMIT} (distinct values x k solved exactly), SUMMARY_POINTS = "
        f"{SUMMARY_POINTS}, LLOYD_ITERS = {LLOYD_ITERS}. Every method runs on one thread "
        "(decompose.large.one_thread). Times are wall-clock on a CPU shared with other jobs and "
        "include one SSE evaluation (a sort of the layer's values)."
    )
    write_results(
        "quant_kmeans",
        {"k-means on one big layer": k_rows, "plan bits vs safetensors file": d_rows},
        command=".venv/bin/python benchmarks/quant_kmeans.py",
        seeds={"torch": SEED, "kmeans++": SEED},
        notes=notes,
    )


if __name__ == "__main__":
    main()
