"""`fastpeft.utils.hotswap`: peft's import path for the hot-swapping API (defined in `fastpeft.hotswap`)."""
from ..hotswap import (  # noqa: F401
    CONFIG_KEYS_TO_CHECK,
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

__all__ = [
    "prepare_model_for_compiled_hotswap", "hotswap_adapter_from_state_dict", "hotswap_adapter",
    "check_hotswap_configs_compatible",
]
