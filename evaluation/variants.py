"""Extension variants: how a trained model is stretched at evaluation time.

A variant is a name plus parameters, written ``name:key=value,key=value``:

  none                      the run as trained
  linear|ntk|dynamic|yarn|llama3|longrope
                            RoPE frequency scaling; params are Hugging Face
                            ``rope_scaling`` keys (``factor=auto`` = eval_len / train_len,
                            original_max_position_embeddings defaults to train_len)
  rerope[:window=W]         ReRoPE (Su 2023), W defaults to train_len // 2
  logn[:base_len=N]         log-n query scaling (any encoding), N defaults to train_len

A variant owns all its effects: ``apply_variant`` returns the run's config changed
so that ``models.build_model`` builds the extended model; parameters never change
shape, so the run's checkpoint loads unchanged. Dynamic variants (``dynamic``,
``longrope``) use the frequencies of the evaluated length for the whole window,
as Hugging Face does for a full-sequence forward pass; incremental decoding with a
cache would instead change frequencies as the sequence grows (and HF's cache then
mixes keys rotated with different bases).
"""
import dataclasses
import json

import ml_collections

import posenc

ROPE_SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
VARIANT_NAMES = ("none", *ROPE_SCALINGS, "rerope", "logn")
# Defaults a model card would give but a lenx user should not have to type.
_SCALING_DEFAULTS = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}


class NotApplicable(Exception):
  """The variant does not apply to this run's encoding (skip it with this reason)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  params: tuple = ()  # ((key, value), ...) in the order given (lists stored as tuples)

  @property
  def label(self):
    if not self.params:
      return self.name
    show = lambda v: json.dumps(list(v)).replace(" ", "") if isinstance(v, tuple) else v
    return self.name + ":" + ",".join(f"{k}={show(v)}" for k, v in self.params)

  def param_dict(self):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}


def _parse_value(text):
  if text == "auto":
    return text
  try:
    value = json.loads(text)  # numbers, true/false, [lists]
    return tuple(value) if isinstance(value, list) else value
  except json.JSONDecodeError:
    return text


def _split_top_level(spec):
  """Splits on commas outside [...] so list values (longrope factors) survive."""
  tokens, depth, current = [], 0, ""
  for ch in spec:
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      tokens.append(current)
      current = ""
    else:
      current += ch
  return [t.strip() for t in tokens + [current] if t.strip()]


def parse_variants(spec):
  """'none,yarn:factor=8,beta_fast=16' -> [Variant('none'), Variant('yarn', ...)].

  List values are JSON: 'longrope:short_factor=[1,1],long_factor=[2,4]'.
  """
  variants = []
  for token in _split_top_level(spec):
    if "=" in token and ":" not in token:
      if not variants:
        raise ValueError(f"variant parameter {token!r} comes before any variant name")
      key, value = token.split("=", 1)
      last = variants.pop()
      variants.append(Variant(last.name, last.params + ((key, _parse_value(value)),)))
      continue
    name, _, first = token.partition(":")
    if name not in VARIANT_NAMES:
      raise ValueError(f"unknown variant {name!r}; valid choices: {', '.join(VARIANT_NAMES)}")
    params = ()
    if first:
      key, sep, value = first.partition("=")
      if not sep:
        raise ValueError(f"variant parameter {first!r} is not key=value")
      params = ((key, _parse_value(value)),)
    variants.append(Variant(name, params))
  return variants


def _rope_config(config, variant):
  if not posenc.get(config.posenc.name).uses_rope:
    raise NotApplicable(f"{variant.name} needs a RoPE encoding; run uses {config.posenc.name!r}")
  return config.posenc[config.posenc.name]


def _scaling(variant, rope, train_len, eval_len):
  d = {"rope_type": variant.name, **_SCALING_DEFAULTS.get(variant.name, {}),
       **variant.param_dict()}
  if d.get("factor", "auto") == "auto" and variant.name != "longrope":
    d["factor"] = max(1.0, eval_len / train_len)
  if variant.name in ("yarn", "llama3", "longrope"):
    d.setdefault("original_max_position_embeddings", rope.original_len or train_len)
  return d


def apply_variant(run_config, variant, eval_len):
  """The run's config changed to build ``variant`` at ``eval_len`` (raises NotApplicable)."""
  config = ml_collections.ConfigDict(run_config.to_dict())
  params, train_len = variant.param_dict(), config.train_len
  if variant.name == "none":
    return config
  if variant.name == "logn":
    config.model.logn_base_len = int(params.get("base_len", train_len))
    return config
  rope = _rope_config(config, variant)
  if variant.name == "rerope":
    rope.rerope_window = int(params.get("window", train_len // 2))
    return config
  rope.scaling_json = json.dumps(_scaling(variant, rope, train_len, eval_len))
  rope.eval_len = int(eval_len)
  rope.original_len = rope.original_len or train_len
  return config
