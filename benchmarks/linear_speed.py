"""Benchmark `linear_speed`: CPU latency of LowRankLinear vs nn.Linear, and of the demo model.

For each (in, out) shape x token count x keep, the rank is the largest whose factorization keeps at
most `keep` of the weight's parameters; the ideal speedup is the FLOP reduction mn / (r(m + n)).
Dense and low-rank are timed alternately in the same process (torch.utils.benchmark, median of
blocked runs, best of ROUNDS rounds), so background load affects both alike.

Run: .venv/bin/python benchmarks/linear_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from _common import write_results
from tensorslim import compress, zoo
from tensorslim.decompose import rank_for_keep
from tensorslim.layers import LowRankLinear
from tensorslim.search.timing import compare_calls

SEED = 0
SHAPES = [
    (384, 384),
    (384, 1536),
    (768, 768),
    (768, 3072),
    (1024, 1024),
    (2048, 2048),
    (4096, 4096),
]
TOKENS = [1, 32, 512]
KEEPS = [0.75, 0.5, 0.25]
ROUNDS = 3


def side_by_side(a, b, min_run_time: float) -> tuple[float, float]:
    """Best-of-ROUNDS median latency (ms) of two callables timed alternately."""
    ta, tb = compare_calls([a, b], rounds=ROUNDS, min_run_time=min_run_time)
    return ta.median_ms, tb.median_ms


@torch.inference_mode()
def layer_rows(shapes, tokens, keeps, min_run_time) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(SEED)
    for n_in, n_out in shapes:
        dense = nn.Linear(n_in, n_out)
        for t in tokens:
            x = torch.randn(t, n_in, generator=g)
            for keep in keeps:
                r = rank_for_keep(n_out, n_in, keep)
                low = LowRankLinear(n_in, n_out, r)
                t_dense, t_low = side_by_side(
                    lambda d=dense, x=x: d(x), lambda m=low, x=x: m(x), min_run_time
                )
                ideal = (n_in * n_out) / (r * (n_in + n_out))
                speedup = t_dense / t_low
                rows.append(
                    {
                        "in x out": f"{n_in}x{n_out}",
                        "tokens": t,
                        "keep": keep,
                        "rank": r,
                        "dense ms": round(t_dense, 4),
                        "low-rank ms": round(t_low, 4),
                        "speedup": round(speedup, 3),
                        "ideal (FLOPs)": round(ideal, 3),
                        "speedup / ideal": round(speedup / ideal, 3),
                    }
                )
                print(rows[-1], flush=True)
    return rows


@torch.inference_mode()
def demo_rows(keeps, min_run_time) -> list[dict]:
    entry = zoo.get("digits-cnn")
    model = entry.pretrained(seed=SEED)
    x = entry.data().x_test[:256]
    rows = []
    for allocator in ("uniform", "global"):
        for keep in keeps:
            small, plan = compress(model, keep, allocator=allocator, example_input=x[:1])
            small.eval()
            t_dense, t_low = side_by_side(lambda: model(x), lambda s=small: s(x), min_run_time)
            ideal = plan.model_flops_before / plan.model_flops_after
            rows.append(
                {
                    "model": "digits-cnn (batch 256)",
                    "allocator": allocator,
                    "keep": keep,
                    "achieved keep": round(plan.achieved_keep, 3),
                    "dense ms": round(t_dense, 3),
                    "compressed ms": round(t_low, 3),
                    "speedup": round(t_dense / t_low, 3),
                    "ideal (FLOPs)": round(ideal, 3),
                    "speedup / ideal": round(t_dense / t_low / ideal, 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for t in TOKENS:
        for keep in KEEPS:
            sel = [r for r in rows if r["tokens"] == t and r["keep"] == keep]
            if not sel:
                continue
            eff = sorted(r["speedup / ideal"] for r in sel)
            out.append(
                {
                    "tokens": t,
                    "keep": keep,
                    "shapes": len(sel),
                    "median speedup / ideal": eff[len(eff) // 2],
                    "min": eff[0],
                    "max": eff[-1],
                    "shapes faster than dense": sum(r["speedup"] > 1 for r in sel),
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, short timings (smoke run)")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    shapes = SHAPES[:2] if args.quick else SHAPES
    min_run_time = 0.02 if args.quick else 0.1
    rows = layer_rows(shapes, TOKENS, KEEPS, min_run_time)
    drows = demo_rows([0.5, 0.25], min_run_time)
    name = "linear_speed_quick" if args.quick else "linear_speed"
    md, _ = write_results(
        name,
        {
            "Summary: measured speedup as a fraction of the FLOP-reduction ideal": summary(rows),
            "LowRankLinear vs nn.Linear (float32, inference_mode)": rows,
            "Demo model before / after compression": drows,
        },
        command="python benchmarks/linear_speed.py" + (" --quick" if args.quick else ""),
        seeds={"torch": SEED},
        notes=(
            "Latency: torch.utils.benchmark blocked_autorange median, best of "
            f"{ROUNDS} alternating rounds (min_run_time {min_run_time}s each). Ideal = dense FLOPs / "
            "low-rank FLOPs. speedup / ideal = 1 means the low-rank layer is as fast as its FLOP "
            "count promises."
        ),
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    sys.exit(main())
