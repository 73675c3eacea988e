"""`BOFTConfig`: peft's BOFT config, field for field, with its defaults (and checks that say what to change)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config

BOFT_BIAS_MODES = ("none", "all", "boft_only")


@register_config(PeftType.BOFT)
@dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter (`BOFTModel`): orthogonal butterfly fine-tuning.

    A layer's input (nn.Linear / transformers Conv1D) or its flattened filters (nn.Conv2d) are rotated by the
    orthogonal matrix ``B = M_(m-1) ... M_0`` (m = boft_n_butterfly_factor), each ``M_i`` a block-diagonal matrix
    of Cayley-transformed blocks between butterfly permutations; the output is scaled per feature by `boft_s`.

    Args:
        boft_block_size: size b of the orthogonal blocks. Set exactly one of boft_block_size / boft_block_num
            (the other 0): b x boft_block_num == the layer's input dimension.
        boft_block_num: number of blocks per butterfly factor (the other way to fix b).
        boft_n_butterfly_factor: number m of butterfly factors (1: plain block-diagonal OFT). Each factor i
            mixes groups of b * 2^i features; m > 1 needs even block size and block number and an input
            dimension divisible by b * 2^(m-1).
        target_modules: list of exact names or `.`-suffixes, a full-match regex, or "all-linear".
        exclude_modules: modules not to adapt (list or regex).
        boft_dropout: multiplicative dropout in training: in one randomly chosen factor, int(p * blocks) random
            blocks are replaced by the identity.
        fan_in_fan_out: the targeted layers store their weight as [in, out] (transformers' Conv1D, GPT-2).
        bias: "none", "all" or "boft_only": which biases are trained too.
        modules_to_save: modules trained fully and saved with the adapter.
        init_weights: True: the adapter starts as the identity (R = 0, s = 1); False: random (R ~ N(0, 0.1),
            s ~ N(1, 0.1)).
        layers_to_transform / layers_pattern: restrict to these layer indices (of the ModuleList `layers_pattern`).
    """

    boft_block_size: int = field(default=4, metadata={"help": "BOFT block size (set this or boft_block_num)"})
    boft_block_num: int = field(default=0, metadata={"help": "Number of BOFT blocks (set this or boft_block_size)"})
    boft_n_butterfly_factor: int = field(default=1, metadata={"help": "Number of butterfly factors"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    boft_dropout: float = field(default=0.0, metadata={"help": "BOFT multiplicative dropout probability"})
    fan_in_fan_out: bool = field(default=False)
    bias: str = field(default="none", metadata={"help": "Bias type for BOFT: 'none', 'all' or 'boft_only'"})
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self):
        self._post_init_tuner(PeftType.BOFT)

    def _validate(self) -> None:
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.boft_block_size < 0 or self.boft_block_num < 0:
            raise ValueError(
                f"BOFTConfig: boft_block_size ({self.boft_block_size}) and boft_block_num ({self.boft_block_num}) "
                "must not be negative; set one of them to a positive value and the other to 0"
            )
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError(
                f"Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = "
                f"{self.boft_block_size} and boft_block_num = {self.boft_block_num}."
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ValueError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num "
                "== in_features. Set the other one to 0."
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"BOFTConfig.boft_n_butterfly_factor must be a positive integer (1 = no butterfly), got "
                f"{self.boft_n_butterfly_factor}"
            )
        if not 0.0 <= self.boft_dropout <= 1.0:
            raise ValueError(f"BOFTConfig.boft_dropout must be in [0, 1], got {self.boft_dropout}")
        if self.bias not in BOFT_BIAS_MODES:
            modes = ", ".join(map(repr, BOFT_BIAS_MODES))
            raise ValueError(f"BOFTConfig.bias must be one of {modes}, got {self.bias!r}")
