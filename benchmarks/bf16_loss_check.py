#!/usr/bin/env python3
"""Does bf16-matmul training (f32 accumulation, f32 params/optimizer) follow the f32
loss curve? Trains the same model on the same books batches in both dtypes and
prints one JSON line with both curves and the largest gap.

    python benchmarks/bf16_loss_check.py --steps 50
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

import input_pipeline  # noqa: E402
from configs.common import resolve  # noqa: E402
from configs.default import get_config  # noqa: E402
from models import build_model  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.steps import make_train_step, split_model  # noqa: E402
from training.allocator import reexec_with_huge_pages  # noqa: E402


def curve(dtype, a):
  c = get_config(f"posenc=rope,data=books,train_len={a.seq_len},size=small")
  c.model.update(dtype=dtype, tie_embeddings=False, mlp_dim=688)
  c.batch_size, c.num_train_steps = a.batch, a.steps
  c = resolve(c)
  task = input_pipeline.get_task(c.data, c.seed)
  c.model.vocab_size = task.vocab_size
  tx = make_optimizer(c.optim, c.num_train_steps)
  graphdef, params = split_model(build_model(c))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  step, losses = make_train_step(graphdef, tx, c.seed), []
  for i in range(a.steps):
    state, m = step(state, task.train_batch(i, c.batch_size, c.train_len))
    losses.append(round(float(m["loss"]), 4))
  return losses


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  a = p.parse_args()
  f32, bf16 = curve("float32", a), curve("bfloat16", a)
  gap = max(abs(x - y) for x, y in zip(f32, bf16))
  print(json.dumps({"steps": a.steps, "float32": f32, "bfloat16": bf16, "max_abs_gap": gap,
                    "final": [f32[-1], bf16[-1]]}))


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
