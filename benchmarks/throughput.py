#!/usr/bin/env python3
"""lenx throughput on random bytes, flag- and field-compatible with the peer
``/work/shared/bench/peer_torch_llama.py`` (HF LlamaForCausalLM, torch CPU).

    python benchmarks/throughput.py                                    # train 4x256, seq 256, batch 16
    python benchmarks/throughput.py --mode eval --seq-len 16384        # forward + loss, batch 1
    python benchmarks/throughput.py --dtype bfloat16                   # bf16 matmul inputs, f32 accum
                                  # (default --dtype auto: bf16 only with bf16 hardware)

Same model shape as the peer: pre-RMSNorm, SwiGLU (--ffn), RoPE, vocab 256, untied
head, AdamW. Prints one JSON line with the peer's fields (tokens_per_s,
step_s_median, params, achieved_gflops, peak_rss_mib, ...) plus compile_s (first
call minus a steady step: trace + compile, or a cache load with --cache-dir),
the CPU's model and speed flags (avx2, avx512f, avx512_bf16, amx_bf16, ...), this
machine's matmul peak measured in the same run (jnp.dot f32, and bf16 inputs with f32
accumulation) and MFU against it.
FLOPs per token as the peer (PaLM appendix B): train 6N + 12 L d T, eval 2N + 4 L d T.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import cpu_attention  # noqa: E402
from models.layers import cpu_description, cpu_dots, jit, resolve_dtype  # noqa: E402
from training import compile_cache  # noqa: E402
from training.allocator import reexec_with_huge_pages  # noqa: E402

VOCAB = 256


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--ffn", type=int, default=688)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=None, help="default: 16 train, 1 eval")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default: 8 train, 3 eval)")
  p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps after compile (default 2 / 1)")
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="auto: bf16 matmuls where the hardware has them (models.layers.auto_dtype)")
  p.add_argument("--attention", choices=("auto", "full", "blockwise"), default="auto")
  p.add_argument("--posenc", default="rope", help="positional encoding (the peer has RoPE)")
  p.add_argument("--block-size", type=int, default=512)
  p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul peak (0 = skip)")
  p.add_argument("--cache-dir", default="", help="persistent compilation cache dir ('' = off)")
  a = p.parse_args(argv)
  a.dtype, a.dtype_auto = resolve_dtype(a.dtype)  # why "auto" chose it ("" otherwise)
  train = a.mode == "train"
  a.batch = a.batch if a.batch is not None else (16 if train else 1)
  a.steps = a.steps if a.steps is not None else (8 if train else 3)
  a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else (2 if train else 1)
  return a


def lenx_config(a):
  from configs.common import resolve
  from configs.default import get_config
  c = get_config(f"posenc={a.posenc},data=copy,train_len={a.seq_len}")
  c.model.update(num_layers=a.layers, d_model=a.d_model, num_heads=a.heads, mlp_dim=a.ffn,
                 tie_embeddings=False, dtype=a.dtype, attention=a.attention,
                 block_size=a.block_size, vocab_size=VOCAB)
  c.batch_size, c.num_train_steps, c.seed = a.batch, 10**6, a.seed
  c.optim.update(learning_rate=a.lr, warmup_steps=0, b1=0.9, b2=0.95, weight_decay=0.1)
  return resolve(c)


def matmul_peak_gflops(n, dtype, reps=5):
  """Best-of-reps GFLOP/s of an n x n x n jnp.dot (dtype inputs, f32 accumulation), with
  the dot library lenx's steps use (``models.layers.cpu_dots``)."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(x, x).block_until_ready()
  best = min(_timed(lambda: f(x, x).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best / 1e9


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def batches(a):
  rng = np.random.default_rng(a.seed + 1)
  while True:
    ids = rng.integers(0, VOCAB, (a.batch, a.seq_len + 1), dtype=np.int32)
    yield {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "positions": np.broadcast_to(np.arange(a.seq_len, dtype=np.int32), (a.batch, a.seq_len)),
           "loss_mask": np.ones((a.batch, a.seq_len), np.float32)}


def build_step(a, config):
  """(run(batch) -> loss float, parameter count); run is the jitted train or eval step."""
  from flax import nnx
  from models import build_model
  from training.optim import make_optimizer
  from training.steps import make_eval_step, make_train_step, split_model
  model = build_model(config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  graphdef, params = split_model(model)
  if a.mode == "eval":
    step = make_eval_step(graphdef)

    def run(batch):
      out = step(params, batch)
      return float(out["nll_sum"]) / float(out["tokens"])
    return run, count
  tx = make_optimizer(config.optim, config.num_train_steps)
  train_step = make_train_step(graphdef, tx, config.seed)
  holder = {"state": {"params": params, "opt_state": tx.init(params),
                      "step": jnp.zeros((), jnp.int32)}}

  def run(batch):
    holder["state"], metrics = train_step(holder["state"], batch)
    return float(metrics["loss"])  # forces completion before the clock stops
  return run, count


def flops_per_token(n_matmul, a, causal_discount=False):
  attn_fwd = 4 * a.layers * a.d_model * a.seq_len // (2 if causal_discount else 1)
  return 6 * n_matmul + 3 * attn_fwd if a.mode == "train" else 2 * n_matmul + attn_fwd


def main(argv=None):
  a = parse_args(argv)
  compile_cache.enable(a.cache_dir)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  config = lenx_config(a)
  run, total = build_step(a, config)  # trainable parameters (RoPE's inv_freq buffer excluded)
  n_matmul = total - VOCAB * a.d_model  # the input embedding is a lookup
  data = batches(a)
  first_s = _timed(lambda: run(next(data)))  # first call: trace + compile + one step
  times, losses = [], []
  for i in range(a.warmup_steps + a.steps):
    batch = next(data)
    t0 = time.perf_counter()
    losses.append(run(batch))
    if i >= a.warmup_steps:
      times.append(time.perf_counter() - t0)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the peak probe
  med = statistics.median(times)
  tps = a.batch * a.seq_len / med
  fpt = flops_per_token(n_matmul, a)
  peaks = {}
  if a.peak_size:
    peaks = {"float32": matmul_peak_gflops(a.peak_size, jnp.float32),
             "bfloat16": matmul_peak_gflops(a.peak_size, jnp.bfloat16)}
  gflops = fpt * tps / 1e9
  causal = flops_per_token(n_matmul, a, True) * tps / 1e9
  result = {
      "peer": "lenx-jax", "mode": a.mode, "jax": jax.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(), "attention": a.attention, "block_size": a.block_size,
      "dtype": a.dtype, "dtype_auto": a.dtype_auto, "cpu": cpu_description(),
      "cpu_dots": cpu_dots()[0], "cpu_attention_kernel": cpu_attention.enabled()[0],
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # training/allocator.py
      "config": {"layers": a.layers, "d_model": a.d_model, "heads": a.heads, "ffn": a.ffn,
                 "vocab": VOCAB, "seq_len": a.seq_len, "batch": a.batch, "steps": a.steps,
                 "warmup_steps": a.warmup_steps, "lr": a.lr if a.mode == "train" else None},
      "params": total, "params_matmul": n_matmul, "tokens_per_step": a.batch * a.seq_len,
      "tokens_per_s": round(tps, 1), "step_s_median": round(med, 5),
      "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
      "first_call_s": round(first_s, 2), "compile_s": round(max(first_s - med, 0.0), 2),
      "flops_per_token_est": fpt,
      "achieved_gflops": round(gflops, 2),
      "achieved_gflops_causal_attn": round(causal, 2),
      "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
      "mfu": {k: round(causal / v, 3) for k, v in peaks.items()},  # executed (causal) FLOPs
      "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
      "loss_uniform_ref": round(float(np.log(VOCAB)), 4),
      "peak_rss_mib": round(peak_rss, 1), "rss_before_model_mib": round(rss_before, 1),
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  sys.exit(main())
