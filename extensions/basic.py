"""The run as trained (``none``) and log-n query scaling (``logn``, any encoding)."""
from extensions import Extension, register


@register("none")
class NoChange(Extension):
  needs_rope = False

  def configure(self, config, params, eval_len):
    del config, params, eval_len


@register("logn")
class LogN(Extension):
  """Log-n scaling (Chiang & Cholak 2022; Su 2023): queries times max(1, log(pos+1) /
  log(base_len)), base_len defaults to train_len (``models.attention.logn_query_scale``)."""

  keys = ("base_len",)
  needs_rope = False

  def resolve(self, params, config, eval_len):
    return {"base_len": int(params.get("base_len", config.train_len))}

  def configure(self, config, params, eval_len):
    config.model.logn_base_len = params["base_len"]
