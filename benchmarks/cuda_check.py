"""CUDA check of the core path: compress (svd, tucker2, cp, whitened) and apply_plan on a GPU,
save/load across devices, recovery (fine-tuning and the hard low-rank step) on the GPU, and the
RNN "lowrank" implementation; each compared with the same plan on CPU, and timed against the
dense layer on the same GPU in the same run (median of CUDA-synchronised calls).

    python benchmarks/cuda_check.py          # needs a CUDA device; writes results/cuda_check.*
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tensorslim  # noqa: E402
from _common import write_results  # noqa: E402
from tensorslim.train.loop import fit  # noqa: E402
from tensorslim.train.lowrank import hard_lowrank_, lowrank_matrices  # noqa: E402

SEED = 0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        return self.f(x)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(64, 512, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(1024, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def main() -> None:
    smoke = "--cpu-smoke" in sys.argv  # exercises the script on CPU; writes no results
    assert smoke or torch.cuda.is_available(), "this check needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(SEED)
    rows, rnn_rows, rec_rows = [], [], []

    cnn = CNN().eval()
    x = torch.randn(64, 3, 32, 32)
    calib = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    for method in ("svd", "tucker2", "cp", "whitened"):
        kw = {"calibration": [c.to(dev) for c in calib]} if method == "whitened" else {}
        t0 = time.perf_counter()
        small, plan = tensorslim.compress(
            cnn.to(dev), 0.4, method=method, example_input=x.to(dev), **kw
        )
        secs = time.perf_counter() - t0
        on_cuda = all(p.is_cuda for p in small.parameters())
        kwc = {"calibration": calib} if method == "whitened" else {}
        cpu_small = tensorslim.apply_plan(cnn.cpu(), plan, **kwc)
        with torch.no_grad():
            y_gpu, y_cpu = small(x.to(dev)), cpu_small(x)
            y_dense = cnn.to(dev)(x.to(dev))
        with tempfile.TemporaryDirectory() as tmp:
            tensorslim.save(small, plan, Path(tmp) / "m")
            back = tensorslim.load(CNN().eval(), Path(tmp) / "m")
            with torch.no_grad():
                load_diff = rel(back(x), y_gpu)
        xg = x.to(dev)
        with torch.no_grad():
            dense_ms = cuda_ms(lambda xg=xg: cnn(xg))
            small_ms = cuda_ms(lambda m=small, xg=xg: m(xg))
        rows.append({
            "method": method,
            "achieved keep": round(plan.achieved_keep, 3),
            "params on cuda": on_cuda if not smoke else "cpu smoke",
            "GPU vs CPU output (rel)": f"{rel(y_gpu, y_cpu):.1e}",
            "saved on GPU, loaded on CPU (rel)": f"{load_diff:.1e}",
            "output vs dense (rel)": round(rel(y_gpu, y_dense), 3),
            "compress s (GPU)": round(secs, 2),
            "dense ms": round(dense_ms, 3),
            "compressed ms": round(small_ms, 3),
            "speedup": round(dense_ms / small_ms, 2),
        })
        print(rows[-1], flush=True)

    # recovery on the GPU: fine-tune the svd model, then the hard low-rank step
    torch.manual_seed(SEED)
    xs = torch.randn(512 if not smoke else 64, 3, 32, 32, device=dev)
    ys = torch.randint(0, 10, (xs.shape[0],), device=dev)
    small, _ = tensorslim.compress(cnn.to(dev), 0.4, example_input=xs[:8])
    losses = fit(small, xs, ys, epochs=3, lr=1e-3, batch_size=64, seed=SEED)
    mats = lowrank_matrices(cnn.to(dev), (nn.Linear, nn.Conv2d))
    errs = hard_lowrank_(mats, 8)
    rec_rows.append({
        "what": "fit() 3 epochs on the svd model (GPU)",
        "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
        "params on cuda": all(p.is_cuda for p in small.parameters()),
    })
    rec_rows.append({
        "what": "hard_lowrank_ rank 8 (GPU)",
        "loss first -> last": f"max rel. truncation error {max(errs.values()):.3f}",
        "params on cuda": all(m.is_cuda for m in mats.values()),
    })

    # RNN: the "lowrank" implementation on CUDA against cuDNN's dense LSTM
    torch.manual_seed(SEED)
    tagger = Tagger().eval().to(dev)
    seq = torch.randn(32, 100 if not smoke else 5, 64, device=dev)
    for keep in (0.25, 0.5):
        small, plan = tensorslim.compress(tagger, keep, allocator="uniform", example_input=seq)
        impl = plan.layer("rnn").extra.get("impl")
        cpu_small = tensorslim.apply_plan(tagger.cpu(), plan)
        tagger.to(dev)
        with torch.no_grad():
            y_gpu, y_cpu = small(seq), cpu_small(seq.cpu())
            dense_ms = cuda_ms(lambda: tagger(seq), reps=20)
            small_ms = cuda_ms(lambda m=small: m(seq), reps=20)
        rnn_rows.append({
            "keep": keep,
            "impl": impl,
            "GPU vs CPU output (rel)": f"{rel(y_gpu, y_cpu):.1e}",
            "dense cuDNN ms": round(dense_ms, 2),
            "compressed ms": round(small_ms, 2),
            "speedup": round(dense_ms / small_ms, 2),
        })
        print(rnn_rows[-1], flush=True)

    if smoke:
        return
    write_results(
        "cuda_check",
        {
            "compress and apply_plan on CUDA (CNN, batch 64, 32x32)": rows,
            "recovery on CUDA": rec_rows,
            "RNN lowrank path on CUDA (2-layer bi-LSTM 512, batch 32, 100 steps)": rnn_rows,
        },
        command="python benchmarks/cuda_check.py",
        seeds={"torch": SEED},
        notes=(
            f"Device: {torch.cuda.get_device_name(0)}; TF32 off. Latency: median of CUDA-"
            "synchronised calls after 5 warm-ups, dense and compressed timed in the same run."
        ),
    )


if __name__ == "__main__":
    main()
