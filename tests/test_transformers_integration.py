"""fastpeft with transformers: generate() gives peft's tokens, Trainer trains and saves reloadable adapter
checkpoints, prepare_model_for_kbit_training behaves as peft's and trains with gradient checkpointing."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from _peft_testing import (
    VOCAB,
    inputs,
    logits,
    make_configs,
    peft,
    randomize_adapter,
    tiny_gpt2,
    tiny_llama,
    transformers,
)

import fastpeft
from fastpeft.training import PeftTrainer, SaveAdapterCallback, prepare_model_for_kbit_training

ATOL = 1e-4


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


GEN_CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               task_type="CAUSAL_LM")),
    "llama-dora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                    task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")),
    "t5": (tiny_t5, dict(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
}


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generate_matches_peft(case):
    builder, kw = GEN_CASES[case]
    base = builder()
    pcfg, fcfg = make_configs(kw)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    randomize_adapter(fm, scale=0.5)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    peft.set_peft_model_state_dict(pm, fastpeft.get_peft_model_state_dict(fm))
    fm.eval()
    pm.eval()
    batch = inputs(batch=2, seq=5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = pm.generate(**batch, **gen)
        got = fm.generate(**batch, **gen)
        with fm.disable_adapter():
            base_tokens = fm.generate(**batch, **gen)
        plain = base.generate(**batch, **gen)
    assert torch.equal(got, expected)
    assert torch.equal(base_tokens, plain)
    assert not torch.equal(got, plain), "the adapter should change the generated tokens"
    # merged weights generate the same tokens
    fm.merge_adapter()
    with torch.no_grad():
        assert torch.equal(fm.generate(**batch, **gen), expected)
    fm.unmerge_adapter()


def test_prepare_inputs_for_generation_is_restored():
    base = tiny_llama()
    fm = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(GEN_CASES["llama"][1])[1])
    before = fm.base_model.prepare_inputs_for_generation
    with pytest.raises(Exception):
        fm.generate(input_ids="not a tensor", max_new_tokens=2)
    assert fm.base_model.prepare_inputs_for_generation == before


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each sequence counts up from a random start
        start = torch.randint(3, VOCAB - seq - 1, (n, 1), generator=g)
        self.ids = start + torch.arange(seq)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_trainer_trains_and_checkpoint_reloads(tmp_path):
    base = tiny_llama()
    _, fcfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    initial = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(fm).items()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=fm, args=args, train_dataset=_LMData(), callbacks=[SaveAdapterCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    trained = fastpeft.get_peft_model_state_dict(fm)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # only adapter weights moved
    base_sd = base.state_dict()
    merged_free = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
                   for k, v in fm.state_dict().items() if "lora_" not in k}
    for k, v in merged_free.items():
        assert torch.equal(v, base_sd[k]), k

    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    fm.eval()
    batch = inputs()
    reloaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(ckpt))
    torch.testing.assert_close(logits(reloaded, batch), logits(fm, batch), atol=ATOL, rtol=ATOL)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(ckpt))
    torch.testing.assert_close(logits(in_peft, batch), logits(fm, batch), atol=ATOL, rtol=ATOL)


def test_peft_trainer_tied_embeddings_resume_and_save_model(tmp_path):
    """GPT-2 ties lm_head to wte: plain Trainer cannot save the full state with safetensors, PeftTrainer saves
    the adapter; training resumes from the checkpoint and save_model() writes a reloadable adapter."""
    base = tiny_gpt2()
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")

    def make_trainer(model, max_steps):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
            learning_rate=2e-2, save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        return PeftTrainer(model=model, args=args, train_dataset=_LMData())

    fm = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(kw)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(fm, 2).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    at_step2 = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(fm).items()}

    # resume into a fresh model: the adapter comes back from checkpoint-2, then trains to step 4
    fresh = fastpeft.get_peft_model(copy.deepcopy(base), make_configs(kw)[1])
    trainer = make_trainer(fresh, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer._load_from_checkpoint(str(ckpt))
        loaded = fastpeft.get_peft_model_state_dict(fresh)
        for k in at_step2:
            torch.testing.assert_close(loaded[k], at_step2[k])
        result = trainer.train(resume_from_checkpoint=str(ckpt))
    assert result.global_step == 4
    final_dir = tmp_path / "final"
    trainer.save_model(str(final_dir))
    fresh.eval()
    reloaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(final_dir))
    batch = inputs()
    torch.testing.assert_close(logits(reloaded, batch), logits(fresh, batch), atol=ATOL, rtol=ATOL)


def _bf16_llama():
    m = tiny_llama()
    return m.to(torch.bfloat16)


@pytest.mark.parametrize("quantized", [False, True])
def test_prepare_model_for_kbit_training_matches_peft(quantized):
    ours, theirs = _bf16_llama(), _bf16_llama()
    if quantized:  # what transformers sets on a bitsandbytes-loaded model
        ours.is_loaded_in_4bit = theirs.is_loaded_in_4bit = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = prepare_model_for_kbit_training(ours)
        peft.prepare_model_for_kbit_training(theirs)
    assert out is ours
    p_ours, p_theirs = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert {k: (v.dtype, v.requires_grad) for k, v in p_ours.items()} == {
        k: (v.dtype, v.requires_grad) for k, v in p_theirs.items()
    }
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in p_ours.values())
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing == quantized


def test_kbit_prepared_model_trains_with_gradient_checkpointing():
    def run(gc: bool):
        model = _bf16_llama()
        model.is_loaded_in_4bit = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": True}
            )
        assert model.is_gradient_checkpointing == gc
        _, cfg = make_configs(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        fm = fastpeft.get_peft_model(model, cfg)
        randomize_adapter(fm, seed=3)
        fm.train()
        batch = _LMData(n=4)[0]
        batch = {k: v.unsqueeze(0).repeat(2, 1) for k, v in batch.items()}
        out = fm(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in fm.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        return out.loss.detach(), grads

    loss_gc, grads_gc = run(True)
    loss_plain, grads_plain = run(False)
    torch.testing.assert_close(loss_gc, loss_plain)
    assert grads_gc.keys() == grads_plain.keys()
    for k in grads_gc:
        torch.testing.assert_close(grads_gc[k], grads_plain[k], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads_gc.values())


def test_prepare_model_for_kbit_training_input_checks():
    with pytest.raises(TypeError):
        prepare_model_for_kbit_training("nope")
    with pytest.raises(TypeError):
        prepare_model_for_kbit_training(tiny_llama(), gradient_checkpointing_kwargs=["use_reentrant"])


def test_kbit_layers_keep_their_storage_dtype():
    class LinearNF4(torch.nn.Module):  # stands in for a k-bit layer: packed weight + stats must not be cast
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.float16), requires_grad=False)
            self.absmax = torch.nn.Parameter(torch.ones(2, dtype=torch.float16), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))

    model = torch.nn.Sequential(LinearNF4(), torch.nn.LayerNorm(4).half())
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, auto_clear_cache=False)
    q, norm = model[0], model[1]
    assert q.weight.dtype == q.absmax.dtype == torch.float16
    assert q.bias.dtype == norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
