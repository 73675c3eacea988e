"""Shared pieces of the fastpeft benchmarks: a suite registry, robust timing, memory probes,
result tables with informational targets, and JSON/PNG output.

A suite is a function `fn(ctx: BenchContext) -> SuiteResult` registered with `@register("name")`.
`python -m bench.run` runs every registered suite (or those named by `--only`) on every selected
device. Later suites (NF4 vs bitsandbytes, LoHa/LoKr, OFT/BOFT, ...) only add a module to
`SUITE_MODULES` below and decorate their entry point.

Timing is built for a noisy, shared machine:
  * every implementation is warmed up, then timed in *interleaved rounds* (A B C, then C B A, ...),
    so background load hits all of them alike;
  * each sample repeats the call enough times to last `min_sample_ms`;
  * a speed ratio is the median over rounds of the per-round ratio (robust to load drifting
    between rounds); absolute times are medians too (and min / IQR are kept in the JSON).
Targets are printed PASS/MISS for information only; nothing here asserts on a timing.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

# Modules imported by bench.run so their @register decorators run. Add new suites here.
SUITE_MODULES = [
    "bench.bench_lora", "bench.bench_llama", "bench.bench_nf4", "bench.bench_nf4_cuda", "bench.bench_lycoris",
    "bench.bench_lycoris_ops", "bench.bench_oft", "bench.bench_ia3", "bench.bench_rotate_ops", "bench.bench_methods",
    "bench.bench_adalora", "bench.bench_xlora", "bench.bench_mixed",
]

SUITES: Dict[str, Callable[["BenchContext"], "SuiteResult"]] = {}

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def register(name: str):
    """Decorator: `@register("lora") def run(ctx) -> SuiteResult`."""

    def deco(fn):
        if name in SUITES and SUITES[name] is not fn:
            raise ValueError(f"bench suite {name!r} registered twice")
        SUITES[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# context and results


@dataclass
class BenchContext:
    device: str = "cpu"  # "cpu" or "cuda"
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)
    quick: bool = False
    threads: Optional[int] = None
    # timing knobs (run.py fills these from --quick / CLI)
    warmup: int = 3
    repeats: int = 15
    min_sample_ms: float = 30.0
    verbose: bool = True
    # free-form overrides a suite may read (e.g. shapes for the smoke test)
    options: Dict[str, Any] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class Target:
    """An informational goal for one metric: PASS when `value op threshold` holds."""

    threshold: float
    op: str = ">="  # ">=" (bigger is better: speedups) or "<=" (smaller is better: memory, overhead)
    label: str = ""

    def check(self, value: Optional[float]) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        ok = value >= self.threshold if self.op == ">=" else value <= self.threshold
        return "PASS" if ok else "MISS"

    def describe(self, unit: str = "") -> str:
        return f"{self.op}{_fmt_num(self.threshold)}{unit}"


@dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, **row) -> Dict[str, Any]:
        self.rows.append(row)
        return row

    def render(self) -> str:
        cols = self.columns
        cells = [[_fmt_cell(r.get(c)) for c in cols] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        sep = "  "
        lines = [f"== {self.title} =="]
        lines.append(sep.join(c.ljust(w) for c, w in zip(cols, widths)))
        lines.append(sep.join("-" * w for w in widths))
        for row in cells:
            lines.append(sep.join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


@dataclass
class Ratio:
    """One point of the ratio plot (and of the PASS/MISS summary)."""

    label: str
    value: Optional[float]
    target: Optional[Target] = None
    kind: str = "speedup"  # "speedup" (x, bigger better), "memory"/"scaling" (x, smaller better), "overhead" (%)

    @property
    def status(self) -> str:
        return self.target.check(self.value) if self.target else ""


@dataclass
class SuiteResult:
    suite: str
    device: str
    tables: List[Table] = field(default_factory=list)
    ratios: List[Ratio] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {
            "suite": self.suite,
            "device": self.device,
            "meta": self.meta,
            "errors": self.errors,
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "ratios": [
                {
                    "label": r.label,
                    "value": r.value,
                    "kind": r.kind,
                    "target": dataclasses.asdict(r.target) if r.target else None,
                    "status": r.status,
                }
                for r in self.ratios
            ],
        }


def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2e}"


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return _fmt_num(v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _sample_ms(fn: Callable[[], Any], device: str, inner: int) -> float:
    """Mean wall (CPU) or CUDA-event (GPU) milliseconds of one call, over `inner` back-to-back calls."""
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


@dataclass
class Timings:
    """Per-implementation sample lists (ms), index-aligned by round."""

    samples: Dict[str, List[float]]
    inner: Dict[str, int]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def minimum(self, name: str) -> float:
        return min(self.samples[name])

    def iqr(self, name: str) -> float:
        s = sorted(self.samples[name])
        if len(s) < 4:
            return s[-1] - s[0]
        q = statistics.quantiles(s, n=4)
        return q[2] - q[0]

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of samples[slow][i] / samples[fast][i] (>1: `fast` is faster)."""
        return statistics.median(a / b for a, b in zip(self.samples[slow], self.samples[fast]))

    def summary(self) -> Dict[str, Dict[str, float]]:
        return {
            n: {"median_ms": self.median(n), "min_ms": self.minimum(n), "iqr_ms": self.iqr(n), "inner": self.inner[n],
                "samples_ms": list(self.samples[n])}
            for n in self.samples
        }


