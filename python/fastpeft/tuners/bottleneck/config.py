"""`BottleneckConfig`: bottleneck adapters, sequential (Houlsby et al.) or parallel (He et al.).

fastpeft's own method (peft has none): peft_type "BOTTLENECK", peft's file layout
(`adapter_config.json` + `adapter_model.safetensors`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config

PLACEMENTS = ("sequential", "parallel")
LOCATIONS = ("attention", "feedforward")
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leaky_relu")


@register_config(PeftType.BOTTLENECK)
@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (`BottleneckModel`).

    Each adapter is a small MLP `a(x) = up(act(down(LN?(x))))` with `down: d -> r`, `up: r -> d`:

    - placement="sequential" (Houlsby et al., https://arxiv.org/abs/1902.00751): after the output projection of
      a sublayer, `y = h + s * a(h)` where `h` is the projection's output (Llama: `self_attn.o_proj`,
      `mlp.down_proj`; GPT-2: `attn.c_proj`, `mlp.c_proj`; BERT: `attention.output.dense`, `output.dense`).
    - placement="parallel" (He et al., https://arxiv.org/abs/2110.04366): beside the sublayer,
      `y = f(x) + s * a(x)` where `x` is the sublayer's input (Llama: `self_attn`, `mlp`; GPT-2: `attn`, `mlp`;
      BERT: `attention.output`, `output`, see `BottleneckModel` for how BERT's blocks are read).

    Args:
        placement: "sequential" or "parallel".
        locations: where adapters go: "attention", "feedforward", "both", or a list of the first two.
        attention_modules / feedforward_modules: the modules to wrap at each location: a list of exact names or
            `.`-suffixes, or a full-match regex. For "sequential" name each sublayer's output projection, for
            "parallel" the sublayer itself. None: the defaults for the model type (llama, mistral, qwen2,
            qwen3, gemma, gemma2, gpt2, bert, roberta, ...), filled in when the adapter is created.
        exclude_modules: modules never wrapped (list or full-match regex).
        reduction_factor: bottleneck width = (module width) // reduction_factor (used when `r` is None).
        r: explicit bottleneck width (takes precedence over `reduction_factor`).
        non_linearity: one of relu, gelu, gelu_new (tanh approximation), silu / swish, tanh, sigmoid, leaky_relu.
        scaling: the factor `s` (a finite float; He et al. use 4.0 for parallel adapters), or "learned": a
            trained scalar per adapter and module, starting at 1.0.
        use_layer_norm: a trained LayerNorm on the adapter's input (before the down-projection).
        dropout: dropout probability on the bottleneck activations (after the non-linearity).
        init_weights: True / "near-identity": down-projection as nn.Linear's default, up-projection (weight and
            bias) zero, so a fresh adapter leaves the model's outputs unchanged. False: both random (tests).
        modules_to_save: modules trained fully and saved with the adapter.

    Bottleneck adapters are not mergeable: the non-linearity sits between the two projections.
    """

    placement: str = field(default="sequential")
    locations: Union[list[str], str] = field(default_factory=lambda: ["attention", "feedforward"])
    attention_modules: Optional[Union[list[str], str]] = field(default=None)
    feedforward_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    reduction_factor: float = field(default=16)
    r: Optional[int] = field(default=None)
    non_linearity: str = field(default="relu")
    scaling: Union[float, str] = field(default=1.0)
    use_layer_norm: bool = field(default=False)
    dropout: float = field(default=0.0)
    init_weights: Union[bool, str] = field(default=True)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        PeftConfig.__post_init__(self)  # field types, task_type, version
        self.peft_type = PeftType.BOTTLENECK
        self._validate()

    # ---- checks (each message names the field and says what to change) ----

    def _validate(self) -> None:
        name = type(self).__name__
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"{name}.placement must be 'sequential' (Houlsby: after each sublayer's output projection) or "
                f"'parallel' (He et al.: beside each sublayer), got {self.placement!r}"
            )
        self.locations = _normalise_locations(self.locations, name)
        for attr in ("attention_modules", "feedforward_modules", "exclude_modules"):
            setattr(self, attr, _normalise_modules(getattr(self, attr), f"{name}.{attr}"))
        rf = self.reduction_factor
        if not math.isfinite(rf) or rf <= 0:
            raise ValueError(f"{name}.reduction_factor must be a positive number (e.g. 16), got {rf!r}")
        if self.r is not None and self.r <= 0:
            raise ValueError(f"{name}.r must be a positive integer (the bottleneck width) or None, got {self.r!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"{name}.non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        if isinstance(self.scaling, str):
            if self.scaling != "learned":
                raise ValueError(f"{name}.scaling must be a float or 'learned', got {self.scaling!r}")
        elif not math.isfinite(self.scaling):
            raise ValueError(f"{name}.scaling must be a finite float or 'learned', got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.init_weights, str) and self.init_weights != "near-identity":
            raise ValueError(
                f"{name}.init_weights must be True / 'near-identity' (up-projection zero: the adapter starts as "
                f"the identity) or False (random), got {self.init_weights!r}"
            )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or any(not isinstance(m, str) or not m
                                                            for m in self.modules_to_save):
                raise ValueError(f"{name}.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    def modules_for(self, location: str) -> Optional[Union[list[str], str]]:
        """The names / regex of the modules wrapped at `location` ("attention" or "feedforward")."""
        return self.attention_modules if location == "attention" else self.feedforward_modules


def _normalise_locations(value, owner: str) -> list[str]:
    if isinstance(value, str):
        value = list(LOCATIONS) if value == "both" else [value]
    value = list(value)
    bad = [v for v in value if v not in LOCATIONS]
    if bad or not value:
        raise ValueError(
            f"{owner}.locations must be 'attention', 'feedforward', 'both' or a non-empty list of the first two, "
            f"got {value!r}"
        )
    return [loc for loc in LOCATIONS if loc in value]  # canonical order, no duplicates


def _normalise_modules(value, owner: str):
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{owner} is an empty string; give module names, a regex, or None for the defaults")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{owner} {value!r} is not a valid regular expression: {exc}") from None
        return value
    value = list(value)
    if not value:
        raise ValueError(f"{owner} is an empty list; give module names, a regex, or None for the defaults")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{owner} must hold non-empty module names, got {bad!r}")
    return list(dict.fromkeys(value))
