"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without
Tuning", arXiv 2401.01325, sec. 3.2-3.3; reference datamllab/LongLM
``self_extend_patch/Llama.py``, ``self_extend_forward``).

Two logit sets merged under one softmax per query: inside the neighbour window
(q - k < w_n) normal RoPE; beyond it grouped attention, with positions floor-divided by
the group size G and the query shifted so the two regions join at w_n:

  grouped q position = q // G + w_n - w_n // G,   grouped k position = k // G

(the reference's non-flash path shifts by w_n - w_n / G, a float, when G does not divide
w_n; the paper and the flash path use the integer form used here). The largest grouped
distance is (L - 1) // G + w_n - w_n // G, so a model trained at N reaches about
(N - w_n) * G + w_n tokens. Parameters ``group`` (G) and ``window`` (w_n, default
train_len // 4); ``group=auto`` (default) is the smallest G keeping every grouped
distance of the evaluated length below train_len.
"""
from extensions import register
from extensions.piecewise import PiecewiseRoPE, positive_int, same


def reach_group(eval_len, train_len, window):
  """Smallest G with (eval_len - 1) // G + window - window // G <= train_len - 1."""
  if window >= train_len:
    raise ValueError(f"self_extend window={window} must be < train_len={train_len}")
  group = 1
  while (eval_len - 1) // group + window - window // group > train_len - 1:
    group += 1
  return group


@register("self_extend")
class SelfExtend(PiecewiseRoPE):
  keys = ("group", "window")

  def resolve(self, params, config, eval_len):
    window = positive_int(params, "window", config.train_len // 4)
    group = params.get("group", "auto")
    group = (reach_group(eval_len, config.train_len, window) if group == "auto"
             else positive_int(params, "group", 1))
    return {"group": group, "window": window}

  def parts(self, p):
    g, w = p["group"], p["window"]
    return [(same, same), (lambda q: q // g + w - w // g, lambda k: k // g)]

  def select(self, p, q_pos, k_pos):
    return (q_pos - k_pos >= p["window"]).astype("int32")  # 0 neighbour, 1 grouped

  def kernel_form(self, p):
    return 1, 0, p["window"] + 1
