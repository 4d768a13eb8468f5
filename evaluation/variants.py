"""Extension variants for the evaluation harness: the registry lives in ``extensions/``
(one file per method); this module keeps the harness's import path.

  none, logn, linear|ntk|dynamic|yarn|llama3|longrope|ntk_by_parts, resonance, p_rope,
  rerope, self_extend, dual_chunk, string, lm_infinite, streaming_llm; ``a+b`` composes.
"""
from extensions import NotApplicable, Variant, apply_variant, names, parse_variants

__all__ = ["NotApplicable", "Variant", "apply_variant", "names", "parse_variants"]
