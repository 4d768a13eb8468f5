"""Lambda-shaped masks: a few initial "sink" tokens plus the most recent window.

Both bound the attended distance: perplexity stays flat at any length, but nothing
outside the sinks and the window can be retrieved. Both declare ``masks``: blockwise
attention skips every tile outside the sinks and the window, so a long evaluation costs
O(L x window), as the methods intend, not O(L^2).

LM-Infinite (Han et al. 2024, "LM-Infinite: Zero-Shot Extreme Length Generalization for
Large Language Models", arXiv 2308.16137, sec. 4): a query attends the first
``n_global`` tokens and the last ``n_local`` (key distance < n_local), and every
distance is capped at ``limit`` (d = min(i - j, limit)), so sinks far away are seen at
distance ``limit``. Defaults: n_global 10, n_local = limit = train_len (the paper's
L_pretrain). Reference: Glaciohound/LM-Infinite ``models/lambda_attention.py``.

StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
Sinks", arXiv 2309.17453, sec. 3.2; reference mit-han-lab/streaming-llm
``streaming_llm/kv_cache.py`` and ``examples/eval_long_ppl.py``): the KV cache holds
``sinks`` initial tokens and ``recent`` previous tokens, and positions are counted
*inside the cache*: the query sits at cache position min(i, sinks + recent), a recent
key keeps its distance i - j, a sink j is at cache position j. Defaults: sinks 4 (the
reference's start_size) and recent = train_len - sinks - 1, so cache + current token =
train_len and no distance exceeds the trained ones.
"""
import jax.numpy as jnp

from extensions import register
from extensions.piecewise import PiecewiseRoPE, const, positive_int, same

NOT_ATTENDED = -1


@register("lm_infinite")
class LMInfinite(PiecewiseRoPE):
  masks = True
  keys = ("n_global", "n_local", "limit")

  def resolve(self, params, config, eval_len):
    return {"n_global": positive_int(params, "n_global", 10, minimum=0),
            "n_local": positive_int(params, "n_local", config.train_len),
            "limit": positive_int(params, "limit", config.train_len)}

  def parts(self, p):
    return [(same, same), (const(p["limit"]), const(0))]  # capped: R(limit) q . R(0) k

  def select(self, p, q_pos, k_pos):
    rel = q_pos - k_pos
    part = (rel >= p["limit"]).astype(jnp.int32)
    attended = (rel < p["n_local"]) | (k_pos < p["n_global"])  # the Lambda
    return jnp.where(attended, part, NOT_ATTENDED)

  def kernel_form(self, p):
    return 1, p["n_global"], max(p["n_local"], p["limit"]) + 1


@register("streaming_llm")
class StreamingLLM(PiecewiseRoPE):
  masks = True
  keys = ("sinks", "recent")

  def resolve(self, params, config, eval_len):
    sinks = positive_int(params, "sinks", 4, minimum=0)
    recent = positive_int(params, "recent", max(1, config.train_len - sinks - 1))
    return {"sinks": sinks, "recent": recent}

  def parts(self, p):
    top = p["sinks"] + p["recent"]  # the query's cache position once the cache is full
    return [(same, same), (lambda q: jnp.minimum(q, top), same)]

  def select(self, p, q_pos, k_pos):
    rel = q_pos - k_pos
    part = jnp.where(rel <= p["recent"], 0, 1)  # 0: in the recent window, 1: a sink
    return jnp.where((rel <= p["recent"]) | (k_pos < p["sinks"]), part, NOT_ATTENDED)

  def kernel_form(self, p):
    return 1, p["sinks"], p["recent"] + 2
