"""X-LoRA: a mixture of LoRA experts weighted per token and layer by a classifier (peft's `peft.tuners.xlora`
names and checkpoint format); the experts are mixed by the `multi_lora_mix` op."""
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import XLoraConv2dLayer, XLoraEmbeddingLayer, XLoraLayer, XLoraLinearLayer
from .model import XLoraModel

__all__ = [
    "XLoraConfig", "XLoraModel", "XLoraClassifier", "XLoraLayer", "XLoraLinearLayer", "XLoraEmbeddingLayer",
    "XLoraConv2dLayer",
]
