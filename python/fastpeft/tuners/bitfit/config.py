"""`BitFitConfig`: which biases BitFit trains (fastpeft's own method; peft's adapter_config.json layout)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config


@register_config(PeftType.BITFIT)
@dataclass
class BitFitConfig(PeftConfig):
    """Configuration of BitFit (`BitFitModel`, https://arxiv.org/abs/2106.10199): every parameter of the model is
    frozen except the selected biases, which are trained in place. No layer is wrapped.

    Args:
        target_modules: whose biases are trained. None or "all": every module that has a bias; a list of exact
            names or `.`-suffixes (as the other tuners); "all-linear": every Linear / Conv1D but the output layer;
            any other string: a full-match regex over module names.
        exclude_modules: modules whose biases are not trained (list or full-match regex).
        add_missing_biases: give a selected nn.Linear / nn.ConvNd that has no bias a zero bias (so the outputs do
            not change at first) and train it. Other layer types without a bias are never given one.
        modules_to_save: modules trained fully and saved with the adapter.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    add_missing_biases: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        self._post_init_tuner(PeftType.BITFIT)

    def _validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, set):
                if not value:
                    what = "all biases" if name == "target_modules" else "no exclusions"
                    raise ValueError(f"BitFitConfig.{name} is an empty list; use None for {what}")
                bad = [v for v in value if not isinstance(v, str) or not v]
                if bad:
                    raise ValueError(f"BitFitConfig.{name} must hold non-empty module names, got {bad!r}")
            elif isinstance(value, str):
                if not value:
                    raise ValueError(f"BitFitConfig.{name} is an empty string; use None")
                if name == "target_modules" and value.lower() in ("all", "all-linear"):
                    continue
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(
                        f"BitFitConfig.{name} {value!r} is not a valid regular expression: {exc}"
                    ) from None
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, (list, tuple, set))
            or any(not isinstance(m, str) or not m for m in self.modules_to_save)
        ):
            raise ValueError(
                f"BitFitConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
