"""STRING (An et al. 2025, "Why Does the Effective Context Length of LLMs Fall Short?",
arXiv 2410.18745, sec. 4; reference HKUNLP/STRING ``string_for_llama.py``).

Shifted rotary position indices: distances >= S (the rarely trained largest ones) are
dropped and overwritten by well-trained smaller ones,

  P[i, j] = i - j              if i - j < S
  P[i, j] = i - j - S + W      otherwise     (the query rotated at i - S + W)

with the shift S = shift (default train_len // 3, the reference's 0.33 L) and the local
value W = local (default min(128, S // 4): the reference's 128 for 128k models, scaled
down for short ones; W < S). Training-free and useful inside the training length; its
largest distance is L - 1 - S + W, so beyond about N + S it too leaves the trained range.
The reference runs the two parts as flash attentions with window [S, 0] and a causal
shifted block, which both include the pair at distance exactly S; here every pair is in
exactly one part, as in the paper's equation.
"""
from extensions import register
from extensions.piecewise import PiecewiseRoPE, positive_int, same


@register("string")
class String(PiecewiseRoPE):
  keys = ("shift", "local")

  def resolve(self, params, config, eval_len):
    shift = positive_int(params, "shift", config.train_len // 3, minimum=2)
    local = positive_int(params, "local", max(1, min(128, shift // 4)))
    if local >= shift:
      raise ValueError(f"string local={local} must be < shift={shift}")
    return {"shift": shift, "local": local}

  def parts(self, p):
    return [(same, same), (lambda q: q - p["shift"] + p["local"], same)]

  def select(self, p, q_pos, k_pos):
    return (q_pos - k_pos >= p["shift"]).astype("int32")  # 0 original, 1 shifted

  def kernel_form(self, p):
    return 1, 0, p["shift"] + 1
