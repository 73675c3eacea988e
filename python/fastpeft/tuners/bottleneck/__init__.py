"""Bottleneck adapters: sequential (Houlsby) and parallel (He et al.); fastpeft's own method (peft_type
"BOTTLENECK", peft's file layout)."""
from .config import BottleneckConfig
from .layer import BottleneckLayer, ParallelAdapterLayer, SequentialAdapterLayer
from .model import TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING, BottleneckModel

__all__ = [
    "BottleneckConfig", "BottleneckModel", "BottleneckLayer", "SequentialAdapterLayer", "ParallelAdapterLayer",
    "TRANSFORMERS_MODELS_TO_BOTTLENECK_MODULES_MAPPING",
]
