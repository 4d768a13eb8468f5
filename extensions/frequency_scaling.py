"""RoPE frequency scaling as Hugging Face ``rope_scaling`` dicts: PI (linear), NTK, dynamic
NTK, YaRN, Llama 3, LongRoPE, and NTK-by-parts. The math (with the paper equations) lives
in ``posenc/rope_scaling.py``; a variant only builds the dict: params are HF keys,
``factor=auto`` = eval_len / train_len, original_max_position_embeddings defaults to the
run's pre-training length. Dynamic variants (``dynamic``, ``longrope``) use the
frequencies of the evaluated length for the whole window, as Hugging Face does for a
full-sequence forward pass (an incremental decode would change them as it grows).
"""
import json

from extensions import Extension, register
from posenc.rope_scaling import _COMMON, _SPEC

# Defaults a model card would give but a lenx user should not have to type.
_DEFAULTS = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}
_WITH_ORIGINAL = ("yarn", "llama3", "longrope")  # read original_max_position_embeddings


@register("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
class RopeScaling(Extension):
  """One Hugging Face rope_type (the variant's name)."""

  rope_type = None  # None: the variant's name
  exclusive = "frequency scaling (rope_type)"

  def __init__(self, name):
    super().__init__(name)
    self.rope_type = self.rope_type or name
    required, optional = _SPEC[self.rope_type]
    self.keys = tuple(k for k in (*required, *optional, *_COMMON)
                      if k not in self.fixed_keys())

  def fixed_keys(self):
    return {}

  def resolve(self, params, config, eval_len):
    rope = config.posenc[config.posenc.name]
    d = {"rope_type": self.rope_type, **_DEFAULTS.get(self.rope_type, {}), **params,
         **self.fixed_keys()}
    if d.get("factor", "auto") == "auto" and self.rope_type != "longrope":
      d["factor"] = max(1.0, eval_len / config.train_len)
    if self.rope_type in _WITH_ORIGINAL:
      d.setdefault("original_max_position_embeddings", rope.original_len or config.train_len)
    return d

  def configure(self, config, params, eval_len):
    rope = config.posenc[config.posenc.name]
    rope.original_len = rope.original_len or config.train_len
    rope.scaling_json = json.dumps(params)
    rope.eval_len = int(eval_len)


@register("ntk_by_parts")
class NtkByParts(RopeScaling):
  """NTK-by-parts (bloc97 2023; Peng et al. 2023, YaRN arXiv 2309.00071 sec. 3.2, eq. 17-18):
  YaRN's per-dimension ramp between interpolation (wavelength > L / beta_slow) and
  extrapolation (wavelength < L / beta_fast) *without* YaRN's attention temperature
  (sec. 3.4), i.e. rope_type yarn with attention_factor = 1. Reference: jquesnelle/yarn
  ``scaled_rope/LlamaPartNTKScaledRotaryEmbedding.py``."""

  rope_type = "yarn"

  def fixed_keys(self):
    return {"attention_factor": 1.0}
