"""The README's quick start is runnable as written."""
import json
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _code_under(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README's section {heading!r} has no python block"
    return match.group(1)


def test_readme_auto_peft_model_example_runs(tmp_path, monkeypatch):
    import fastpeft

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_code_under("### Loading with AutoPeftModel"), "README.md:auto-peft-model", "exec"), ns)
    assert type(ns["model"]) is fastpeft.PeftModelForCausalLM


def test_readme_moe_experts_example_runs(tmp_path, monkeypatch):
    import fastpeft

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_code_under("### LoRA on MoE experts"), "README.md:moe-experts", "exec"), ns)
    assert isinstance(ns["model"], fastpeft.PeftModel)


def test_readme_nf4_example_runs():
    exec(compile(_code_under("## NF4 weights"), "README.md:nf4", "exec"), {})


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    from fastpeft import PeftModel

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## Quick start"), "README.md:quick-start", "exec"), ns)
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    merged = ns["merged"]
    assert type(merged) is LlamaForCausalLM
    assert not any("lora" in name for name, _ in merged.named_modules())

    # Re-create the original base (same seed, same first random draws) and reload the adapter:
    # it must reproduce the merged model's outputs.
    torch.manual_seed(0)
    original = LlamaForCausalLM(ns["base"].config)
    reloaded = PeftModel.from_pretrained(original, "my-adapter").eval()
    ids = ns["ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_readme_qlora_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## QLoRA: LoRA on NF4 weights"), "README.md:qlora", "exec"), ns)
    assert (tmp_path / "my-qlora-adapter" / "adapter_model.safetensors").is_file()
    assert ns["merged"].nf4_requantization_report.layers


def test_readme_bnb_checkpoint_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_code_under("### Loading a bitsandbytes 4-bit checkpoint"), "README.md:bnb-4bit", "exec"), {})


def test_readme_loftq_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## LoftQ"), "README.md:loftq", "exec"), ns)
    assert (tmp_path / "loftq-adapter" / "adapter_config.json").is_file()


def test_readme_loha_lokr_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("## LoHa and LoKr"), "README.md:lycoris", "exec"), {})
    assert (tmp_path / "my-lokr" / "adapter_config.json").is_file()


def test_readme_diffusers_example_runs(tmp_path, monkeypatch):
    import pytest

    diffusers = pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## Diffusion models (diffusers)"), "README.md:diffusers", "exec"), ns)
    assert (tmp_path / "unet-lora" / "adapter_model.safetensors").is_file()
    assert type(ns["unet"]) is diffusers.UNet2DConditionModel


def test_readme_oft_boft_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## OFT and BOFT"), "README.md:oft", "exec"), ns)
    for folder, peft_type in (("my-oft", "OFT"), ("my-boft", "BOFT")):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["peft_type"] == peft_type and (tmp_path / folder / "adapter_model.safetensors").is_file()
    assert type(ns["merged"]) is torch.nn.Sequential
    assert all(type(m).__module__.startswith("torch.nn") for m in ns["merged"].modules())


def test_readme_ia3_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## IA³"), "README.md:ia3", "exec"), ns)
    config = json.loads((tmp_path / "my-ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and set(config["feedforward_modules"]) == {"down_proj"}
    assert type(ns["merged"]).__name__ == "LlamaForCausalLM"


def test_readme_bitfit_example_runs(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## BitFit"), "README.md:bitfit", "exec"), ns)
    saved = load_file(str(tmp_path / "my-bitfit" / "adapter_model.safetensors"))
    assert saved and all(k.endswith(".bias") for k in saved)
    assert type(ns["plain"]).__name__ == "GPT2LMHeadModel"


def test_readme_weighted_and_hotswap_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("## Combining and hot-swapping adapters"), "README.md:weighted-hotswap", "exec"), {})


def test_readme_xlora_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("## X-LoRA"), "README.md:xlora", "exec"), {})


def test_readme_mixed_methods_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("### Several methods at once (PeftMixedModel)"), "README.md:mixed-methods", "exec"), {})


def test_readme_inits_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## Data-driven and other LoRA inits"), "README.md:inits", "exec"), ns)
    assert ns["model"].peft_config["default"].init_lora_weights == "corda"
    assert (tmp_path / "corda-adapter" / "adapter_model.safetensors").is_file()
    assert ns["reloaded"].peft_config["default"].corda_config["corda_method"] == "kpm"
    # (the block itself asserts that the reloaded model reproduces the adapted model's logits)


def test_readme_trainable_tokens_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_code_under("## Trainable tokens"), "README.md:trainable-tokens", "exec"), ns)
    assert (tmp_path / "my-tokens" / "adapter_model.safetensors").is_file()
    assert ns["plain"].lm_head.weight is ns["plain"].model.embed_tokens.weight


def test_readme_tied_embeddings_and_layer_replication_example_runs(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("## Tied embeddings and layer replication (LoRA)"), "README.md:tied-replication",
                 "exec"), {})
    config = json.loads((tmp_path / "tied-adapter" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] and "model.embed_tokens" in config["target_modules"]
    saved = load_file(str(tmp_path / "deep-adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" in saved


def test_readme_mixed_batch_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(_code_under("## Mixed-adapter batches"), "README.md:mixed-batch", "exec"), {})


def test_readme_alora_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_code_under("### Activated LoRA (aLoRA)"), "README.md:alora", "exec"), {})


def test_readme_robustness_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_code_under("## Robustness"), "README.md:robustness", "exec"), {})
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out  # the error was raised and names the file


def test_every_readme_python_block_is_run_exactly_once():
    """Each ```python block in the README is run by exactly one test: the block `_code_under(heading)` picks (the first
    after the heading) is credited to every test file that names the heading. Most run here; the ones of the methods
    whose test files predate this file run there (AdaLoRA, adaption prompts, bottleneck, prompt learning, multi-GPU)."""
    text = README.read_text()
    blocks = [m.start() for m in re.finditer(r"```python\n", text)]
    headings = {line for line in text.splitlines() if re.match(r"#{2,3} ", line)}
    runs = {b: [] for b in blocks}
    for test_file in sorted(README.parent.joinpath("tests").glob("test_*.py")):
        literals = set(re.findall(r"\"(#{2,3} [^\"\n]+)\"", test_file.read_text()))
        for literal in literals:
            if not any(h.startswith(literal) for h in headings):
                continue
            start = text.index(literal)
            block = next((b for b in blocks if b > start), None)
            if block is not None:
                runs[block].append(f"{test_file.name}:{literal}")
    where = {b: text[:b].count("\n") + 1 for b in blocks}
    assert all(len(r) == 1 for r in runs.values()), {f"README.md:{where[b]}": r for b, r in runs.items() if len(r) != 1}
