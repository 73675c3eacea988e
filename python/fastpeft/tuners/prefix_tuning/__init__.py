"""Prefix tuning: trained key/value prefixes for every attention layer (peft's PREFIX_TUNING)."""
from .config import PrefixTuningConfig
from .model import PrefixEncoder

__all__ = ["PrefixTuningConfig", "PrefixEncoder"]
