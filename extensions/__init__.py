"""Context-extension methods ("variants"): how a trained model is stretched at evaluation
time (or fine-tuned), one file each, registered by name like the encodings in ``posenc/``.

A variant is written ``name:key=value,key=value``; ``a+b:...`` composes methods (e.g.
``resonance+yarn:factor=8``), each parameter going to the one method that takes it.
``factor=auto`` (the default where a method has a factor) is eval_len / train_len.
``python -c "import extensions; print(extensions.names())"`` lists them.

A method (``Extension`` subclass) owns its parameters, their defaults, whether it
applies to a run (``needs_rope``) and the config change that builds the extended model
(``configure``); ``apply_variant`` returns the run's config so changed. Parameters never
change shape, so the run's checkpoint loads unchanged. Methods that change which
logits a (query, key) pair gets (two logit sets, shifted position ids, a mask other than
causal) subclass ``extensions.piecewise.PiecewiseRoPE``: the RoPE encoding evaluates them
per (query block, key block) in its ``scores`` hook, so they run blockwise like any
encoding. Adding a method = adding one file here.
"""
import dataclasses
import json
from typing import ClassVar

import ml_collections

import posenc
from posenc.registries import PackageRegistry

registry = {}


class NotApplicable(Exception):
  """The variant does not apply to this run's encoding (skip it with this reason)."""


def register(*names):
  """Class decorator: registers an extension under each of ``names`` (the instance knows
  the name it was built for, so one class can serve a family, e.g. the rope_types)."""

  def wrap(cls):
    for name in names:
      if name in registry:
        raise ValueError(f"extension {name!r} registered twice")
      registry[name] = cls
    return cls

  return wrap


class Extension:
  """Base class: a method with parameters ``keys`` and their ``defaults``."""

  keys: ClassVar[tuple] = ()  # parameter names this method accepts
  needs_rope: ClassVar[bool] = True  # skipped (NotApplicable) on non-RoPE runs
  exclusive: ClassVar[str] = ""  # a variant composes at most one method of each such kind

  def __init__(self, name):
    self.name = name

  def resolve(self, params, config, eval_len):
    """Full parameter dict (defaults and ``auto`` filled in) for a run at ``eval_len``;
    raises ValueError on a bad value. Default: the params as given."""
    del config, eval_len
    return dict(params)

  def configure(self, config, params, eval_len):
    """Changes ``config`` (a copy of the run's) in place to build the extended model."""
    raise NotImplementedError


_registry = PackageRegistry("extensions", registry, "variant")
names = _registry.names  # sorted names of all registered extensions


def get(name):
  """An instance of the extension registered as ``name`` (ValueError names the choices)."""
  return _registry.get(name)(name)


def rope_config(config, name):
  """The run's RoPE sub-config; NotApplicable if the run's encoding is not RoPE."""
  if not posenc.get(config.posenc.name).uses_rope:
    raise NotApplicable(f"{name} needs a RoPE encoding; run uses {config.posenc.name!r}")
  return config.posenc[config.posenc.name]


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # one extension name, or several joined by "+"
  params: tuple = ()  # ((key, value), ...) in the order given (lists stored as tuples)

  @property
  def label(self):
    if not self.params:
      return self.name
    show = lambda v: json.dumps(list(v)).replace(" ", "") if isinstance(v, tuple) else v
    return self.name + ":" + ",".join(f"{k}={show(v)}" for k, v in self.params)

  @property
  def parts(self):
    return self.name.split("+")

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

  List values are JSON: 'longrope:short_factor=[1,1],long_factor=[2,4]'; 'a+b' composes.
  Unknown names and parameters fail here, naming the valid choices.
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
    params = ()
    if first:
      key, sep, value = first.partition("=")
      if not sep:
        raise ValueError(f"variant parameter {first!r} is not key=value")
      params = ((key, _parse_value(value)),)
    variants.append(Variant(name, params))
  for v in variants:
    _split_params(v)  # validates names and parameter keys
  return variants


def _split_params(variant):
  """[(extension, its params)] for each part of ``variant``; every key to exactly one part."""
  exts = [get(n) for n in variant.parts]
  kinds = [e.exclusive for e in exts if e.exclusive]
  for kind in sorted(set(k for k in kinds if kinds.count(k) > 1)):
    raise ValueError(f"variant {variant.name!r} composes more than one {kind}; at most one "
                     f"of them per variant")
  if len(set(variant.parts)) != len(exts):
    raise ValueError(f"variant {variant.name!r} names a method twice")
  out = [(e, {}) for e in exts]
  for key, value in variant.param_dict().items():
    owners = [d for e, d in out if key in e.keys]
    if len(owners) != 1:
      valid = sorted({k for e in exts for k in e.keys})
      why = "is ambiguous" if owners else "is unknown"
      raise ValueError(f"parameter {key!r} of variant {variant.name!r} {why}; valid keys: "
                       f"{', '.join(valid) or '(none)'}")
    owners[0][key] = value
  return out


def apply_variant(run_config, variant, eval_len):
  """The run's config changed to build ``variant`` at ``eval_len`` (raises NotApplicable).

  The resolved parameters of every part (defaults and ``auto`` filled in) are recorded
  in ``config.variant_resolved`` ({name: params}) for the results rows.
  """
  config = ml_collections.ConfigDict(run_config.to_dict())
  resolved = {}
  for ext, params in _split_params(variant):
    if ext.needs_rope:
      rope_config(config, ext.name)
    resolved[ext.name] = ext.resolve(params, config, eval_len)
    ext.configure(config, resolved[ext.name], eval_len)
  config.variant_resolved = json.dumps(resolved)
  return config


__all__ = ["Extension", "NotApplicable", "Variant", "apply_variant", "get", "names",
           "parse_variants", "register", "rope_config"]
