#!/usr/bin/env python3
"""Two sources of the fused CPU attention kernel (models/kernels/causal_attention.cc), timed
alternately on the same random problem: the A/B for a change to the kernel itself.

    git show HEAD~1:models/kernels/causal_attention.cc > /tmp/before.cc
    python benchmarks/kernel_sources.py --a=/tmp/before.cc --length=8192 --rounds=2

--b defaults to the source in the tree. Each source runs in its own process (a source is
built once, into the kernel cache under its own hash, and one process loads one build), in
the order a, b, a, b, ... so that the machine's drift hits both alike. Parts: the bf16
forward (evaluation and prefill), the float32 forward with attention statistics, the
float32 forward + backward (training). Prints the CPU, per part and source the fastest of
--repeats calls in each round, the ratio a / b of the medians over rounds, and the largest
difference between the two sources' outputs relative to the largest |value|.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PARTS = ("bf16", "f32_stats", "f32_grad")


def _problem(length, heads, dim):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, heads, dim)), jnp.float32) for _ in range(3))
  return q * (3.0 / dim ** 0.5), k, v  # pre-scaled queries, a peaked softmax


def _parts(length):
  """{part: jitted function of (q, k, v)} for every part."""
  import jax
  import jax.numpy as jnp
  from models import cpu_attention
  pos = jnp.arange(length)[None]
  bf16 = lambda t: t.astype(jnp.bfloat16)  # noqa: E731
  return {
      "bf16": jax.jit(lambda q, k, v: cpu_attention.causal_attention(bf16(q), bf16(k), bf16(v))),
      "f32_stats": jax.jit(lambda q, k, v: cpu_attention.attention_with_stats(
          q, k, v, pos, pos, None, 1)),
      "f32_grad": jax.jit(jax.grad(lambda q, k, v: (cpu_attention.causal_attention(q, k, v) ** 2)
                                   .sum(), argnums=(0, 1, 2))),
  }


def worker(source, args, out_path):
  """Times args.parts with the kernel built from `source`; saves the outputs to out_path and
  prints one JSON line {part: seconds}."""
  import jax
  import numpy as np
  from models import cpu_attention
  os.environ["LENX_CPU_ATTENTION"] = "kernel"
  cpu_attention.SOURCE = os.path.abspath(source)
  q, k, v = _problem(args.length, args.heads, args.dim)
  seconds, outputs = {}, {}
  for part, fn in _parts(args.length).items():
    if part not in args.parts:
      continue
    result = jax.block_until_ready(fn(q, k, v))  # compile and build first
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      result = jax.block_until_ready(fn(q, k, v))
      times.append(time.perf_counter() - start)
    seconds[part] = min(times)
    for i, leaf in enumerate(jax.tree.leaves(result)):
      outputs[f"{part}_{i}"] = np.asarray(leaf, np.float32)
  np.savez(out_path, **outputs)
  print(json.dumps(seconds), flush=True)


def _run_worker(source, args, out_path):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", source, "--out", out_path,
         "--length", str(args.length), "--heads", str(args.heads), "--dim", str(args.dim),
         "--repeats", str(args.repeats), "--parts", ",".join(args.parts)]
  done = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def max_relative_difference(a_path, b_path):
  """{output name: max |a - b| / max |b|} over the outputs both sources saved."""
  import numpy as np
  a, b = np.load(a_path), np.load(b_path)
  return {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30)) for k in b}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--a", help="kernel source A (e.g. the one before a change)")
  p.add_argument("--b", default=os.path.join(ROOT, "models", "kernels", "causal_attention.cc"),
                 help="kernel source B (default: the tree's)")
  p.add_argument("--length", type=int, default=8192, help="sequence length (a multiple of 8)")
  p.add_argument("--heads", type=int, default=9, help="heads (SmolLM2-135M: 9)")
  p.add_argument("--dim", type=int, default=64, help="head dim (a multiple of 8)")
  p.add_argument("--repeats", type=int, default=3, help="calls per part per process")
  p.add_argument("--rounds", type=int, default=2, help="a, b pairs of processes")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.parts = args.parts.split(",")
  unknown = set(args.parts) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown --parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
  if args.worker:
    return worker(args.worker, args, args.out)
  if not args.a:
    p.error("--a is required")
  for source in (args.a, args.b):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"kernel source {source!r} does not exist")
  from models.layers import cpu_description
  print(f"cpu {json.dumps(cpu_description())}", flush=True)
  times = {"a": [], "b": []}
  with tempfile.TemporaryDirectory() as tmp:
    outs = {name: os.path.join(tmp, f"{name}.npz") for name in times}
    for r in range(args.rounds):
      for name in ("a", "b"):
        times[name].append(_run_worker(getattr(args, name), args, outs[name]))
        print(f"round {r + 1} {name}: " + " ".join(
            f"{part} {s:.3f} s" for part, s in times[name][-1].items()), flush=True)
    diffs = max_relative_difference(outs["a"], outs["b"])
  for part in args.parts:
    med = {n: statistics.median(t[part] for t in times[n]) for n in times}
    diff = max(v for k, v in diffs.items() if k.startswith(part + "_"))
    print(f"{part}: a {med['a']:.3f} s, b {med['b']:.3f} s, a / b {med['a'] / med['b']:.2f}x, "
          f"max |a - b| / max |b| {diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
