"""ReRoPE (Su 2023, kexue.fm/archives/9708; reference bojone/rerope ``rerope_patch.py``).

Relative positions are capped at ``window`` (default train_len // 2): pairs with
q_pos - k_pos < window get ordinary RoPE logits R(q_pos) q . R(k_pos) k; farther pairs
all get the logit of relative position ``window``, R(window) q . R(0) k. A training-free
extension that never shows the model a distance it did not train on.
"""
from extensions import register
from extensions.piecewise import PiecewiseRoPE, const, positive_int, same


@register("rerope")
class ReRoPE(PiecewiseRoPE):
  keys = ("window",)

  def resolve(self, params, config, eval_len):
    return {"window": positive_int(params, "window", config.train_len // 2)}

  def parts(self, p):
    return [(same, same), (const(p["window"]), const(0))]

  def select(self, p, q_pos, k_pos):
    return (q_pos - k_pos >= p["window"]).astype("int32")  # 0 near, 1 capped

  def kernel_form(self, p):
    return 1, 0, p["window"] + 1
