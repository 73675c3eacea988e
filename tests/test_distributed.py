"""Distributed training with fastpeft models on this CPU: DDP, FSDP2 (``fully_shard``) and Accelerate.

One spawn of two gloo processes (one thread each) runs every distributed scenario in turn and writes what it
trained (the adapter's checkpoint tensors, per rank) under a temporary folder; the tests then compare each
against one process trained on the combined batch, here in the test process. The reference is exact math, not
a second implementation: two ranks each holding half of the batch and averaging their gradients (DDP,
FSDP2's reduce-scatter) take the same steps as one process on the whole batch, because the loss is a mean over
equally many tokens per rank. Adapters have no dropout: each rank draws its rows' masks from its own RNG
stream, so a run with dropout differs from the one-process run by which units are dropped (equal in
distribution, not bit for bit). The optimiser is SGD with momentum; Adam's normalisation would blow last-bit
differences of near-zero gradients up to ``lr``.

Also here: the README's multi-GPU examples (run as one process), LinearNF4's statistics as buffers, and (CUDA
only) FSDP2 moving a CPU-built QLoRA model to the GPU.
"""
from __future__ import annotations

import os
import tempfile
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import fastpeft  # noqa: E402

# (not _peft_testing's builders: that module imports peft, which would add seconds to each spawned process)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

WORLD = 2
BATCH, SEQ = 4, 8  # the combined batch; each rank holds BATCH // WORLD rows
STEPS = 3
LR, MOMENTUM = 0.5, 0.9


# ---- what both sides build and run ----------------------------------------------------------------------------

VOCAB = 96


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def randomize_adapter(model, seed: int, scale: float):
    """Random values in every adapter tensor (LoRA's B starts at zero), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                if "magnitude" in name:
                    p.mul_(1.0 + scale * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def _batch() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _build(kind: str, seed: int = 0):
    """A tiny Llama with one fastpeft adapter (random, so that every factor gets a gradient), in training mode."""
    base = tiny_llama(seed)
    if kind == "qlora":
        base = fastpeft.quantize_model(base, compute_dtype=None, progress=False)  # lm_head stays float
    if kind == "loha":
        config = fastpeft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False)
    else:
        config = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                     target_modules=["q_proj", "v_proj", "down_proj"], use_dora=kind == "dora")
    model = fastpeft.get_peft_model(base, config)
    randomize_adapter(model, seed=5, scale=0.1)
    return model.train()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _train(model, ids: torch.Tensor, on_grads=None) -> None:
    """STEPS of SGD on ``ids`` (next-token loss, mean over the tokens of ``ids``)."""
    opt = torch.optim.SGD(_trainable(model), lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        if on_grads is not None:
            on_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _adapter(model) -> dict:
    return {k: v.detach().clone() for k, v in fastpeft.get_peft_model_state_dict(model).items()}


# ---- the distributed side: one function per scenario, each run on every rank --------------------------------------


def _my_rows(rank: int) -> torch.Tensor:
    per = BATCH // WORLD
    return _batch()[rank * per:(rank + 1) * per]


def _ddp(kind: str, rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _build(kind)
    # find_unused_parameters=False: a trainable parameter without a gradient would fail the next step's forward
    ddp = DDP(model, find_unused_parameters=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def all_have_grads():
        missing = [n for n, p in named if p.grad is None]
        assert not missing, f"trainable parameters without a gradient under DDP: {missing}"

    _train(ddp, _my_rows(rank), all_have_grads)
    if rank == 0:
        ddp.module.save_pretrained(str(out / f"ddp_{kind}"))
    return _adapter(ddp.module)


def _ddp_qlora_broadcast(rank: int, out: Path) -> dict:
    """Ranks built from different random weights: DDP's start-up broadcast must give every rank rank 0's model,
    NF4 statistics (absmax, ...) included, not just the packed bytes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_build("qlora", seed=rank), find_unused_parameters=False)
    ddp.eval()
    with torch.no_grad():
        logits = ddp(input_ids=_batch()).logits
    return {"logits": logits}


def _fsdp(kind: str, rank: int, out: Path, bf16: bool = False) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    model = _build(kind)
    initial = _adapter(model)
    # bf16: FSDP2 all-gathers the float parameters in bf16 (the packed NF4 bytes stay uint8), reduces in fp32
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    sharded = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}
    assert len(sharded) == len(list(model.parameters())), "fully_shard left parameters unsharded"
    if kind == "qlora":  # the packed NF4 bytes are sharded too: each rank holds half of them
        packed = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert packed.dtype == torch.uint8 and packed.to_local().numel() * WORLD == packed.numel()
    _train(model, _my_rows(rank))
    state = _adapter(model)  # DTensors gathered to whole tensors: a collective, every rank exports
    if bf16:
        return state
    assert not any(isinstance(v, DTensor) for v in state.values())
    model.save_pretrained(str(out / f"fsdp_{kind}"), is_main_process=rank == 0)
    # whole tensors load into the sharded model (each rank keeps its shard), e.g. to resume
    fastpeft.set_peft_model_state_dict(model, initial)
    reloaded = _adapter(model)
    assert all(torch.equal(reloaded[k], initial[k]) for k in initial)
    fastpeft.set_peft_model_state_dict(model, state)
    return state


