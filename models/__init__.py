"""The decoder language model shared by every positional encoding."""
from models.transformer import DecoderLM, build_model

__all__ = ["DecoderLM", "build_model"]
