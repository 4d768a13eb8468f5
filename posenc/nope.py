"""NoPE: no positional information (Kazemnejad et al. 2023, "The Impact of
Positional Encoding on Length Generalization in Transformers").

A causal decoder can still infer positions from the causal mask; every hook of
the base class is the identity, so this file only registers the name.
"""
from posenc.base import PositionalEncoding, register


@register("nope")
class NoPE(PositionalEncoding):
  """No positional encoding."""
