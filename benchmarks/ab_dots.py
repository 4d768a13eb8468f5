#!/usr/bin/env python3
"""Paired A/B of XLA:CPU's dot libraries for one lenx step: YNNPACK vs Eigen.

    python benchmarks/ab_dots.py --mode train --layers 4 --d-model 256 --heads 4 \
        --ffn 688 --seq-len 256 --batch 16 --dtype float32 --pairs 24   # throughput.py flags

Both executables are compiled in one process and run alternately, one step each, so the
box's drift (+-20 % between minutes on a shared machine) hits both alike; prints the
median and mean +- SE of the per-pair ratio Eigen / YNNPACK (what ``models.layers.cpu_dots``
decides from). Compiled here with explicit options, whatever ``LENX_CPU_DOTS`` says.
"""
import argparse
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

LIBRARIES = {"ynnpack": None, "eigen": EIGEN_DOTS}


def compiled_step(a, config, batch, options):
  """state -> state (train) or params -> params (eval), compiled with ``options``."""
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
  ns, rest = own.parse_known_args(argv)
  pairs, a = ns.pairs, parse_args(rest)  # the rest: throughput.py's flags
  config = lenx_config(a)
  batch = next(batches(a))
  steps = {name: list(compiled_step(a, config, batch, opts))
           for name, opts in LIBRARIES.items()}
  times = {name: [] for name in steps}
  for i in range(pairs + 1):  # the first pair is a warm-up
    for name, entry in steps.items():
      t0 = time.perf_counter()
      entry[1] = entry[0](entry[1])
      if i:
        times[name].append(time.perf_counter() - t0)
  ratio = np.array(times["eigen"]) / np.array(times["ynnpack"])
  print(f"cpu {cpu_description()}  mode {a.mode}  dtype {a.dtype}  pairs {pairs}")
  for name, t in times.items():
    print(f"{name:8s} median step {np.median(t) * 1e3:8.1f} ms  min {np.min(t) * 1e3:8.1f} ms")
  print(f"eigen / ynnpack per pair: median {np.median(ratio):.3f}, mean {ratio.mean():.3f} "
        f"+- {ratio.std(ddof=1) / np.sqrt(len(ratio)):.3f} (SE)")


if __name__ == "__main__":
  main()
