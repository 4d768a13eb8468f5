"""training/compile_cache.py: every program is cached (JAX's default skips those compiled
in under a second, most of a demo run's), and worker processes inherit the settings."""
import os
import subprocess
import sys

import jax

from training import compile_cache

_TINY = "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()"
_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes")


def _cached_after_tiny_program(tmp_path, env):
  cache = tmp_path / "cache"
  subprocess.run([sys.executable, "-c", _TINY], check=True, env={**os.environ, **env},
                 cwd=os.path.dirname(os.path.dirname(__file__)))
  return len(os.listdir(cache)) if cache.exists() else 0


def test_child_processes_cache_every_program(tmp_path):
  saved = {k: getattr(jax.config, k) for k in _KEYS}
  try:
    compile_cache.enable(str(tmp_path / "cache"))
    env = compile_cache.child_env()
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
  default = _cached_after_tiny_program(tmp_path, {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")})
  assert default == 0  # JAX alone: a sub-second compile is not written
  assert _cached_after_tiny_program(tmp_path, env) >= 1


def test_empty_path_leaves_the_cache_as_it_was():
  before = jax.config.jax_compilation_cache_dir
  compile_cache.enable("")
  assert jax.config.jax_compilation_cache_dir == before
