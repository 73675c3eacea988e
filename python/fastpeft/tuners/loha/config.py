"""`LoHaConfig`: peft's LoHa config, field for field, with its defaults (and a few more checks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftType, register_config
from ..lycoris import LycorisConfig


@register_config(PeftType.LOHA)
@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (`LoHaModel`): ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b).

    Args:
        r: rank of each of the two low-rank factors.
        alpha: scaling = alpha / r.
        rank_dropout: in training, drop each output row of ΔW with this probability (the mask is rescaled by
            1 / its mean).
        module_dropout: in training, skip the whole adapter with this probability.
        use_effective_conv2d: for Conv1d / Conv2d with a kernel larger than 1, use the CP (Tucker)
            decomposition of FedPara's Proposition 3 (`hada_t1`, `hada_t2`) instead of flattening the kernel.
        target_modules: list of exact names or `.`-suffixes, a full-match regex, or "all-linear".
        exclude_modules: modules not to adapt (list or regex).
        init_weights: True: w2_b is zero (the adapter starts as a no-op); False: all factors random.
        layers_to_transform / layers_pattern: restrict to these layer indices (of the ModuleList `layers_pattern`).
        rank_pattern / alpha_pattern: module-name regex -> r / alpha for the matching modules.
        modules_to_save: modules trained fully and saved with the adapter.
    """

    r: int = field(default=8, metadata={"help": "LoHa rank"})
    alpha: Union[int, float] = field(default=8, metadata={"help": "LoHa alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout probability in training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout probability in training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP decomposition for conv kernels > 1"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: bool = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    _PEFT_TYPE = PeftType.LOHA
