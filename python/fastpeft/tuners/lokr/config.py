"""`LoKrConfig`: peft's LoKr config, field for field, with its defaults (and a few more checks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftType, register_config
from ..lycoris import LycorisConfig


@register_config(PeftType.LOKR)
@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (`LoKrModel`): ΔW = (alpha / r) W1 ⊗ W2.

    Each weight dimension is factorised in two (`factorization(dim, decompose_factor)`); W1 [out_l, in_m] is
    a full matrix (`lokr_w1`) unless `decompose_both` and r < max(out_l, in_m) / 2 (then `lokr_w1_a` @
    `lokr_w1_b`); W2 [out_k, in_n(, kernel)] is full (`lokr_w2`) when r >= max(out_k, in_n) / 2, else
    `lokr_w2_a` @ `lokr_w2_b` (or, for conv kernels > 1 with use_effective_conv2d, the Tucker form with `lokr_t2`).

    Args:
        r, alpha: rank of the decomposed factors; scaling = alpha / r (also when both factors are full, as peft).
        rank_dropout: in training, drop each output row of ΔW with this probability.
        rank_dropout_scale: rescale the rank-dropout mask by 1 / its mean.
        module_dropout: in training, skip the whole adapter with this probability.
        use_effective_conv2d: CP decomposition of W2 for conv kernels > 1.
        decompose_both: also decompose W1 into two low-rank factors.
        decompose_factor: the factorisation's target factor (-1: near the square root).
        init_weights: True: W1 (or w1_a) zero; "lycoris": W2 (or w2_b) zero, as the LyCORIS repository;
            False: all random.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern,
        modules_to_save: as in `LoHaConfig`.
    """

    r: int = field(default=8, metadata={"help": "LoKr rank"})
    alpha: Union[int, float] = field(default=8, metadata={"help": "LoKr alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout probability in training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout probability in training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP decomposition for conv kernels > 1"})
    decompose_both: bool = field(default=False, metadata={"help": "Decompose the left Kronecker factor too"})
    decompose_factor: int = field(default=-1, metadata={"help": "Kronecker product decomposition factor"})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rank dropout scale"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: Union[bool, Literal["lycoris"]] = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    _PEFT_TYPE = PeftType.LOKR

    def _validate(self) -> None:
        super()._validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"LoKrConfig.decompose_factor must be -1 (factorise near the square root) or a positive integer, "
                f"got {self.decompose_factor}"
            )
