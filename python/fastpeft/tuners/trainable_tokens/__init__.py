"""Trainable Tokens: train the embedding rows of selected tokens only (peft's TRAINABLE_TOKENS), standalone
(`TrainableTokensConfig`) or next to LoRA (`LoraConfig(trainable_token_indices=...)`)."""
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer
from .model import TrainableTokensModel
from .wrapper import TrainableTokensWrapper

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel", "TrainableTokensWrapper"]
