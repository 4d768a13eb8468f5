#!/usr/bin/env python3
"""Where a lenx step spends its time: XLA:CPU op times from a ``jax.profiler`` trace.

    python benchmarks/profile_step.py --mode train --layers 4 --d-model 256 --heads 4 \
        --ffn 688 --seq-len 256 --batch 16            # same flags as throughput.py
    python benchmarks/profile_step.py ... --top 40

Traces ``--profile-steps`` steady steps, sums the duration of every XLA op event
(one event per HLO instruction run by the CPU runtime's thunks), and prints ms per
step by op, the share of each kind (dot = matmuls, fusion = fused elementwise /
reductions, copy / transpose = layout moves) and the sum against the wall time of a
step, each op with what it computes (from the optimized HLO, dumped to a temp dir).
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DUMP = tempfile.mkdtemp(prefix="lenx_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text").strip()

import jax  # noqa: E402

from benchmarks.throughput import batches, build_step, lenx_config, parse_args  # noqa: E402
from training.allocator import reexec_with_huge_pages  # noqa: E402


def op_kind(name, contents):
  """Coarse kind of an op from what it computes (its fused HLO opcodes)."""
  body = contents.get(name, name)
  if "dot" in body or "convolution" in body:
    return "matmul"
  if "copy" in body or "transpose" in body:
    return "layout copy / transpose"
  if "exponential" in body:
    return "softmax (exp)"
  for kind in ("conditional", "while", "scatter", "gather", "broadcast", "concatenate"):
    if kind in body:
      return kind
  return "other elementwise / reduce"


def collect(trace_dir):
  """{op name: total seconds} over every XLA op event of the trace in trace_dir."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        op = dict(ev.stats).get("hlo_op")
        if op:
          totals[op] += ev.duration_ns * 1e-9
  return totals


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)$")


def fusion_contents(dump_dir, module="jit_train_step"):
  """{instruction name: short description} from the optimized HLO in dump_dir: for a
  fusion, the opcodes it calls (dot with its shape); for others, opcode and shape."""
  paths = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*cpu_after_optimizations.txt")))
  if not paths:
    return {}
  comps, current, calls = {}, None, {}
  for line in open(paths[-1]):
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      current = comps.setdefault(head.group(1), [])
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    if opcode not in ("parameter", "bitcast", "constant", "get-tuple-element", "tuple"):
      current.append(f"{opcode}{shape if opcode in ('dot', 'copy', 'transpose') else ''}")
    callee = re.search(r"calls=%?([\w.\-]+)", rest)
    calls[name] = (opcode, shape, callee.group(1) if callee else None)
  out = {}
  for name, (opcode, shape, callee) in calls.items():
    body = comps.get(callee, []) if callee else []
    out[name] = f"{opcode} {shape} " + " ".join(dict.fromkeys(body))[:160]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--profile-steps", type=int, default=3)
  p.add_argument("--top", type=int, default=30)
  own, rest = p.parse_known_args(argv)
  a = parse_args(rest)
  run, _ = build_step(a, lenx_config(a))
  data = batches(a)
  for _ in range(2 + a.warmup_steps):
    run(next(data))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      for _ in range(own.profile_steps):
        run(next(data))
    wall = (time.perf_counter() - t0) / own.profile_steps
    totals = collect(d)
  per_step = {k: v / own.profile_steps for k, v in totals.items()}
  contents = fusion_contents(_DUMP, "jit_eval_step" if a.mode == "eval" else "jit_train_step")
  by_kind = collections.Counter()
  for k, v in per_step.items():
    by_kind[op_kind(k, contents)] += v
  total = sum(per_step.values())
  print(f"wall per traced step {wall * 1e3:.1f} ms; sum of op events {total * 1e3:.1f} ms")
  for kind, v in by_kind.most_common():
    print(f"  {kind:24s} {v * 1e3:8.1f} ms  {v / total:6.1%}")
  print(f"top {own.top} ops (ms per step):")
  for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])[:own.top]:
    print(f"  {v * 1e3:8.2f}  {k:28s} {contents.get(k, '')}")


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
