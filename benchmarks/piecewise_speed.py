"""Evaluation speed of the piecewise context-extension methods (Self-Extend, DCA, ReRoPE,
STRING, LM-Infinite, StreamingLLM: extensions/piecewise.py) with the fused CPU kernel
(models/cpu_attention.py, ``piecewise_attention``) vs XLA's blockwise path: one forward of
a long window (the model's features with attention statistics, as eval_extrapolate.py
runs it), each path in its own jit.

  python benchmarks/piecewise_speed.py --run=pretrained:smollm2-135m --length=16384 \
      --variants=self_extend,dual_chunk,rerope,lm_infinite --dtype=auto

Prints the CPU, then per variant: seconds per window of each path (one call, compiled
first), their ratio, and the root-mean-square difference of the
features between the paths relative to their root mean square (bf16: both paths round,
differently; a few of SmolLM2's outlier features then differ by their own size at random
tokens, with "none" as much as with any method, so the largest difference says little).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from evaluation.runner import one_variant
from models.layers import cpu_description
from training import checkpoint
from training.allocator import reexec_with_huge_pages

PATHS = ("kernel", "xla")


def window_seconds(model, tokens, path):
  """(seconds of one forward, compile excluded; features) with LENX_CPU_ATTENTION=path
  (read when the function is traced)."""
  os.environ["LENX_CPU_ATTENTION"] = path
  graphdef, state = nnx.split(model)
  positions = jnp.arange(tokens.shape[1])[None]
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s).features(t, positions, with_stats=1)[0])
  program = fwd.lower(state, tokens).compile()
  start = time.perf_counter()
  out = program(state, tokens).block_until_ready()
  return time.perf_counter() - start, out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--run", required=True, help="run dir or pretrained checkpoint")
  p.add_argument("--length", type=int, default=16384, help="tokens per window")
  p.add_argument("--variants", default="none,self_extend,dual_chunk,rerope,lm_infinite",
                 help="comma list of piecewise variants (eval_extrapolate.py's syntax; "
                 "separate parameters with ';' here, e.g. self_extend:group=4;window=1024)")
  p.add_argument("--dtype", default="auto", help="matmul dtype: auto | float32 | bfloat16")
  p.add_argument("--paths", default="kernel,xla", help="comma list of kernel, xla")
  args = p.parse_args(argv)
  paths = args.paths.split(",")
  if set(paths) - set(PATHS):
    raise ValueError(f"unknown --paths {args.paths!r}; valid: {', '.join(PATHS)}")
  config, model = checkpoint.load_run(args.run)
  print(f"cpu {cpu_description()}", flush=True)
  vocab = model.embedding.shape[0]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (1, args.length)), jnp.int32)
  for spec in args.variants.split(","):
    spec = spec.replace(";", ",")
    _, extended = one_variant(config, model, spec, args.length, args.dtype)
    seconds, outs = {}, {}
    for path in paths:
      seconds[path], outs[path] = window_seconds(extended, tokens, path)
      print(f"{args.run} {spec} length {args.length}: {path} {seconds[path]:.2f} s "
            f"({args.length / seconds[path]:.0f} tokens/s)", flush=True)
    if len(paths) == 2:
      a, b = (outs[q].astype(jnp.float32) for q in paths)
      diff = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      print(f"{args.run} {spec} length {args.length}: {paths[1]} / {paths[0]} time "
            f"{seconds[paths[1]] / seconds[paths[0]]:.2f}x, |diff| / |{paths[1]}| {diff:.1e} "
            "(features, root mean square)", flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
