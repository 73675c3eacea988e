"""Runs the fastpeft benchmarks: `python -m bench.run [--quick] [--device cpu|cuda|all] ...`.

Prints one table per measurement, a PASS/MISS summary against the (informational) targets, and
saves bench/results/<suite>-<device>.json (with machine info) and <suite>-<device>.png.
`make bench` and `fastpeft bench` run this module.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from typing import List, Optional

import torch

from . import common
from .common import DTYPES, BenchContext, SuiteResult


def load_suites() -> None:
    for mod in common.SUITE_MODULES:
        importlib.import_module(mod)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"],
                   help="cpu, cuda, or all (= cpu, plus cuda when available)")
    p.add_argument("--only", default=None, help="comma list of suites to run (default: all registered)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for JSON and PNG results")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    p.add_argument("--min-sample-ms", type=float, default=None, help="each timed sample lasts at least this long")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list the registered suites and exit")
    return p.parse_args(argv)


def make_context(args: argparse.Namespace, device: str) -> BenchContext:
    dtypes = []
    for name in [s.strip() for s in args.dtypes.split(",") if s.strip()]:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from fp32, bf16, fp16")
        dtypes.append(DTYPES[name])
    cuda = device.startswith("cuda")
    if args.quick:
        warmup, repeats, min_ms = 1, 5, (2.0 if cuda else 5.0)
    else:
        warmup, repeats, min_ms = 3, 15, (5.0 if cuda else 30.0)
    return BenchContext(
        device=device,
        dtypes=dtypes,
        quick=args.quick,
        threads=torch.get_num_threads(),
        warmup=args.warmup if args.warmup is not None else warmup,
        repeats=args.repeats if args.repeats is not None else repeats,
        min_sample_ms=args.min_sample_ms if args.min_sample_ms is not None else min_ms,
    )


def summarize(res: SuiteResult) -> str:
    lines = [f"-- targets ({res.suite}, {res.device}; informational) --"]
    for r in res.ratios:
        if r.target is None:
            continue
        unit = "%" if r.kind == "overhead" else "x"
        val = "n/a" if r.value is None else f"{r.value:.3g}{unit}"
        lines.append(f"  {r.status:5s} {r.label}: {val} (target {r.target.describe(unit)})")
    if res.errors:
        lines.append(f"-- problems ({len(res.errors)}) --")
        lines += [f"  ! {e}" for e in res.errors]
    return "\n".join(lines)


def run_suite(name: str, ctx: BenchContext, out: Optional[str], plot: bool = True) -> SuiteResult:
    fn = common.SUITES[name]
    t0 = time.time()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        res = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - one suite failing must not stop the others
        traceback.print_exc()
        res = SuiteResult(name, ctx.device, errors=[f"suite crashed: {type(exc).__name__}: {exc}"])
    res.meta["elapsed_s"] = round(time.time() - t0, 1)
    res.meta["quick"] = ctx.quick
    res.meta["loadavg_at_start"] = list(load0) if load0 else None
    for t in res.tables:
        print()
        print(t.render())
    print()
    print(summarize(res))
    if out:
        info = common.machine_info(ctx.device)
        path = common.save_json(res, out, {"machine": info})
        print(f"saved {path}")
        if plot:
            png = common.save_plot(res, out)
            if png:
                print(f"saved {png}")
    return res


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    load_suites()
    if args.list:
        print("\n".join(sorted(common.SUITES)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(common.SUITES)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in names if s not in common.SUITES]
        if unknown:
            raise SystemExit(f"unknown suite(s) {unknown}; registered: {sorted(common.SUITES)}")
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    info = common.machine_info(devices[-1])
    print(f"fastpeft bench: suites={names} devices={devices} quick={args.quick} dtypes={args.dtypes}")
    print(f"  cpu={info['cpu_model']} ({info['cpu_count']} cpus, torch threads {torch.get_num_threads()}), "
          f"torch {info['torch_version']}, peft {info.get('peft_version')}, load {info.get('loadavg')}")
    print(f"  fastpeft build_info: {info.get('fastpeft_build_info')}")
    if "gpu" in info:
        print(f"  gpu: {info['gpu']}")
    load = info.get("loadavg") or [0.0]
    if "cpu" in devices and torch.get_num_threads() > 1 and load[0] >= 0.75:
        print(f"  WARNING: load average {load[0]:.2f} with {torch.get_num_threads()} torch threads: on a shared CPU, "
              "OpenMP barriers stall when a core is taken by another process and CPU timings can inflate many-fold; "
              "consider --threads 1", flush=True)
    n_err = 0
    for dev in devices:
        ctx = make_context(args, dev)
        for name in names:
            print(f"\n##### suite {name} on {dev} #####", flush=True)
            res = run_suite(name, ctx, args.out, plot=not args.no_plot)
            n_err += len(res.errors)
    # Problems are reported, not fatal: a benchmark run is informational.
    return 0


if __name__ == "__main__":
    sys.exit(main())
