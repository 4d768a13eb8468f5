"""Generation speed: tokens/s with the KV cache (models/generate.py) vs without (a full
forward over the whole sequence for every new token), at a given context length.

  python benchmarks/generate_speed.py --run=runs/rope --context=1024 --new=32
  python benchmarks/generate_speed.py --run=pretrained:smollm2-135m --context=1024,4096 \
      --dtype=auto --modes=cached,prefill
  python benchmarks/generate_speed.py --run=pretrained:smollm2-135m --context=4096 \
      --dtype=auto --modes=cached --variant=dynamic:factor=2
Modes: cached / uncached (new tokens/s), prefill (prompt tokens/s of the prompt's pass into
an empty cache, the needle's and every long prompt's cost). Prints one line per mode and
context, with the CPU; compile time excluded (first step timed
separately). The prompt runs in the model's matmul dtype, cached steps in float32
(models/generate.py).
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
from models.generate import CachedDecoder
from models.layers import cpu_description
from training import checkpoint
from training.allocator import reexec_with_huge_pages


def prefill_tps(model, tokens, new):
  """Prompt tokens/s of the prefill; the second of two (the first compiles)."""
  del new
  for _ in range(2):
    dec = CachedDecoder(model, 1, tokens.shape[1] + 1)
    start = time.perf_counter()
    dec.feed(tokens, last_only=True).block_until_ready()
  return tokens.shape[1] / (time.perf_counter() - start)


def cached_tps(model, tokens, new):
  dec = CachedDecoder(model, 1, tokens.shape[1] + new)
  logits = dec.feed(tokens)[:, -1]
  nxt = jnp.argmax(logits, -1)[:, None]
  dec.feed(nxt).block_until_ready()  # compiles the step
  start = time.perf_counter()
  for _ in range(new - 1):
    nxt = jnp.argmax(dec.feed(nxt)[:, -1], -1)[:, None]
  nxt.block_until_ready()
  return (new - 1) / (time.perf_counter() - start)


def uncached_tps(model, tokens, new):
  """Full forward of a fixed-size buffer per token (one compile; causal, so padding after
  the current token does not change its logits)."""
  graphdef, state = nnx.split(model)
  total = tokens.shape[1] + new
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.arange(total)[None]))
  buf = jnp.zeros((1, total), jnp.int32).at[:, :tokens.shape[1]].set(tokens)
  fwd(state, buf).block_until_ready()
  start = time.perf_counter()
  for t in range(tokens.shape[1], total):
    buf = buf.at[:, t].set(jnp.argmax(fwd(state, buf)[:, t - 1], -1))
  buf.block_until_ready()
  return new / (time.perf_counter() - start)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--run", required=True, help="run dir or pretrained checkpoint")
  p.add_argument("--context", default="1024", help="comma list of prompt lengths")
  p.add_argument("--new", type=int, default=16)
  p.add_argument("--dtype", default="", help="matmul dtype override: auto | float32 | bfloat16")
  p.add_argument("--modes", default="cached,uncached")
  p.add_argument("--variant", default="", help="a context-extension variant as in "
                 "eval_extrapolate.py, e.g. dynamic:factor=2 (set up for the longest context "
                 "plus the new tokens)")
  args = p.parse_args(argv)
  contexts = [int(c) for c in args.context.split(",")]
  config, model = checkpoint.load_run(args.run)
  if args.variant or args.dtype:
    _, model = one_variant(config, model, args.variant or "none", max(contexts) + args.new,
                           args.dtype)
  print(f"cpu {cpu_description()}", flush=True)
  vocab = model.embedding.shape[0]
  modes = {"cached": cached_tps, "uncached": uncached_tps, "prefill": prefill_tps}
  for context in contexts:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (1, context)), jnp.int32)
    for name in args.modes.split(","):
      print(f"{args.run} context {context}: {name} {modes[name](model, tokens, args.new):.2f} "
            "tokens/s", flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
