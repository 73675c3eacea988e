"""IA3 op-level benchmark (CPU): fwd + bwd of fastpeft.ops.ia3_linear vs the frozen base F.linear
(forward + grad to x) and vs peft's unfused expression, d = 1024, 2048 tokens, both modes.

    .venv/bin/python bench/bench_ia3_ops.py [--threads 2] [--reps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastpeft import ops


def _time_all(fns, reps):
    """Median ms per fn, the fns run round-robin so drifts in machine load hit all alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in ts]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--n", type=int, default=2048)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, n = a.d, a.n
    print(f"IA3 fwd+bwd, d={d}, {n} tokens, {a.threads} threads, median ms")
    print(f"| dtype | mode | base F.linear | peft unfused | fastpeft | fastpeft / base | fastpeft / peft |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d, d, generator=g).to(dtype) / d**0.5
        b = torch.randn(d, generator=g).to(dtype)
        x = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
        gy = torch.randn(n, d, generator=g).to(dtype)
        sdt = torch.float32  # peft keeps IA3 vectors in float32
        s = torch.rand(d, generator=g).to(sdt).requires_grad_(True)

        def base():
            torch.autograd.grad(F.linear(x, w, b), [x], gy)

        def peft_in():
            interm = (x.to(sdt) * s).to(dtype)
            torch.autograd.grad(F.linear(interm, w, b), [x, s], gy)

        def peft_out():
            r = F.linear(x, w, b)
            torch.autograd.grad((r * s).to(dtype), [x, s], gy)

        def fast(scale_input):
            return lambda: torch.autograd.grad(ops.ia3_linear(x, w, b, s, scale_input), [x, s], gy)

        tb, tpi, tfi, tpo, tfo = _time_all([base, peft_in, fast(True), peft_out, fast(False)], a.reps)
        for mode, tp, tf in (("input", tpi, tfi), ("output", tpo, tfo)):
            print(f"| {str(dtype).split('.')[1]} | {mode} | {tb:.2f} | {tp:.2f} | {tf:.2f} | {tf / tb:.3f} | {tf / tp:.3f} |")


if __name__ == "__main__":
    main()
