"""Positional encodings, one file each, registered by name.

Every module in this package is imported on first use; a module registers its
encoding with ``@register("name")``. ``names()`` lists them, ``build(...)``
constructs one from the config. Adding an encoding = adding one file.
"""
import importlib
import pkgutil

from posenc.base import PositionalEncoding, register, registry

_loaded = False


def _import_all():
  global _loaded
  if _loaded:
    return
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{info.name}")
  _loaded = True


def names():
  """Sorted names of all registered encodings."""
  _import_all()
  return sorted(registry)


def get(name):
  """The encoding class registered as ``name`` (ValueError names the choices)."""
  _import_all()
  if name not in registry:
    raise ValueError(f"unknown positional encoding {name!r}; valid choices: {', '.join(names())}")
  return registry[name]


def build(posenc_config, model_config, *, rngs):
  """Constructs the encoding ``posenc_config.name`` with its own sub-config."""
  cls = get(posenc_config.name)
  own = posenc_config.get(posenc_config.name, cls.default_config())
  return cls(own, model_config, rngs=rngs)


def default_configs():
  """{name: default sub-config} for every registered encoding (embedded in configs)."""
  return {name: get(name).default_config() for name in names()}


__all__ = ["PositionalEncoding", "register", "names", "get", "build", "default_configs"]
