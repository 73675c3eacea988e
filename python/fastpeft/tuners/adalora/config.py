"""`AdaLoraConfig`: peft's AdaLoRA config (a `LoraConfig` with the rank-allocation schedule), field for field."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from ...config import PeftType, register_config
from ..lora.config import _INIT_SUBCONFIGS, _UNSUPPORTED_SUBCONFIGS, LoraConfig, _as_dict


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_config(PeftType.ADALORA)
@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (`AdaLoraModel`); the fields, defaults and JSON keys are peft's.

    AdaLoRA trains each targeted weight's update in SVD form `B diag(E) A` with `init_r` triplets and prunes
    the least important triplets during training, down to an average of `target_r` per layer. Training has
    three phases, decided by the step passed to `update_and_allocate`: steps `<= tinit` warm up with the full
    budget; until `total_step - tfinal` the budget falls on a cubic schedule (triplets are masked every
    `deltaT` steps); after that the final budget is fixed and the pruned triplets stay masked.

    Args:
        init_r: initial number of triplets per layer.
        target_r: target average number of triplets per layer (`<= init_r`).
        tinit, tfinal: steps of the initial warm-up and of the final fine-tuning phase.
        deltaT: steps between two budget allocations in the reduction phase.
        beta1, beta2: EMA factors (in (0, 1)) of the sensitivity and of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser added to the loss (>= 0).
        total_step: number of training steps (required; `> tinit + tfinal`).
        rank_pattern: written by the rank allocator: module name -> list of kept (True) / pruned triplets.
            Saved in `adapter_config.json`; loading resizes the layers to the kept triplets.

    Of the LoRA fields, `r` is unused (use `init_r`), and DoRA / LoftQ are not supported (as in peft).
    """

    target_r: int = field(default=8, metadata={"help": "Target Lora matrix dimension."})
    init_r: int = field(default=12, metadata={"help": "Initial Lora matrix dimension."})
    tinit: int = field(default=0, metadata={"help": "The steps of initial warmup."})
    tfinal: int = field(default=0, metadata={"help": "The steps of final warmup."})
    deltaT: int = field(default=1, metadata={"help": "Step interval of rank allocation."})
    beta1: float = field(default=0.85, metadata={"help": "Hyperparameter of EMA."})
    beta2: float = field(default=0.85, metadata={"help": "Hyperparameter of EMA."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "The orthogonal regularization coefficient."})
    total_step: Optional[int] = field(default=None, metadata={"help": "The total training steps."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "The saved rank pattern."})

    def __post_init__(self):
        self.loftq_config = _as_dict(self.loftq_config)
        for name in _UNSUPPORTED_SUBCONFIGS + _INIT_SUBCONFIGS:  # AdaLoRA runs none of them; kept as dicts
            setattr(self, name, _as_dict(getattr(self, name)))
        rank_pattern_was_none = self.rank_pattern is None
        self._post_init_tuner(PeftType.ADALORA)
        if rank_pattern_was_none:  # peft's default (and JSON) is null, not {}
            self.rank_pattern = None

    def _validate(self) -> None:
        name = "AdaLoraConfig"
        if self.use_dora:
            raise ValueError(f"{name}: AdaLoRA does not support DoRA; set use_dora=False")
        if self.loftq_config:
            raise ValueError(f"{name}: AdaLoRA does not support LoftQ; drop loftq_config")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"{name}.layers_to_transform cannot be used when target_modules is a str (a regex); pass "
                "target_modules as a list or encode the layers in the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"{name}.layers_pattern is set but layers_to_transform is not; set layers_to_transform to the layer "
                "indices to adapt, or drop layers_pattern"
            )
        if self.r != 8:  # LoraConfig's default
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored."
                "If you intended to set the initial rank, use `init_r` instead."
            )
        if not _is_int(self.init_r) or self.init_r <= 0:
            raise ValueError(f"{name}.init_r must be a positive integer (the initial rank per layer), got {self.init_r!r}")
        if not _is_int(self.target_r) or self.target_r < 0:
            raise ValueError(f"{name}.target_r must be a non-negative integer, got {self.target_r!r}")
        if self.target_r > self.init_r:
            msg = (f"{name}.target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only prunes "
                   f"ranks; lower target_r or raise init_r to at least {self.target_r}")
            if not self.inference_mode:
                raise ValueError(msg)
            warnings.warn(msg + " (accepted for a frozen adapter: nothing is pruned)")
        if self.total_step is None or not _is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(
                f"{name}.total_step must be set to the number of training steps (an integer > 0), got "
                f"{self.total_step!r}: AdaLoRA does not work when `total_step` is None, supply a value > 0."
            )
        for attr in ("tinit", "tfinal"):
            value = getattr(self, attr)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name}.{attr} must be a non-negative integer (a number of steps), got {value!r}")
        if not _is_int(self.deltaT) or self.deltaT < 1:
            raise ValueError(f"{name}.deltaT must be a positive integer (steps between allocations), got {self.deltaT!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"{name}: the schedule leaves no budgeting phase (tinit={self.tinit}, tfinal={self.tfinal}, "
                f"total_step={self.total_step}; need tinit + tfinal < total_step). Decrease `tfinal`/`tinit` or "
                f"increase `total_step` to more than {self.tinit + self.tfinal}."
            )
        for attr in ("beta1", "beta2"):
            value = getattr(self, attr)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}.{attr} must lie strictly between 0 and 1 (an EMA factor), got {value!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(
                f"{name}.orth_reg_weight should be greater than or equal to 0, but the value passed is "
                f"{self.orth_reg_weight}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.rank_pattern:
            for key, mask in self.rank_pattern.items():
                if not isinstance(key, str) or not isinstance(mask, (list, tuple)) or not all(
                    isinstance(v, (bool, int)) for v in mask
                ):
                    raise ValueError(
                        f"{name}.rank_pattern must map module names to lists of booleans (kept triplets), as "
                        f"the rank allocator writes it; got {key!r}: {mask!r}"
                    )
        if self.alpha_pattern:
            warnings.warn(f"{name}.alpha_pattern is not used by AdaLoRA (as in peft) and is ignored")
