"""Registries by name (big_vision style), shared by the encodings (``posenc``) and the
context-extension methods (``extensions``): every module of the package registers its
classes when imported; the package is imported whole on first lookup, so adding one = adding
one file."""
import importlib
import pkgutil


class PackageRegistry:
  """names() / get(name) over ``entries`` ({name: class}), filled by the modules of
  ``package`` as they are imported."""

  def __init__(self, package, entries, what):
    self.package, self.entries, self.what = package, entries, what
    self._loaded = False

  def _import_all(self):
    if self._loaded:
      return
    path = importlib.import_module(self.package).__path__
    for info in pkgutil.iter_modules(path):
      importlib.import_module(f"{self.package}.{info.name}")
    self._loaded = True

  def names(self):
    """Sorted registered names."""
    self._import_all()
    return sorted(self.entries)

  def get(self, name):
    """The class registered as ``name`` (ValueError naming the valid choices)."""
    self._import_all()
    if name not in self.entries:
      raise ValueError(f"unknown {self.what} {name!r}; valid choices: {', '.join(self.names())}")
    return self.entries[name]
