"""`IA3Config`: peft's (IA)^3 config, field for field, with its defaults and its feedforward check."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config


@register_config(PeftType.IA3)
@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (`IA3Model`): every targeted layer gets a learned vector `ia3_l` that
    scales its output features, or, for a feedforward layer, its input features.

    Args:
        target_modules: list of exact names or `.`-suffixes, a full-match regex, or "all-linear"; None: the
            defaults for the model type.
        exclude_modules: modules not to adapt (list or regex).
        feedforward_modules: the targeted modules whose input (not output) is scaled: a list (a module is
            feedforward when its name ends with one of them, peft's rule) or a full-match regex; None: the
            defaults for the model type. A list must be a subset of a list `target_modules`.
        fan_in_fan_out: whether the target's weight is stored [in, out] (transformers' Conv1D); set per layer
            from the layer type, with a warning when it disagrees.
        modules_to_save: modules trained fully and saved with the adapter.
        init_ia3_weights: True: the vectors start at ones (the adapter is the identity); False: N(0, 1).
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    feedforward_modules: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_ia3_weights: bool = field(default=True)

    def __post_init__(self):
        self._post_init_tuner(PeftType.IA3)

    def _validate(self) -> None:
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            missing = self.feedforward_modules - self.target_modules
            if missing:
                raise ValueError(
                    "`feedforward_modules` should be a subset of `target_modules`: "
                    f"{sorted(missing)} are not in target_modules {sorted(self.target_modules)}"
                )
