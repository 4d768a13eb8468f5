#!/usr/bin/env python3
"""Paired A/B of two variants of one lenx step (dot library, attention path, block size).

    python benchmarks/ab_steps.py --mode train --layers 4 --d-model 256 --heads 4 \
        --ffn 688 --seq-len 256 --batch 16 --dtype float32 --pairs 24 \
        --a dots=ynnpack --b dots=eigen                      # XLA:CPU's dot libraries
    python benchmarks/ab_steps.py ... --a attention=full --b attention=blockwise,block_size=64

A variant is comma-separated key=value: ``dots`` (ynnpack | eigen: XLA:CPU's dot library,
``models.layers.cpu_dots``), ``kernel`` (kernel | xla: ``LENX_CPU_ATTENTION`` while the
variant is traced, ``models.cpu_attention``), ``xla:<option>`` (any XLA compiler option,
e.g. ``xla:xla_cpu_enable_fast_math=true``) and any ``config.model`` field (attention,
block_size, remat, ...). Both executables are compiled in one process and run alternately, one step each,
so the box's drift (+-20 % between minutes on a shared machine) hits both alike; prints
the median and mean +- SE of the per-pair ratio b / a. Dots are compiled with explicit
options, whatever ``LENX_CPU_DOTS`` says.
"""
import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["LENX_CPU_DOTS"] = "ynnpack"  # the steps' own jit adds no option; we choose below

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.throughput import batches, lenx_config, parse_args  # noqa: E402
from models import build_model  # noqa: E402
from models.layers import EIGEN_DOTS, cpu_description  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.steps import make_eval_step, make_train_step, split_model  # noqa: E402
from training.allocator import reexec_with_huge_pages  # noqa: E402

DOT_OPTIONS = {"ynnpack": None, "eigen": EIGEN_DOTS}


def _parse_like(current, text):
  """text as the type of the field's current value ('False' is False for a bool field)."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool; use true or false")
    return text.lower() in ("true", "1")
  return text if current is None else type(current)(text)


def parse_variant(spec, base):
  """'dots=eigen,block_size=64' -> (compiler options, model config, environment); unknown
  keys fail."""
  config, options, env = base.copy_and_resolve_references(), DOT_OPTIONS["ynnpack"], {}
  extra = {}
  for item in filter(None, spec.split(",")):
    key, _, value = item.partition("=")
    if key.startswith("xla:"):  # XLA parses bool options from Python bools only
      extra[key[4:]] = {"true": True, "false": False}.get(value.lower(), value)
    elif key == "kernel":
      env["LENX_CPU_ATTENTION"] = value
    elif key == "dots":
      if value not in DOT_OPTIONS:
        raise ValueError(f"dots={value!r}; valid choices: {', '.join(DOT_OPTIONS)}")
      options = DOT_OPTIONS[value]
    elif key in config.model:
      config.model[key] = _parse_like(config.model[key], value)
    else:
      raise ValueError(f"unknown variant key {key!r}; valid: dots, kernel, xla:<option>, "
                       f"{', '.join(config.model)}")
  return ({**(options or {}), **extra} or None), config, env


@contextlib.contextmanager
def _environment(env):
  """os.environ updated with env inside the block, restored after it."""
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key)
      else:
        os.environ[key] = value


def compiled_step(a, config, batch, options):
  """(step, state): step maps state -> state (train) or params -> params (eval)."""
  graphdef, params = split_model(build_model(config))
  if a.mode == "eval":
    run = make_eval_step(graphdef).lower(params, batch).compile(compiler_options=options)
    return lambda p: (jax.block_until_ready(run(p, batch)), p)[1], params
  tx = make_optimizer(config.optim, config.num_train_steps)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  run = make_train_step(graphdef, tx, config.seed).lower(state, batch).compile(
      compiler_options=options)

  def step(s):
    s, metrics = run(s, batch)
    jax.block_until_ready(metrics)
    return s
  return step, state


def main(argv=None):
  own = argparse.ArgumentParser(add_help=False)
  own.add_argument("--pairs", type=int, default=24, help="timed step pairs")
  own.add_argument("--a", default="dots=ynnpack", help="variant A (default dots=ynnpack)")
  own.add_argument("--b", default="dots=eigen", help="variant B (default dots=eigen)")
  ns, rest = own.parse_known_args(argv)
  a = parse_args(rest)  # the rest: throughput.py's flags
  base, batch = lenx_config(a), next(batches(a))
  steps = {}
  for label, spec in (("a", ns.a), ("b", ns.b)):
    options, config, env = parse_variant(spec, base)
    with _environment(env):  # read while the step is traced
      steps[label] = list(compiled_step(a, config, batch, options))
  times = {label: [] for label in steps}
  for i in range(ns.pairs + 1):  # the first pair is a warm-up
    for label, entry in steps.items():
      t0 = time.perf_counter()
      entry[1] = entry[0](entry[1])
      if i:
        times[label].append(time.perf_counter() - t0)
  ratio = np.array(times["b"]) / np.array(times["a"])
  print(f"cpu {cpu_description()}  mode {a.mode}  dtype {a.dtype}  pairs {ns.pairs}")
  for label, spec in (("a", ns.a), ("b", ns.b)):
    t = times[label]
    print(f"{label} [{spec}] median step {np.median(t) * 1e3:8.1f} ms  min {np.min(t) * 1e3:8.1f} ms")
  print(f"b / a per pair: median {np.median(ratio):.3f}, mean {ratio.mean():.3f} "
        f"+- {ratio.std(ddof=1) / np.sqrt(len(ratio)):.3f} (SE)")


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
