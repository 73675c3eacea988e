"""OFT / BOFT rotation op benchmark (CPU): fastpeft.ops.block_diag_rotate / butterfly_rotate against the
reference formulation (fastpeft.reference: einsum per block, gathers for the permutations) and the base
layer they sit in front of, forward + backward (grad_x and grad_rot) via torch.autograd.grad.

    python -m bench.bench_rotate_ops [--tokens 2048] [--d 1024] [--threads 2] [--min-time 1.0] [--quick]

Rows: OFT b=32 (n=32 blocks, and one shared block), BOFT b in {8, 32} x m in {1, 2, 4} (peft's
butterfly permutations), fp32 and bf16. "base" is F.linear(x, W) forward + its input gradient
(2048x1024 @ 1024x1024, frozen W) in the same dtype; "% of base" is the rotation's fwd+bwd time as a
percentage of it. The three are timed in interleaved rounds (bench.common.time_interleaved); the table
gives each one's best round and the median over rounds of the paired ratios (both robust to other
processes on a shared machine). Outputs are checked against the reference once before timing.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .common import time_interleaved

from fastpeft import ops
from fastpeft import reference as ref


def peft_perms(d: int, block_num: int, block_size: int, m: int) -> torch.Tensor:
    """peft BOFT's butterfly permutations (boft/layer.py block_butterfly_perm) for m = n_factor + 1."""
    perms = []
    for i in range(m):
        if m == 1:
            perms.append(torch.arange(d))
            continue
        b_i, r = block_num // (2**i), block_size // 2
        chunk = d // b_i
        order = torch.cat([torch.arange(0, chunk // r, 2), torch.arange(1, chunk // r, 2)])
        sorted_order = torch.cat([torch.arange(int(p) * r, int(p) * r + r) for p in order])
        idx = torch.arange(d)
        for s in range(0, d, chunk):
            idx[s:s + chunk] = idx[s:s + chunk][sorted_order]
        perms.append(idx)
    return torch.stack(perms)


def _fwd_bwd(op, x, rot, g, *extra):
    def run():
        return torch.autograd.grad(op(x, rot, *extra), (x, rot), g)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per case")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="each timed sample lasts at least this long")
    p.add_argument("--quick", action="store_true", help="256 tokens, d=256, short timings")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d, args.repeats, args.min_sample_ms = 256, 256, 3, 2.0
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    n_tok, d = args.tokens, args.d
    cases = [("OFT b=32", 32, 0, False), ("OFT b=32 shared", 32, 0, True)]
    cases += [(f"BOFT b={b} m={m}", b, m, False) for b in (8, 32) for m in (1, 2, 4)]
    header = (f"{'dtype':5} {'case':18} {'base ms':>8} {'ours ms':>8} {'ref ms':>8} {'% of base':>9} "
              f"{'(median)':>8} {'vs ref':>7}")
    print(f"tokens={n_tok} d={d} threads={args.threads}")
    print(header)
    print("-" * len(header))
    for name in args.dtypes.split(","):
        dtype = dtypes[name.strip()]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n_tok, d, generator=gen).to(dtype).requires_grad_(True)
        g = torch.randn(n_tok, d, generator=gen).to(dtype)
        w = (torch.randn(d, d, generator=gen) * d**-0.5).to(dtype)

        def base():
            return torch.autograd.grad(F.linear(x, w), x, g)

        for label, b, m, shared in cases:
            if d % b:
                continue
            n = 1 if shared else d // b
            if m == 0:
                rot = (torch.randn(n, b, b, generator=gen) * b**-0.5).to(dtype).requires_grad_(True)
                ours_fn, ref_fn, extra = ops.block_diag_rotate, ref.block_diag_rotate, ()
            else:
                if m > 1 and (d // b) % (2 ** (m - 1)):
                    continue
                rot = (torch.randn(m, n, b, b, generator=gen) * b**-0.5).to(dtype).requires_grad_(True)
                ours_fn, ref_fn, extra = ops.butterfly_rotate, ref.butterfly_rotate, (peft_perms(d, n, b, m),)
            with torch.no_grad():
                y, y_ref = ours_fn(x, rot, *extra).float(), ref_fn(x, rot, *extra).float()
                err = ((y - y_ref).norm() / y_ref.norm()).item()
            assert err < (2e-2 if dtype != torch.float32 else 1e-4), (label, err)
            t = time_interleaved({"base": base, "ours": _fwd_bwd(ours_fn, x, rot, g, *extra),
                                  "ref": _fwd_bwd(ref_fn, x, rot, g, *extra)},
                                 repeats=args.repeats, min_sample_ms=args.min_sample_ms)
            tb, to, tr = t.minimum("base"), t.minimum("ours"), t.minimum("ref")
            print(f"{name:5} {label:18} {tb:8.2f} {to:8.2f} {tr:8.2f} {100 * to / tb:8.1f}% "
                  f"{100 / t.ratio('base', 'ours'):7.1f}% {tr / to:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
