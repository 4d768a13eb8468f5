"""Positional encodings, one file each, registered by name.

Every module in this package is imported on first use; a module registers its
encoding with ``@register("name")``. ``names()`` lists them, ``build(...)``
constructs one from the config. Adding an encoding = adding one file.
"""
from posenc.base import PositionalEncoding, register, registry
from posenc.registries import PackageRegistry


_registry = PackageRegistry("posenc", registry, "positional encoding")
names = _registry.names  # sorted names of all registered encodings
get = _registry.get  # the encoding class registered as a name (ValueError names the choices)


def build(posenc_config, model_config, *, rngs):
  """Constructs the encoding ``posenc_config.name`` with its own sub-config."""
  cls = get(posenc_config.name)
  own = posenc_config.get(posenc_config.name, cls.default_config())
  return cls(own, model_config, rngs=rngs)


def default_configs():
  """{name: default sub-config} for every registered encoding (embedded in configs)."""
  return {name: get(name).default_config() for name in names()}


__all__ = ["PositionalEncoding", "register", "names", "get", "build", "default_configs"]
