"""Repo root on sys.path for tests (pytest imports this first), and one persistent XLA
compilation cache per test session: the same tiny programs (every seed of a run, the
same small model in many tests) are compiled once and loaded afterwards.
``LENX_TEST_COMPILE_CACHE=0`` turns it off."""
import os
import shutil
import tempfile

from training import compile_cache

_DIR_ENV = "LENX_TEST_COMPILE_CACHE_DIR"  # set by the controller, inherited by xdist workers
_created = []


def pytest_configure(config):
  del config
  if os.environ.get("LENX_TEST_COMPILE_CACHE", "1") == "0":
    return
  if _DIR_ENV not in os.environ:
    os.environ[_DIR_ENV] = tempfile.mkdtemp(prefix="lenx_test_xla_cache_")
    _created.append(os.environ[_DIR_ENV])
  compile_cache.enable(os.environ[_DIR_ENV])


def pytest_unconfigure(config):
  del config
  for path in _created:  # only the process that made the directory removes it
    shutil.rmtree(path, ignore_errors=True)
