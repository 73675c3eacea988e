"""Checkpoint hardening (issue 9): saves are atomic even across a SIGKILL (two files, one commit), truncated or
corrupted files give errors naming the file (and the tensor), wrong dtypes / shapes / keys are named, bad configs
name the file and field, and nothing in a checkpoint directory is ever executed (no pickle, no imports)."""
from __future__ import annotations

import copy
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from _peft_testing import make_configs, randomize_adapter, tiny_llama

import fastpeft
from fastpeft import checkpoint as ckpt
from fastpeft.checkpoint import AdapterCheckpointError, CorruptCheckpointError

ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """(base model, directory of a saved LoRA adapter on q_proj/v_proj, r=4)."""
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    randomize_adapter(fm)
    d = tmp_path_factory.mktemp("adapter")
    fm.save_pretrained(str(d))
    return base, d


def _copy_adapter(src, dst, weights: bytes = None, config: str = None):
    dst.mkdir()
    (dst / ST).write_bytes((src / ST).read_bytes() if weights is None else weights)
    (dst / CFG).write_text((src / CFG).read_text() if config is None else config)
    return dst


def _load(base, d, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(d), **kw)


# ---- truncated / corrupted weights ---------------------------------------------------------------------------------


def _header(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _with_header(raw: bytes, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _first_key(raw):
    return sorted(k for k in _header(raw)[1] if k != "__metadata__")[0]


def _edit_entry(raw, **changes):
    _, h = _header(raw)
    key = _first_key(raw)
    h[key] = {**h[key], **changes}
    return _with_header(raw, h)


CORRUPTIONS = {
    "empty": (lambda raw: b"", None),
    "4 bytes": (lambda raw: raw[:4], None),
    "length only": (lambda raw: raw[:8], None),
    "half header": (lambda raw: raw[: 8 + _header(raw)[0] // 2], None),
    "cut in first tensor": (lambda raw: raw[: 8 + _header(raw)[0] + 10], "lora_A"),
    "last byte missing": (lambda raw: raw[:-1], "lora_B"),
    "trailing garbage": (lambda raw: raw + b"\0" * 16, "not covered"),
    "header length past end": (lambda raw: struct.pack("<Q", len(raw) * 10) + raw[8:], None),
    "header length 2**62": (lambda raw: struct.pack("<Q", 2**62) + raw[8:], None),
    "flipped header byte": (lambda raw: raw[:13] + bytes([raw[13] ^ 0xFF]) + raw[14:], None),
    "garbage header json": (lambda raw: raw[:8] + b"{" + b"x" * (_header(raw)[0] - 1) + raw[8 + _header(raw)[0]:],
                            None),
    "header is a list": (lambda raw: raw[:8] + b"[" + b" " * (_header(raw)[0] - 2) + b"]" + raw[8 + _header(raw)[0]:],
                         None),
    "unknown dtype": (lambda raw: _edit_entry(raw, dtype="XYZ"), "XYZ"),
    "dtype vs offsets": (lambda raw: _edit_entry(raw, dtype="F64"), "needs"),
    "bad shape": (lambda raw: _edit_entry(raw, shape=[-1, 4]), "shape"),
    "offsets past end": (lambda raw: _edit_entry(raw, data_offsets=[10**9, 10**9 + 512]), None),
    "pickle renamed": (lambda raw: pickle.dumps({"a": 1}), "pickle"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_weights_give_an_error_naming_the_file(llama_adapter, tmp_path, case):
    base, src = llama_adapter
    corrupt, detail = CORRUPTIONS[case]
    raw = (src / ST).read_bytes()
    d = _copy_adapter(src, tmp_path / "a", weights=corrupt(raw))
    with pytest.raises(CorruptCheckpointError) as exc:
        _load(base, d)
    msg = str(exc.value)
    assert str(d / ST) in msg, msg
    if detail is not None:
        assert detail in msg, msg
    assert isinstance(exc.value, ValueError)
    # the same through the functional API
    with pytest.raises(CorruptCheckpointError, match="adapter_model.safetensors"):
        fastpeft.load_peft_weights(str(d))


def test_random_header_damage_never_escapes_as_a_raw_error(llama_adapter, tmp_path):
    """Flip random bytes of the header: each load either works (a harmless byte) or raises a fastpeft error."""
    _, src = llama_adapter
    raw = (src / ST).read_bytes()
    n, _ = _header(raw)
    rng = random.Random(0)
    path = tmp_path / ST
    for _ in range(60):
        damaged = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(0, 8 + n)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            fastpeft.load_peft_weights(str(tmp_path))
        except AdapterCheckpointError as exc:
            assert str(path) in str(exc)


def test_dtype_mismatch_names_file_key_and_dtypes(llama_adapter, tmp_path):
    base, src = llama_adapter
    sd = load_file(str(src / ST))
    key = sorted(sd)[0]
    d = _copy_adapter(src, tmp_path / "int")
    save_file({**sd, key: (sd[key] * 100).to(torch.int32)}, str(d / ST), metadata={"format": "pt"})
    with pytest.raises(AdapterCheckpointError) as exc:
        _load(base, d)
    msg = str(exc.value)
    assert str(d / ST) in msg and repr(key) in msg and "torch.int32" in msg and "torch.float32" in msg, msg
    # another floating dtype is cast, as peft does (a bf16/fp64 adapter into an fp32 model)
    d = _copy_adapter(src, tmp_path / "f64")
    save_file({k: v.double() for k, v in sd.items()}, str(d / ST), metadata={"format": "pt"})
    model = _load(base, d)
    got = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_shape_mismatch_and_unknown_module_name_file_and_key(llama_adapter, tmp_path):
    base, src = llama_adapter
    sd = load_file(str(src / ST))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    d = _copy_adapter(src, tmp_path / "shape")
    save_file({**sd, key: torch.zeros(16, 3)}, str(d / ST), metadata={"format": "pt"})
    with pytest.raises(AdapterCheckpointError) as exc:
        _load(base, d)
    msg = str(exc.value)
    assert str(d / ST) in msg and repr(key) in msg and "(16, 3)" in msg and "(16, 4)" in msg, msg
    ghost = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"  # the model has 2 layers
    d = _copy_adapter(src, tmp_path / "ghost")
    save_file({**sd, ghost: torch.zeros(4, 32)}, str(d / ST), metadata={"format": "pt"})
    with pytest.raises(AdapterCheckpointError, match="unexpected") as exc:
        _load(base, d)
    assert ghost in str(exc.value) and str(d / ST) in str(exc.value)


def test_prompt_embeddings_shape_mismatch_is_named(tmp_path):
    base = tiny_llama()
    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    fastpeft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path))
    save_file({"prompt_embeddings": torch.zeros(5, 32)}, str(tmp_path / ST), metadata={"format": "pt"})
    with pytest.raises(AdapterCheckpointError, match="prompt_embeddings") as exc:
        _load(base, tmp_path)
    assert "(5, 32)" in str(exc.value) and "(4, 32)" in str(exc.value) and str(tmp_path / ST) in str(exc.value)


# ---- bad configs and paths -----------------------------------------------------------------------------------------


def _cfg_with(src, **fields):
    return json.dumps({**json.loads((src / CFG).read_text()), **fields})


BAD_CONFIGS = {
    "invalid json": (lambda src: '{"peft_type": "LORA", ', "not valid JSON"),
    "not an object": (lambda src: "[1, 2]", "JSON object"),
    "deeply nested": (lambda src: "[" * 100000 + "]" * 100000, "JSON"),
    "no peft_type": (lambda src: json.dumps({"r": 4}), "peft_type"),
    "peft_type int": (lambda src: _cfg_with(src, peft_type=3), "LORA, "),
    "peft_type list": (lambda src: _cfg_with(src, peft_type=["LORA"]), "LORA, "),
    "unknown peft_type": (lambda src: _cfg_with(src, peft_type="SUPER_LORA"), "LORA, "),
    "r is a string": (lambda src: _cfg_with(src, r="4"), "LoraConfig.r"),
    "r is zero": (lambda src: _cfg_with(src, r=0), "r"),
    "lora_alpha is a list": (lambda src: _cfg_with(src, lora_alpha=[8]), "lora_alpha"),
    "target_modules int": (lambda src: _cfg_with(src, target_modules=5), "target_modules"),
    "unknown task_type": (lambda src: _cfg_with(src, task_type="TELEPATHY"), "task_type"),
    "rank_pattern not a dict": (lambda src: _cfg_with(src, rank_pattern=[1]), "rank_pattern"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_names_the_file(llama_adapter, tmp_path, case):
    base, src = llama_adapter
    make, detail = BAD_CONFIGS[case]
    d = _copy_adapter(src, tmp_path / "a", config=make(src))
    with pytest.raises(ValueError) as exc:
        _load(base, d)
    msg = str(exc.value)
    assert str(d / CFG) in msg and detail in msg, msg


def test_non_utf8_config(llama_adapter, tmp_path):
    base, src = llama_adapter
    d = _copy_adapter(src, tmp_path / "a")
    (d / CFG).write_bytes(b'{"peft_type": "\xff\xfe"}')
    with pytest.raises(ValueError, match="UTF-8") as exc:
        _load(base, d)
    assert str(d / CFG) in str(exc.value)
    with pytest.raises(ValueError, match="UTF-8"):
        fastpeft.LoraConfig.from_pretrained(str(d))


def test_paths(llama_adapter, tmp_path):
    base, src = llama_adapter
    with pytest.raises(ValueError, match="is a file"):
        _load(base, src / ST)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        _load(base, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CFG):
        _load(base, tmp_path / "empty")
    d = _copy_adapter(src, tmp_path / "noweights")
    os.remove(d / ST)
    with pytest.raises(FileNotFoundError, match=ST):
        _load(base, d)
    with pytest.raises(FileNotFoundError):
        _load(base, src, subfolder="missing")


# ---- nothing in a checkpoint directory is executed -----------------------------------------------------------------


class _Boom:
    """Unpickling this creates the marker file (what a malicious pickle would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _booby_trapped(src, d, marker):
    """An adapter directory whose every non-safetensors file would create `marker` if loaded or imported."""
    d.mkdir()
    code = f"open({str(marker)!r}, 'w').close()\n"
    cfg = json.loads((src / CFG).read_text())
    cfg.update(
        auto_mapping={"base_model_class": "Evil", "parent_library": "evil_pkg"},
        base_model_name_or_path=str(d),
        custom_code="evil_pkg.run",
        trust_remote_code=True,
    )
    (d / CFG).write_text(json.dumps(cfg))
    (d / ST).write_bytes((src / ST).read_bytes())
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Boom(str(marker))}))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    (d / "__init__.py").write_text(code)
    (d / "evil_pkg.py").write_text(code)
    (d / "modeling_evil.py").write_text(code)
    (d / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_evil.Evil"}, "vocab_size": 1}))
    return d


def test_nothing_in_the_directory_is_executed(llama_adapter, tmp_path, monkeypatch):
    base, src = llama_adapter
    marker = tmp_path / "EXECUTED"
    d = _booby_trapped(src, tmp_path / "evil_pkg", marker)
    monkeypatch.syspath_prepend(str(tmp_path))  # an import of the names above would succeed (and create the marker)
    monkeypatch.syspath_prepend(str(d))

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)

    model = _load(base, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unknown config keys
        model.load_adapter(str(d), adapter_name="second")
        fastpeft.LoraConfig.from_pretrained(str(d))
    fastpeft.load_peft_weights(str(d))
    from fastpeft.hotswap import hotswap_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hotswap_adapter(model, str(d), "default")
        fastpeft.PeftMixedModel.from_pretrained(copy.deepcopy(base), str(d), "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path / "resaved"))  # reads base_model_name_or_path/config.json as JSON only
    assert not marker.exists()
    assert "evil_pkg" not in sys.modules and "modeling_evil" not in sys.modules

    # only the pickle: refused, never opened as a pickle
    os.remove(d / ST)
    with pytest.raises(ValueError, match="pickle"):
        _load(base, d)
    with pytest.raises(ValueError, match="pickle"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(d), adapter_name="third")
    with pytest.raises(ValueError, match="pickle"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hotswap_adapter(model, str(d), "default")
    assert not marker.exists()


def test_quantized_checkpoint_loaders_read_safetensors_only(tmp_path):
    marker = tmp_path / "EXECUTED"
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    d = tmp_path / "nf4"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ValueError, match="pickle"):
        fastpeft.load_nf4_model(str(d))
    (d / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}")  # header cut short
    with pytest.raises(CorruptCheckpointError) as exc:
        fastpeft.load_nf4_model(str(d))
    assert str(d / "model.safetensors") in str(exc.value)
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="same directory"):
        fastpeft.load_nf4_model(str(d))
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match="index.json"):
        fastpeft.load_nf4_model(str(d))
    (d / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json"):
        fastpeft.load_nf4_model(str(d))

    from fastpeft.quant.loftq import _SafetensorsWeights

    with pytest.raises(ValueError, match="safetensors"):
        _SafetensorsWeights(str(d / "pytorch_model.bin"))
    bad = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:-8])
    weights = _SafetensorsWeights(str(bad))
    with pytest.raises(CorruptCheckpointError, match="w.safetensors"):
        weights["w"]
    assert not marker.exists()


def test_xlora_expert_pickle_only_is_refused(tmp_path):
    base = tiny_llama()
    base.config.use_cache = False  # X-LoRA's requirement
    expert = tmp_path / "expert"
    _, fcfg = make_configs(dict(r=2, target_modules=["q_proj"]))
    fastpeft.get_peft_model(copy.deepcopy(base), fcfg).save_pretrained(str(expert))
    os.remove(expert / ST)
    (expert / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(tmp_path / "EXECUTED"))))
    cfg = fastpeft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={"e": str(expert)})
    with pytest.raises(ValueError, match="pickle"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    assert not (tmp_path / "EXECUTED").exists()


# ---- atomic saves across SIGKILL -------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import copy, os, sys, threading
    import torch
    from torch import nn
    import fastpeft
    from fastpeft import checkpoint as ckpt

    torch.set_num_threads(1)
    root = sys.argv[1]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict(dict(q_proj=nn.Linear(128, 128), v_proj=nn.Linear(128, 128)))
                                        for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = layer["v_proj"](layer["q_proj"](x))
            return x

    def adapter(alpha, seed):
        torch.manual_seed(0)
        model = fastpeft.get_peft_model(Net(), fastpeft.LoraConfig(r=16, lora_alpha=alpha,
                                                                   target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        return model

    A, B = adapter(16, 1), adapter(4, 2)   # same shapes: only the values and lora_alpha tell them apart
    A.save_pretrained(os.path.join(root, "refA"))
    B.save_pretrained(os.path.join(root, "refB"))
    STAGES = {"written": "A", "marked": "A", "weights_renamed": "B", "config_renamed": "B"}
    for stage in STAGES:
        A.save_pretrained(os.path.join(root, stage))
    os.makedirs(os.path.join(root, "first"))

    stop_at = {}          # thread name -> stage it blocks at (forever)
    reached = {}

    def hook(stage, directory):
        name = threading.current_thread().name
        if stop_at.get(name) == stage:
            reached[name].set()
            threading.Event().wait()

    ckpt._on_save_stage = hook
    threads = []
    for stage in STAGES:
        stop_at[stage] = stage
        reached[stage] = threading.Event()
        threads.append(threading.Thread(target=copy.deepcopy(B).save_pretrained, name=stage, daemon=True,
                                        args=(os.path.join(root, stage),)))
    stop_at["first"] = "written"
    reached["first"] = threading.Event()
    threads.append(threading.Thread(target=copy.deepcopy(B).save_pretrained, name="first", daemon=True,
                                    args=(os.path.join(root, "first"),)))
    saves = [0]

    def loop():
        while True:
            for model in (A, B):
                model.save_pretrained(os.path.join(root, "loop"))
                saves[0] += 1

    threads.append(threading.Thread(target=loop, name="loop", daemon=True))
    for t in threads:
        t.start()
    for event in reached.values():
        event.wait()
    while saves[0] < 4:
        threading.Event().wait(0.01)
    print("READY", flush=True)
    threading.Event().wait()
    """
)


def _adapter_of(d):
    cfg = json.loads((d / CFG).read_text())
    return cfg["lora_alpha"], load_file(str(d / ST))


def test_sigkill_mid_save_leaves_a_consistent_adapter(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = tmp_path / "dirs"
    root.mkdir()
    err = tmp_path / "child.err"
    with open(err, "w") as err_file:  # a file, not a pipe: a chatty child cannot block on a full pipe
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, stderr=err_file,
                                text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            proc.communicate()
            raise AssertionError(f"child failed: {line!r} {err.read_text()[-3000:]}")
        threading.Event().wait(random.Random().uniform(0.0, 0.2))  # the loop keeps saving: kill at a random point
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL

    ref = {"A": _adapter_of(root / "refA"), "B": _adapter_of(root / "refB")}

    def check(d, expected=None):
        """The directory loads (files and model) as exactly one of A and B, weights matching the config."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = fastpeft.LoraConfig.from_pretrained(str(d))
            weights = fastpeft.load_peft_weights(str(d))
        which = [n for n, (alpha, sd) in ref.items()
                 if cfg.lora_alpha == alpha and sorted(sd) == sorted(weights)
                 and all(torch.equal(sd[k], weights[k]) for k in sd)]
        assert len(which) == 1, f"{d.name}: alpha {cfg.lora_alpha} with weights of neither saved adapter"
        if expected is not None:
            assert which[0] == expected, f"{d.name}: loaded {which[0]}, expected {expected}"
        return which[0]

    leftovers = {}
    for stage, expected in {"written": "A", "marked": "A", "weights_renamed": "B", "config_renamed": "B"}.items():
        check(root / stage, expected)
        leftovers[stage] = sorted(set(os.listdir(root / stage)) - {ST, CFG})
    check(root / "loop")
    assert leftovers["written"] and leftovers["weights_renamed"], leftovers  # temps / marker of the killed saves

    # the first save was killed before anything was committed: a clear error, and the temp files are named as such
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ckpt.load_adapter_config(str(root / "first"))

    # the next save into each directory finishes / cleans up what the killed process left
    src = root / "refA"
    for stage in ("written", "marked", "weights_renamed", "config_renamed", "loop", "first"):
        d = root / stage
        if stage == "weights_renamed":
            # a config-only write first completes the interrupted commit (it must not be undone by a stale marker)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fastpeft.LoraConfig.from_pretrained(str(d)).save_pretrained(str(d))
            check(d, "B")
        ckpt.save_adapter_files(str(d), load_file(str(src / ST)), (src / CFG).read_text())
        assert sorted(os.listdir(d)) == [CFG, ST], (stage, os.listdir(d))
        check(d, "A")


def test_temp_files_of_live_processes_are_left_alone(tmp_path):
    live = tmp_path / f".adapter_model.safetensors.{os.getpid()}.abc123.tmp"
    live.write_bytes(b"x")
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    dead = tmp_path / f".adapter_config.json.{dead_proc.pid}.abc123.tmp"
    dead.write_bytes(b"x")
    foreign = tmp_path / ".adapter_config.json.notapid.tmp"
    foreign.write_bytes(b"x")
    ckpt.save_adapter_files(str(tmp_path), {"w": torch.ones(2)}, json.dumps({"peft_type": "LORA"}))
    assert live.exists() and foreign.exists() and not dead.exists()
    # a marker that names files outside our temp-name pattern is ignored (never followed)
    (tmp_path / ".fastpeft_save_pending.json").write_text(
        json.dumps({"pid": dead_proc.pid, "weights": "../x", "config": "../../etc/passwd"})
    )
    assert ckpt._committed_config_file(str(tmp_path)) == str(tmp_path / CFG)


def test_failed_save_keeps_the_previous_adapter(llama_adapter, tmp_path, monkeypatch):
    """An exception (not a kill) at any point of the commit leaves a consistent directory and no temp files."""
    base, src = llama_adapter
    d = _copy_adapter(src, tmp_path / "a")
    model = _load(base, d)
    old = (d / ST).read_bytes(), (d / CFG).read_text()
    randomize_adapter(model, seed=5)
    model.peft_config["default"].lora_alpha = 3
    for stage in ("written", "marked", "weights_renamed", "config_renamed"):
        def fail(s, directory, stage=stage):
            if s == stage:
                raise OSError(f"disk failed at {stage}")

        monkeypatch.setattr(ckpt, "_on_save_stage", fail)
        with pytest.raises(OSError, match="disk failed"):
            model.save_pretrained(str(d))
        assert sorted(os.listdir(d)) == [CFG, ST], (stage, os.listdir(d))
        now = (d / ST).read_bytes(), (d / CFG).read_text()
        if stage in ("written", "marked"):
            assert now == old, stage
        else:
            assert json.loads(now[1])["lora_alpha"] == 3 and now[0] != old[0], stage
        _load(base, d)
        (d / ST).write_bytes(old[0])
        (d / CFG).write_text(old[1])
