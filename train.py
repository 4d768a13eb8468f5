"""Train a lenx language model.

  python train.py --config=configs/default.py:posenc=rope --workdir=runs/rope
  python train.py --config=configs/default.py:posenc=alibi --workdir=runs/alibi \
      --config.model.num_layers=6 --config.num_train_steps=2000

Rerunning the same command resumes from the workdir's latest checkpoint; the
final parameters equal those of an uninterrupted run (batches and dropout are
pure functions of (seed, step)).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import input_pipeline
import pretrained
from input_pipeline import positions
from configs.common import resolve
from models import build_model, cpu_attention
from models.layers import cpu_dots
from training import checkpoint, compile_cache
from training.mesh import make_mesh, maybe_initialize_distributed, shard_batch, state_sharding
from training.optim import make_optimizer
from training.steps import make_eval_step, make_train_step, split_model
from training.logging import MetricWriter, progress_bar
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")


class NonFiniteLossError(RuntimeError):
  pass


def evaluate(eval_step, params, task, config, split="validation"):
  """Mean validation NLL at train_len over config.eval_tokens tokens."""
  nll, tokens = 0.0, 0.0
  for batch in task.eval_batches(split, config.train_len, config.batch_size, config.eval_tokens):
    out = jax.device_get(eval_step(params, batch))
    nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["tokens"])
  return nll / max(tokens, 1.0), tokens


def init_state(config, tx, workdir):
  """Fresh train state, optionally with parameters from config.init_from."""
  graphdef, params = split_model(build_model(config))
  if config.init_from:
    _, source, source_step = checkpoint.load_run(config.init_from, with_step=True)
    _, params = split_model(source)
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
      json.dump({"init_from": pretrained.run_id(config.init_from),
                 "variant": config.get("init_variant", "none"),
                 "source_step": int(source_step)}, f, indent=2)
  return graphdef, {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _check_finite(metrics, step, mngr):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise NonFiniteLossError(
        f"non-finite loss {loss} at step {step}; stopped without saving. The last good "
        f"checkpoint is step {mngr.latest_step()}. Lower optim.learning_rate or check the data.")
  return loss


def train_and_evaluate(config, workdir, *, stop_after=None):
  """Trains config in workdir, resuming from its latest checkpoint.

  stop_after: return after this many steps of *this invocation* (tests use it to
  simulate an interrupted run).
  """
  config = resolve(config)
  if config.model.get("dtype_auto"):
    print(f"model.dtype auto -> {config.model.dtype} ({config.model.dtype_auto})", flush=True)
  dots, why = cpu_dots()
  if dots:  # "" off the CPU
    print(f"XLA:CPU dots: {dots} ({why})", flush=True)
  if dots and config.model.dtype == "float32":
    use, why = cpu_attention.enabled()
    print(f"CPU attention kernel: {'on' if use else 'off'} ({why}; float32 attention with "
          "plain q.k logits or a distance bias)", flush=True)
  task = input_pipeline.get_task(config.data, config.seed)
  config.model.vocab_size = task.vocab_size
  checkpoint.check_compatible(workdir, config)
  checkpoint.write_config(workdir, config)

  tx = make_optimizer(config.optim, config.num_train_steps)
  graphdef, state = init_state(config, tx, workdir)
  mesh = make_mesh(config.get("mesh") or {})  # batch over ("data", "fsdp"); params split over "fsdp"
  state = jax.device_put(state, state_sharding(mesh, state))  # restore keeps these shardings
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, state)
  train_step, eval_step = make_train_step(graphdef, tx, config.seed), make_eval_step(graphdef)

  start = int(state["step"])
  end = config.num_train_steps if stop_after is None else min(config.num_train_steps,
                                                              start + stop_after)
  writer = MetricWriter(workdir)
  bar = progress_bar(start, config.num_train_steps, desc=os.path.basename(workdir.rstrip("/")))
  tokens_per_step = config.batch_size * config.train_len
  pending, t0, last_log = None, time.perf_counter(), start
  try:
    for step in range(start, end):
      batch = task.train_batch(step, config.batch_size, config.train_len)
      batch = positions.apply_positions(config.positions, batch, config.seed, step)
      batch = shard_batch(mesh, batch)
      state, metrics = train_step(state, batch)
      if pending is not None:  # check the previous step while this one runs
        _check_finite(*pending, mngr)
      pending = (metrics, step)
      done = step + 1
      if step == start:  # compile + first step, reported apart from the steady-state rate
        jax.block_until_ready(metrics)
        writer.write(done, {"train/first_step_s": time.perf_counter() - t0})
        t0, last_log = time.perf_counter(), done
      if done % config.log_every == 0 or done == end:
        loss = _check_finite(metrics, done, mngr)
        scalars = {"train/loss": loss, "train/grad_norm": float(metrics["grad_norm"])}
        if done > last_log:  # steady-state rate over the steps since the last log/eval
          scalars["train/tokens_per_s"] = (tokens_per_step * (done - last_log)
                                           / (time.perf_counter() - t0))
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{scalars['train/tokens_per_s']:,.0f}")
        writer.write(done, scalars)
        t0, last_log = time.perf_counter(), done
      if done % config.eval_every == 0 or done == config.num_train_steps:
        val, _ = evaluate(eval_step, state["params"], task, config)
        writer.write(done, {"eval/loss": val, "eval/ppl": float(np.exp(val))})
        bar.write(f"step {done}: validation loss {val:.4f} (ppl {np.exp(val):.2f})")
        t0, last_log = time.perf_counter(), done  # keep eval time out of the train rate
      if done % config.checkpoint_every == 0 or done == end:
        _check_finite(metrics, done, mngr)
        checkpoint.save(mngr, state)
      bar.update(1)
  finally:
    mngr.wait_until_finished()
    bar.close()
    writer.close()
  return state


def setup_runtime(config):
  """Before any computation: multi-host init, persistent compilation cache (a repeated
  sweep then loads executables instead of recompiling; eval scripts call this too)."""
  maybe_initialize_distributed(config.get("mesh") or {})
  compile_cache.enable(config.get("compilation_cache_dir"))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  setup_runtime(FLAGS.config)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
