"""get_layer_status's `module_type` against peft (the oracle) for layers whose fastpeft repr carries a prefix that
peft's lacks (IA3: repr "ia3.Linear", peft "Linear"; trainable tokens), and the reprs themselves stay fastpeft's."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest

from _peft_testing import peft, tiny_llama

import fastpeft

CASES = {
    "ia3": ("IA3Config", dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "trainable_tokens": ("TrainableTokensConfig", dict(token_indices=[3, 4])),
    "lora+trainable_tokens": ("LoraConfig", dict(target_modules=["q_proj"], trainable_token_indices=[3, 4])),
    "lora": ("LoraConfig", dict(target_modules=["q_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_and_model_status_match_peft(case):
    name, kw = CASES[case]
    base = tiny_llama(tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kw))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), getattr(fastpeft, name)(**kw))
    lt = [dataclasses.asdict(s) for s in peft.get_layer_status(theirs)]
    lo = [dataclasses.asdict(s) for s in fastpeft.get_layer_status(ours)]
    assert lo == lt
    assert dataclasses.asdict(fastpeft.get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))


def test_reprs_keep_their_prefix():
    base = tiny_llama()
    ia3 = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.IA3Config(target_modules=["q_proj"],
                                                                           feedforward_modules=[]))
    layer = ia3.base_model.model.model.layers[0].self_attn.q_proj
    assert repr(layer).startswith("ia3.Linear(")
    assert fastpeft.get_layer_status(ia3)[0].module_type == "Linear"
