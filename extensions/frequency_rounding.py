"""Frequency-level training options that compose with any scaling (``resonance+yarn``).

Resonance RoPE (Wang et al. 2024, "Resonance RoPE: Improving Context Length
Generalization of Large Language Models", arXiv 2403.00071, eq. 4; reference
sheryc/resonance_rope ``src/models/components/positional_embedding/rotary_resonance.py``,
``ResonanceRotaryEmbedding`` / ``ResonanceYaRNScaledRotaryEmbedding``): every wavelength
rounded to an integer, theta_i' = 2 pi / round(2 pi / theta_i), after any scaling (as the
reference's Resonance-YaRN), so each feature repeats exactly at integer positions.

p-RoPE (Barbero et al. 2025, "Round and Round We Go! What makes Rotary Positional
Encodings useful?", ICLR 2025, sec. 6): only the highest fraction p of the frequencies
rotate; the lowest (1 - p) are set to 0, i.e. left as identity (semantic channels), unlike
partial rotary which passes a block of *dimensions* through. Meant for training
(``--config.posenc.rope.p_fraction=0.75``); as a variant it is zero-shot. The math is
``posenc.rope_scaling.adjust_frequencies``.
"""
from extensions import Extension, register


@register("resonance")
class Resonance(Extension):
  def configure(self, config, params, eval_len):
    config.posenc[config.posenc.name].resonance = True


@register("p_rope")
class PRoPE(Extension):
  keys = ("p",)

  def resolve(self, params, config, eval_len):
    p = params.get("p", 0.75)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
      raise ValueError(f"p_rope p={p!r} must be a number in [0, 1]")
    return {"p": float(p)}

  def configure(self, config, params, eval_len):
    config.posenc[config.posenc.name].p_fraction = params["p"]
