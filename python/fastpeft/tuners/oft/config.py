"""`OFTConfig`: peft's OFT config, field for field, with its defaults (and a few more checks)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig, PeftType, register_config


@register_config(PeftType.OFT)
@dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter (`OFTModel`): the layer's input (Embedding: its output) is multiplied
    by a block-diagonal orthogonal matrix blockdiag(R_1, ..., R_r), each R_i [b, b] the Cayley transform of a
    skew-symmetric matrix stored as its strict upper triangle (`oft_R.weight` [r, b (b - 1) / 2]).

    Args:
        r: number of blocks per layer. Exactly one of `r` and `oft_block_size` is non-zero (r x oft_block_size
            = the layer's input features); the other is inferred per layer. A value that does not divide the
            layer's input features is adjusted to the nearest one that does, with a warning (as peft).
        oft_block_size: size b of the blocks (default 32, with r=0).
        module_dropout: in training, replace int(p * r) randomly chosen blocks by the identity (nothing with
            block_share). peft 0.21.2 builds this dropout but never applies it; fastpeft applies it.
        target_modules: list of exact names or `.`-suffixes, a full-match regex, or "all-linear"; None: the
            defaults for the model type.
        fan_in_fan_out: whether the target's weight is stored [in, out] (transformers' Conv1D); set per layer
            from the layer type, with a warning when it disagrees.
        bias: "none", "all" or "oft_only": which biases are trained (and saved).
        exclude_modules: modules not to adapt (list or regex).
        init_weights: True: the rotations start as the identity (oft_R zero); False: oft_R ~ N(0, 0.1^2).
        layers_to_transform / layers_pattern: restrict to these layer indices (of the ModuleList `layers_pattern`).
        modules_to_save: modules trained fully and saved with the adapter.
        coft: constrained OFT: before each use, the skew matrix of every block whose Frobenius norm exceeds
            eps / sqrt(number of blocks) is scaled down to that norm (in place, as peft).
        eps: COFT's radius (only with coft).
        block_share: one block shared by all r slices (oft_R.weight [1, b (b - 1) / 2]).
        use_cayley_neumann: True: R = peft's truncated Neumann series of the Cayley transform
            (`num_cayley_neumann_terms` terms; approximately orthogonal); False: the exact (I - S)(I + S)^-1.
        num_cayley_neumann_terms: number of series terms (0 and 1 give the identity, as in peft).
    """

    r: int = field(default=0, metadata={"help": "OFT rank, number of OFT blocks per injected layer."})
    oft_block_size: int = field(default=32, metadata={"help": "OFT block size across different layers."})
    module_dropout: float = field(
        default=0.0, metadata={"help": "OFT multiplicative dropout: randomly set blocks to the identity in training."}
    )
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "oft_only"] = field(default="none")
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: bool = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    coft: bool = field(default=False, metadata={"help": "Whether to use the constrained variant of OFT."})
    eps: float = field(default=6e-5, metadata={"help": "The control strength of COFT."})
    block_share: bool = field(default=False, metadata={"help": "Whether to share the OFT parameters between blocks."})
    use_cayley_neumann: bool = field(default=True, metadata={"help": "Cayley-Neumann (approximate) parametrisation."})
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Number of Cayley-Neumann terms."})

    def __post_init__(self):
        self._post_init_tuner(PeftType.OFT)

    def _validate(self) -> None:
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # peft accepts this config (and ignores layers_to_transform), so it must load here too
            warnings.warn(
                "OFTConfig.layers_to_transform is ignored when target_modules is a str (a regex); pass "
                "target_modules as a list or encode the layers in the regex"
            )
        if self.r < 0 or self.oft_block_size < 0:
            raise ValueError(
                f"OFTConfig: r and oft_block_size must be >= 0, got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and oft_block_size = "
                f"{self.oft_block_size}. Set one of them, e.g. oft_block_size=32."
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise ValueError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
                "simultaneously, because r x oft_block_size == in_features. Set the other one to 0, e.g. "
                f"OFTConfig(r={self.r}, oft_block_size=0). (An adapter_config.json without `oft_block_size` was "
                "written by peft < 0.14, whose OFT weights are incompatible with this version: retrain the adapter.)"
            )
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"OFTConfig.module_dropout must be in [0, 1], got {self.module_dropout}")
        if self.num_cayley_neumann_terms < 0:
            raise ValueError(
                f"OFTConfig.num_cayley_neumann_terms must be >= 0 (5 by default), got {self.num_cayley_neumann_terms}"
            )
        if self.use_cayley_neumann and self.num_cayley_neumann_terms <= 1:
            warnings.warn(
                f"OFTConfig: use_cayley_neumann with num_cayley_neumann_terms={self.num_cayley_neumann_terms} makes "
                "every rotation the identity (as in peft); use 2 or more terms (default 5)"
            )
        if self.coft and not self.eps > 0:
            raise ValueError(f"OFTConfig.eps must be positive when coft=True (default 6e-5), got {self.eps}")
        self._warn_old_neumann_checkpoint()

    def _warn_old_neumann_checkpoint(self) -> None:
        """peft 0.18 changed the Cayley-Neumann series; a config written by an older peft says so (peft warns
        the same way when it loads one)."""
        if not self.use_cayley_neumann or not self.peft_version:
            return
        try:
            from packaging.version import InvalidVersion, Version
        except ImportError:
            return
        try:
            old = Version(self.peft_version.partition("@")[0]) < Version("0.18.0")
        except InvalidVersion:
            return
        if old:
            warnings.warn(
                "The cayley-neumann parameterization has been slightly changed to be more numerically stable in "
                "PEFT 0.18.0. Please retrain your adapter weights with newer PEFT versions. Alternatively, "
                "downgrade PEFT to version 0.17.0 to use the old parameterization."
            )