def time_interleaved(
    fns: Dict[str, Callable[[], Any]],
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 15,
    min_sample_ms: float = 30.0,
) -> Timings:
    """Times every callable in `fns` in interleaved rounds; the order rotates (and reverses every
    other round) so no implementation always runs right after a particular other one.

    Each callable must run one complete unit of work (e.g. forward + backward) and leave no state
    that grows between calls.
    """
    names = list(fns)
    # warm-up, interleaved too (first calls pay for allocator growth, oneDNN primitive creation,
    # CUDA context/cuBLAS handles, lazy imports, ...)
    for _ in range(max(warmup, 1)):
        for n in names:
            fns[n]()
    sync(device)
    # calibrate: how many calls make one sample last >= min_sample_ms
    inner = {}
    for n in names:
        one = max(_sample_ms(fns[n], device, 1), 1e-4)
        inner[n] = max(1, min(1000, int(math.ceil(min_sample_ms / one))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            k = i % len(names)
            order = names[k:] + names[:k]
            if i % 2:
                order = order[::-1]
            for n in order:
                samples[n].append(_sample_ms(fns[n], device, inner[n]))
    finally:
        if was_enabled:
            gc.enable()
    return Timings(samples=samples, inner=inner)


# ---------------------------------------------------------------------------------------------
# memory probes


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()
    except Exception:  # tensors without a storage (e.g. some subclasses): count their own bytes
        return ("id", id(t)), t.numel() * t.element_size()


@dataclass
class SavedBytes:
    total: int  # unique storage bytes saved for backward, parameters excluded
    excluding_inputs: int  # the same, also excluding storages of the given inputs
    count: int  # number of distinct storages


def measure_saved_bytes(
    forward: Callable[[], Any],
    params: Iterable[torch.Tensor] = (),
    inputs: Iterable[torch.Tensor] = (),
) -> "tuple[SavedBytes, Any]":
    """Runs `forward()` under torch.autograd.graph.saved_tensors_hooks and adds up the bytes of the
    distinct storages saved for backward (a view counts its whole storage, which is what stays
    alive), leaving out the storages of `params` (frozen or not: they live anyway). Returns the
    measure and forward's output (keep it alive or call backward on it).

    Tensors an autograd.Function stashes on ctx as plain attributes bypass the hooks and are not
    seen; custom ops that use ctx.save_for_backward (torch.library.register_autograd does) are.
    """
    param_keys = {_storage_key(p)[0] for p in params}
    input_keys = {_storage_key(x)[0] for x in inputs}
    seen: Dict[Any, int] = {}
    keep: List[torch.Tensor] = []  # hold references so no storage is freed and its address reused

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in param_keys and nbytes > 0 and key not in seen:
            seen[key] = nbytes
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(seen.values())
    excl = sum(v for k, v in seen.items() if k not in input_keys)
    keep.clear()
    return SavedBytes(total=total, excluding_inputs=excl, count=len(seen)), out


def cuda_peak_bytes(step: Callable[[], Any]) -> Optional[int]:
    """Peak CUDA memory allocated above the starting level while running `step()` (e.g. a
    forward + backward), or None off CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------------
# machine info and output


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": device,
    }
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import fastpeft

        info["fastpeft_version"] = getattr(fastpeft, "__version__", None)
        info["fastpeft_build_info"] = fastpeft.build_info()
    except Exception as exc:  # noqa: BLE001 - a broken build is itself worth recording
        info["fastpeft_build_info"] = f"unavailable: {type(exc).__name__}: {exc}"
    from importlib import metadata

    for mod in ("peft", "transformers", "bitsandbytes"):  # versions without importing (bitsandbytes is slow to import)
        try:
            info[f"{mod}_version"] = metadata.version(mod)
        except Exception:  # noqa: BLE001
            info[f"{mod}_version"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    return info


def save_json(result: SuiteResult, out_dir: str, extra_meta: Optional[Dict[str, Any]] = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    data = result.to_json()
    if extra_meta:
        data["meta"] = {**extra_meta, **data["meta"]}
    path = os.path.join(out_dir, f"{result.suite}-{result.device}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, torch.dtype):
        return dtype_name(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def save_plot(result: SuiteResult, out_dir: str) -> Optional[str]:
    """Horizontal bars of every ratio with its target marked; returns the PNG path (None when
    matplotlib is missing or there is nothing to plot)."""
    points = [r for r in result.ratios if r.value is not None and not math.isnan(r.value)]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    os.makedirs(out_dir, exist_ok=True)
    kinds = [k for k in ("speedup", "memory", "overhead", "scaling") if any(p.kind == k for p in points)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 0.42 * len(points) + 1.6 * len(kinds)), squeeze=False)
    xlabels = {
        "speedup": "speed-up (x), higher is better; | = target",
        "memory": "saved-activation bytes ratio (x), lower is better; | = target",
        "overhead": "overhead over frozen base layer (%), lower is better; | = target",
        "scaling": "time / the same implementation's baseline time (x), lower is better; | = target",
    }
    for ax, kind in zip(axes[:, 0], kinds):
        pts = [p for p in points if p.kind == kind]
        ys = list(range(len(pts)))[::-1]
        colors = []
        for p in pts:
            s = p.status
            colors.append("tab:green" if s == "PASS" else "tab:red" if s == "MISS" else "tab:gray")
        ax.barh(ys, [p.value for p in pts], color=colors)
        for y, p in zip(ys, pts):
            if p.target is not None:
                ax.plot([p.target.threshold] * 2, [y - 0.4, y + 0.4], color="black", lw=2)
            ax.text(p.value, y, f" {_fmt_num(p.value)}", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([p.label for p in pts], fontsize=7)
        if kind in ("speedup", "memory", "scaling"):
            ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel(xlabels[kind], fontsize=8)
    fig.suptitle(f"fastpeft bench: {result.suite} on {result.device}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{result.suite}-{result.device}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    curves = result.meta.get("curves")
    if curves:
        save_curves(curves, os.path.join(out_dir, f"{result.suite}-{result.device}-curves.png"),
                    f"fastpeft bench: {result.suite} on {result.device}")
    return path


def save_curves(curves: Dict[str, Any], path: str, title: str) -> None:
    """Line plot of `curves` = {"x": [...], "xlabel": str, "ylabel": str, "target": float or None,
    "series": {label: [y per x]}} (log2 x axis), next to the bar plot."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, ys in curves["series"].items():
        ax.plot(curves["x"], ys, marker="o", label=label)
    if curves.get("target") is not None:
        ax.axhline(curves["target"], color="black", ls="--", lw=1, label=f"target {curves['target']}x")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curves["x"])
    ax.set_xticklabels([str(v) for v in curves["x"]])
    ax.set_xlabel(curves.get("xlabel", ""))
    ax.set_ylabel(curves.get("ylabel", ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mb(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


def safe_div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b