def _accelerate(rank: int, out: Path) -> dict:
    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)  # takes the process group already set up
    assert accelerator.num_processes == WORLD and accelerator.process_index == rank
    # batch_size per process: each step the two processes together see the combined batch
    unwrapped = _accelerate_train(accelerator, BATCH // WORLD, out / "accelerate")
    accelerator.wait_for_everyone()
    return _adapter(unwrapped)


def _accelerate_train(accelerator, batch_size: int, save_dir: Path):
    """The LoRA model trained through accelerator.prepare; the unwrapped PeftModel, saved to `save_dir`."""
    model = _build("lora")
    opt = torch.optim.SGD(_trainable(model), lr=LR, momentum=MOMENTUM)
    loader = torch.utils.data.DataLoader(_batch().repeat(STEPS, 1), batch_size=batch_size)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for ids in loader:
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    assert isinstance(unwrapped, fastpeft.PeftModel)
    unwrapped.save_pretrained(str(save_dir), is_main_process=accelerator.is_main_process)
    return unwrapped


SCENARIOS = {
    "ddp_lora": lambda r, o: _ddp("lora", r, o),
    "ddp_loha": lambda r, o: _ddp("loha", r, o),
    "ddp_dora": lambda r, o: _ddp("dora", r, o),
    "ddp_qlora": lambda r, o: _ddp("qlora", r, o),
    "ddp_qlora_broadcast": _ddp_qlora_broadcast,
    "fsdp_lora": lambda r, o: _fsdp("lora", r, o),
    "fsdp_qlora": lambda r, o: _fsdp("qlora", r, o),
    "fsdp_qlora_bf16": lambda r, o: _fsdp("qlora", r, o, bf16=True),
    "accelerate": _accelerate,
}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    out = Path(out)
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank, out)
            except Exception:
                (out / f"{name}.error{rank}").write_text(traceback.format_exc())
                raise
            torch.save(result, out / f"{name}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run():
    """Run every scenario on 2 gloo processes once; yields (output folder, the spawn's error text or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        out = Path(tmp) / "out"
        out.mkdir()
        error = None
        try:
            mp.spawn(_worker, args=(init_file, str(out)), nprocs=WORLD, join=True)
        except Exception as exc:  # a failing scenario stops the run; tests of the scenarios before it still pass
            error = f"{type(exc).__name__}: {exc}"
        yield out, error


def _results(run, name: str) -> list:
    out, error = run
    files = [out / f"{name}.rank{r}.pt" for r in range(WORLD)]
    if not all(f.is_file() for f in files):
        errors = "\n".join(p.read_text() for p in sorted(out.glob(f"{name}.error*")))
        pytest.fail(f"scenario {name!r} did not finish on every rank:\n{errors or error}")
    return [torch.load(f) for f in files]


def _reference(kind: str) -> dict:
    """One process, the combined batch."""
    model = _build(kind)
    _train(model, _batch())
    return _adapter(model)


def _assert_same(got: dict, want: dict, atol=1e-5, rtol=1e-4):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def _assert_loads(folder: Path, kind: str, want: dict):
    """The checkpoint written by rank 0 loads into a fresh (single-process) model with the trained weights."""
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    base = tiny_llama(0)
    if kind == "qlora":
        base = fastpeft.quantize_model(base, compute_dtype=None, progress=False)
    loaded = fastpeft.PeftModel.from_pretrained(base, str(folder))
    _assert_same(_adapter(loaded), want, atol=0, rtol=0)


# ---- the tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "loha", "dora", "qlora"])
def test_ddp_matches_one_process_on_the_combined_batch(distributed_run, kind):
    ranks = _results(distributed_run, f"ddp_{kind}")
    want = _reference(kind)
    _assert_same(ranks[1], ranks[0], atol=0, rtol=0)  # DDP keeps the replicas identical
    _assert_same(ranks[0], want)
    initial = _adapter(_build(kind))
    assert all(not torch.equal(want[k], initial[k]) for k in want), "training left an adapter tensor unchanged"
    _assert_loads(distributed_run[0] / f"ddp_{kind}", kind, ranks[0])


def test_ddp_broadcasts_the_nf4_quant_state(distributed_run):
    ranks = _results(distributed_run, "ddp_qlora_broadcast")
    model = _build("qlora", seed=0).eval()
    with torch.no_grad():
        want = model(input_ids=_batch()).logits
    torch.testing.assert_close(ranks[0]["logits"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[1]["logits"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_fsdp2_matches_one_process_on_the_combined_batch(distributed_run, kind):
    ranks = _results(distributed_run, f"fsdp_{kind}")
    want = _reference(kind)
    _assert_same(ranks[1], ranks[0], atol=0, rtol=0)
    _assert_same(ranks[0], want)
    _assert_loads(distributed_run[0] / f"fsdp_{kind}", kind, ranks[0])


def test_fsdp2_qlora_mixed_precision(distributed_run):
    """bf16 all-gathers (MixedPrecisionPolicy) leave the uint8 NF4 bytes alone: training lands near fp32's."""
    ranks = _results(distributed_run, "fsdp_qlora_bf16")
    want, initial = _reference("qlora"), _adapter(_build("qlora"))
    _assert_same(ranks[1], ranks[0], atol=0, rtol=0)
    for k in want:
        step, err = want[k] - initial[k], ranks[0][k] - want[k]
        assert err.norm() < 0.05 * step.norm(), k


def test_accelerate_multi_process_matches_one_process(distributed_run):
    ranks = _results(distributed_run, "accelerate")
    want = _reference("lora")
    _assert_same(ranks[1], ranks[0], atol=0, rtol=0)
    _assert_same(ranks[0], want)
    _assert_loads(distributed_run[0] / "accelerate", "lora", ranks[0])


def test_accelerate_single_process_round_trip(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        unwrapped = _accelerate_train(Accelerator(cpu=True), BATCH, tmp_path / "adapter")
        trained = _adapter(unwrapped)
        _assert_same(trained, _reference("lora"))
        _assert_loads(tmp_path / "adapter", "lora", trained)
    finally:
        AcceleratorState._reset_state(True)


# ---- single process ---------------------------------------------------------------------------------------------


def test_nf4_quant_state_is_buffers():
    """LinearNF4's statistics are (non-persistent) buffers: what moves or broadcasts buffers sees them, the state
    dict keeps bitsandbytes' keys, and a dtype cast leaves them (and so the outputs) alone."""
    import copy

    from fastpeft.quant.nf4 import LinearNF4

    layer = LinearNF4.from_linear(torch.nn.Linear(64, 32), blocksize=64, double_quant=True)
    state = layer.quant_state
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"nf4_absmax", "nf4_code", "nf4_offset", "nf4_nested_absmax", "nf4_nested_code"}
    assert buffers["nf4_absmax"] is state.absmax and buffers["nf4_offset"] is state.offset
    assert not any(k.startswith("nf4_") for k in layer.state_dict())
    assert "weight.absmax" in layer.state_dict()
    x = torch.randn(3, 64)
    want = layer(x)
    # what FSDP2 / DDP do: replace or overwrite the buffer tensors; quant_state follows
    new_absmax = state.absmax.clone()
    layer.nf4_absmax = new_absmax
    assert layer.quant_state.absmax is new_absmax
    layer.nf4_nested_absmax.data = layer.nf4_nested_absmax.clone()
    torch.testing.assert_close(layer(x), want, atol=0, rtol=0)
    # .half() casts the bias, never the statistics
    half = copy.deepcopy(layer).half()
    assert half.quant_state.nested_absmax.dtype == torch.float32 and half.quant_state.offset.dtype == torch.float32
    assert half.quant_state.absmax.dtype == torch.uint8 and half.weight.dtype == torch.uint8
    torch.testing.assert_close(half.dequantize(), layer.dequantize(), atol=0, rtol=0)
    # a copy has its own statistics, consistent with its buffers
    twin = copy.deepcopy(layer)
    assert twin.quant_state.absmax is twin.nf4_absmax and twin.nf4_absmax is not layer.nf4_absmax
    without = LinearNF4.from_linear(torch.nn.Linear(64, 32), double_quant=False)
    assert without.quant_state.offset is None and "nf4_offset" not in dict(without.named_buffers())


def _readme_block(heading: str) -> str:
    import re

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_readme_multi_gpu_example_runs_as_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", _free_port())
    try:
        exec(compile(_readme_block("## Multi-GPU training (DDP, FSDP2, Accelerate)"), "README.md:multi-gpu", "exec"), {})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for folder in ("ddp-adapter", "fsdp-qlora-adapter"):
        assert (tmp_path / folder / "adapter_model.safetensors").is_file()


def test_readme_accelerate_example_runs(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(_readme_block("### Accelerate"), "README.md:accelerate", "exec"), {})
    finally:
        AcceleratorState._reset_state(True)
    assert (tmp_path / "accelerate-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.cuda
def test_fsdp2_moves_a_cpu_built_qlora_model_to_the_gpu(tmp_path):
    """fully_shard with a CUDA mesh on a model built on the CPU moves parameters and buffers itself (no .to()):
    the NF4 statistics must travel with the packed bytes. One process (NCCL, world size 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = _build("qlora")
        want = model(input_ids=_batch(), labels=_batch()).loss
        mesh = init_device_mesh("cuda", (1,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        qs = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.quant_state
        assert qs.absmax.is_cuda and qs.nested_absmax.is_cuda and qs.code.is_cuda
        ids = _batch().cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.testing.assert_close(loss.cpu(), want.detach(), atol=1e-3, rtol=1e-3)
        state = _adapter(model)
        assert all(not hasattr(v, "device_mesh") for v in state.values())
    finally:
        dist.destroy_process_group()
