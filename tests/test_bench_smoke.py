"""Smoke test of the benchmark harness (bench/): the lora suite on tiny shapes, quick settings.
Proves the harness runs end to end and writes its results; asserts nothing about timings."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("peft")

from bench import common, run  # noqa: E402


def _fastpeft_lora_available() -> bool:
    try:
        import fastpeft
        from bench.bench_lora import OneLinear

        fastpeft.get_peft_model(OneLinear(8, 8), fastpeft.LoraConfig(r=2, target_modules=["proj"]))
        return True
    except Exception:  # noqa: BLE001
        return False


def test_timing_helpers():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    t = common.time_interleaved({"a": a, "b": b}, "cpu", warmup=1, repeats=4, min_sample_ms=0.0)
    assert len(t.samples["a"]) == len(t.samples["b"]) == 4
    assert calls["a"] >= 5 and calls["b"] >= 5
    assert t.ratio("a", "b") > 0 and t.median("a") >= 0
    assert common.Target(1.15).check(1.2) == "PASS" and common.Target(0.6, "<=").check(0.7) == "MISS"


def test_saved_bytes_excludes_params_and_dedups_storages():
    w = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16, requires_grad=True)
    sb, out = common.measure_saved_bytes(lambda: x @ w, params=[w], inputs=[x])
    out.sum().backward()
    assert sb.total == 4 * 16 * 4 and sb.excluding_inputs == 0
    # x saved twice (as itself and through a view) counts once
    sb, out = common.measure_saved_bytes(lambda: (x * x.view(4, 16)).sum(), params=[], inputs=[])
    assert sb.total == 4 * 16 * 4


def test_lora_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5,
        verbose=False, options={"d": 64, "tokens": 32, "r": 4},
    )
    run.load_suites()
    assert {"lora", "llama"} <= set(common.SUITES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threading only adds OpenMP stalls on a busy shared CPU
    try:
        res = run.run_suite("lora", ctx, str(tmp_path), plot=True)
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "lora-cpu.json").read_text())
    assert data["suite"] == "lora" and data["meta"]["machine"]["torch_version"] == torch.__version__
    layer = data["tables"][0]
    impls = {(r["case"], r["impl"]) for r in layer["rows"]}
    for case in ("lora", "lora drop0.1", "dora"):
        assert (case, "base") in impls and (case, "peft") in impls
    for r in layer["rows"]:
        assert r["ms"] > 0
    if _fastpeft_lora_available():
        for case in ("lora", "lora drop0.1", "dora"):
            assert (case, "fastpeft") in impls, res.errors
        assert any(r.kind == "speedup" and r.value for r in res.ratios)
        assert (tmp_path / "lora-cpu.png").exists()


def test_cli_list(capsys):
    assert run.main(["--list"]) == 0
    assert "lora" in capsys.readouterr().out


def test_nf4_suite_quick_tiny(tmp_path):
    pytest.importorskip("bitsandbytes")
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32, torch.bfloat16], quick=True, warmup=1, repeats=2, min_sample_ms=0.5,
        verbose=False, options={"out": 64, "in": 128, "tokens": 8},
    )
    run.load_suites()
    assert "nf4" in common.SUITES
    res = run.run_suite("nf4", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    data = json.loads((tmp_path / "nf4-cpu.json").read_text())
    rows = data["tables"][0]["rows"]
    ops = ("quantize", "dequantize", "linear fwd 1 row", "linear fwd 16 rows", "linear fwd 8 rows",
           "linear fwd+bwd(x) 16 rows", "linear fwd+bwd(x) 8 rows")
    assert {(r["op"], r["dtype"]) for r in rows} == {(op, dt) for op in ops for dt in ("fp32", "bf16")}
    assert all(r["fastpeft ms"] > 0 and r["bnb ms"] > 0 for r in rows)
    bandwidth = data["tables"][1]["rows"]
    assert [r["dtype"] for r in bandwidth] == ["fp32", "bf16"] and all(r["packed GB/s"] > 0 for r in bandwidth)


def _run_lycoris_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"d": 64, "tokens": 32, "conv_channels": 16, "conv_hw": 8, "conv_batch": 1},
    )
    run.load_suites()
    assert "lycoris" in common.SUITES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run.run_suite("lycoris", ctx, str(tmp_path), plot=False)
    finally:
        torch.set_num_threads(threads)


def test_lycoris_suite_quick_tiny(tmp_path):
    import fastpeft

    res = _run_lycoris_tiny(tmp_path)
    data = json.loads((tmp_path / "lycoris-cpu.json").read_text())
    lin, conv = data["tables"]
    cases = {"lokr", "loha"}
    conv_cases = {"conv block lora", "conv block loha", "conv block lokr"}
    impls = {(r["case"], r["impl"]) for r in lin["rows"]} | {(r["case"], r["impl"]) for r in conv["rows"]}
    assert {(c, i) for c in cases | conv_cases for i in ("base", "peft")} <= impls
    assert all(r["ms"] > 0 for r in lin["rows"] + conv["rows"])
    have = [hasattr(fastpeft, n) for n in ("LoKrConfig", "LoHaConfig")]
    if all(have):
        assert {(c, "fastpeft") for c in cases | conv_cases} <= impls, res.errors
        assert not [e for e in res.errors if "mismatch" in e or "failed" in e], res.errors
        assert any(r.kind == "speedup" and r.value for r in res.ratios)


def test_lycoris_suite_without_fastpeft_tuners_reports_instead_of_crashing(tmp_path, monkeypatch):
    import fastpeft

    for name in ("LoKrConfig", "LoHaConfig"):
        monkeypatch.delitem(fastpeft._LAZY, name, raising=False)
        monkeypatch.delattr(fastpeft, name, raising=False)
    res = _run_lycoris_tiny(tmp_path)
    assert not any("crashed" in e for e in res.errors), res.errors
    assert any("fastpeft lokr unavailable" in e and "LoKrConfig" in e for e in res.errors), res.errors
    assert any("fastpeft loha unavailable" in e and "LoHaConfig" in e for e in res.errors), res.errors
    rows = json.loads((tmp_path / "lycoris-cpu.json").read_text())["tables"][0]["rows"]
    assert {(r["case"], r["impl"]) for r in rows} == {(c, i) for c in ("lokr", "loha") for i in ("base", "peft")}


def test_lycoris_ops_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32, torch.bfloat16], quick=True, warmup=1, repeats=2, min_sample_ms=0.5,
        verbose=False, options={"d": 64, "tokens": 16},
    )
    run.load_suites()
    assert "lycoris_ops" in common.SUITES
    res = run.run_suite("lycoris_ops", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "lycoris_ops-cpu.json").read_text())["tables"][0]["rows"]
    assert len(rows) == 8 and all(r["status"] == "ok" and r["fastpeft ms"] > 0 for r in rows)


def test_oft_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"d": 64, "tokens": 32, "conv_channels": 16, "conv_hw": 6, "conv_batch": 1},
    )
    run.load_suites()
    assert "oft" in common.SUITES
    res = run.run_suite("oft", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "oft-cpu.json").read_text())["tables"][0]["rows"]
    cases = {"oft b=32 neumann", "oft b=32 exact", "boft b=4", "boft b=32"}
    assert {(r["case"], r["impl"]) for r in rows} == {(c, i) for c in cases for i in ("base", "peft", "fastpeft")}
    assert all(r["ms"] > 0 for r in rows)
    speedups = {r.label for r in res.ratios if r.kind == "speedup" and r.value}
    assert {f"fp32 {c}: fastpeft vs peft" for c in cases} <= speedups
    conv = json.loads((tmp_path / "oft-cpu.json").read_text())["tables"][1]["rows"]
    conv_cases = {"conv block boft b=4", "conv block boft b=16"}
    assert {(r["case"], r["impl"]) for r in conv} == {(c, i) for c in conv_cases for i in ("base", "peft", "fastpeft")}


def test_rotate_ops_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32, torch.bfloat16], quick=True, warmup=1, repeats=2, min_sample_ms=0.5,
        verbose=False, options={"d": 64, "tokens": 16},
    )
    run.load_suites()
    assert "rotate_ops" in common.SUITES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threading only adds OpenMP stalls on a busy shared CPU
    try:
        res = run.run_suite("rotate_ops", ctx, str(tmp_path), plot=False)
    finally:
        torch.set_num_threads(threads)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "rotate_ops-cpu.json").read_text())["tables"][0]["rows"]
    # d=64: every case but BOFT b=32 m=4 (2 blocks of 32 cannot take 3 butterfly levels), per dtype
    cases = {"OFT b=32", "OFT b=32 shared"} | {f"BOFT b={b} m={m}" for b in (8, 32) for m in (1, 2, 4)}
    cases.discard("BOFT b=32 m=4")
    assert {(r["dtype"], r["case"]) for r in rows} == {(dt, c) for dt in ("fp32", "bf16") for c in cases}
    assert all(r["status"] == "ok" and r["fastpeft ms"] > 0 and r["% of base"] > 0 and r["speedup"] > 0 for r in rows)


def test_ia3_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"d": 64, "tokens": 32},
    )
    run.load_suites()
    assert "ia3" in common.SUITES
    res = run.run_suite("ia3", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "ia3-cpu.json").read_text())["tables"][0]["rows"]
    cases = {"ia3 output", "ia3 input (feedforward)"}
    assert {(r["case"], r["impl"]) for r in rows} == {(c, i) for c in cases for i in ("base", "peft", "fastpeft")}
    assert {f"fp32 {c}: fastpeft over base" for c in cases} <= {r.label for r in res.ratios if r.kind == "overhead"}


def test_methods_suite_quick_tiny(tmp_path):
    """The comparison-of-methods table: a row per landed method, with every column measured."""
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.bfloat16], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"layers": 2, "hidden": 32, "intermediate": 64, "heads": 4, "vocab": 64, "seq": 8, "batch": 1},
    )
    run.load_suites()
    from bench.bench_methods import methods

    res = run.run_suite("methods", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = {r["method"]: r for r in json.loads((tmp_path / "methods-cpu.json").read_text())["tables"][0]["rows"]}
    expected = methods(ctx.options)
    assert set(rows) == {"full fine-tuning"} | {m.label for m in expected}
    for m in expected:
        row = rows[m.label]
        assert row["trainable"] > 0 and row["weights MB"] > 0, m.label
        assert row["adapter MB"] > 0 and row["ms/step"] > 0 and row["saved MB"] > 0 and row["infer ms"] > 0, m.label
        assert ("merged ms" in row) == m.mergeable, m.label
        assert ("vs peft x" in row) == (m.peft_has_it and not m.peft_needs_cuda), m.label


def test_xlora_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"layers": 1, "hidden": 32, "intermediate": 48, "heads": 4, "vocab": 64, "seq": 8, "batch": 1,
                 "r": 2, "experts": 3},
    )
    run.load_suites()
    assert "xlora" in common.SUITES
    res = run.run_suite("xlora", ctx, str(tmp_path), plot=False)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "xlora-cpu.json").read_text())["tables"][0]["rows"]
    assert [r["impl"] for r in rows] == ["base", "peft", "fastpeft"]
    fast = rows[-1]
    assert fast["status"] in ("PASS", "MISS") and fast["speedup"] > 0 and fast["max |diff|"] < 1e-4
    assert any(r.label.startswith("xlora 3 experts") for r in res.ratios)

def test_mixed_suite_quick_tiny(tmp_path):
    ctx = common.BenchContext(
        device="cpu", dtypes=[torch.float32], quick=True, warmup=1, repeats=2, min_sample_ms=0.5, verbose=False,
        options={"d": 32, "r": 4, "rows": 64},
    )
    run.load_suites()
    assert "mixed" in common.SUITES
    res = run.run_suite("mixed", ctx, str(tmp_path), plot=True)
    assert not res.errors, res.errors
    rows = json.loads((tmp_path / "mixed-cpu.json").read_text())["tables"][0]["rows"]
    assert {r["impl"] for r in rows} == {"fastpeft", "peft"}
    assert all(r["n=64 ms"] > 0 and r["single ms"] > 0 for r in rows)
    assert {f"fp32 fastpeft n={n} / n=1" for n in (4, 16, 64)} <= {r.label for r in res.ratios if r.kind == "scaling"}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "mixed-cpu-curves.png").exists()
