"""The lenx demo (``make demo``): train small byte models, one per encoding family, then
evaluate them from 64 to 4096 tokens and write results/demo/ (configs/sweep_demo.py).

  python demo.py            # ~30 min on a 2-core CPU; reuses finished runs in runs/demo/
  python demo.py --smoke    # micro version (seconds): 2 runs x 2 lengths x 2 variants

A run is reused when its latest checkpoint step equals num_train_steps; an interrupted
run resumes. An encoding or option that is not registered in this checkout is skipped
with a message, so the demo works for the others.
"""
import os
import sys
import time

import jax
from absl import app, flags, logging

import posenc

from configs import sweep_demo
from configs.common import resolve
from configs.default import get_config
from evaluation import sweep
from training import checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Micro version: 2 tiny runs, 2 lengths, 2 variants.")
flags.DEFINE_string("only", "", "Comma list of demo run names to use (default: all).")
flags.DEFINE_string("runs_dir", "", "Override train.runs_dir.")
flags.DEFINE_string("out", "", "Override the output directory.")

EVAL_S_PER_ROW = 4.5  # measured: 1-2 s compile + 0.5-4 s for 16384 tokens (L 128..4096)


def _set(config, dotted, text):
  """config.a.b = text cast to the type of the current value."""
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  if leaf not in node:
    raise ValueError(f"unknown config field {dotted!r}")
  old = node[leaf]
  node[leaf] = text.lower() in ("1", "true") if isinstance(old, bool) else type(old)(text)


def run_config(demo, spec):
  """The training config of one demo run (ValueError if this checkout cannot build it)."""
  t = demo.train
  config = get_config(f"{spec.args},train_len={t.train_len}")
  config.model.num_layers, config.model.d_model, config.model.num_heads = (
      t.num_layers, t.d_model, t.num_heads)
  config.batch_size, config.num_train_steps = t.batch_size, t.num_train_steps
  config.optim.warmup_steps, config.eval_tokens = t.warmup_steps, t.eval_tokens
  config.eval_every = config.checkpoint_every = t.num_train_steps
  config.log_every = max(1, min(20, t.num_train_steps))
  for item in filter(None, spec.overrides.split(";")):
    key, _, value = item.partition("=")
    _set(config, key.strip(), value.strip())
  resolve(config)  # validates: unknown encodings / position kinds raise here
  return config


def done_steps(workdir):
  if not os.path.exists(checkpoint.config_path(workdir)):
    return 0
  return checkpoint.manager(workdir).latest_step() or 0


def plan(demo, only=()):
  """[(name, workdir, config or None, note)] and prints the timing plan."""
  t, out = demo.train, []
  for name, spec in demo.train.runs.items():
    if only and name not in only:
      continue
    workdir = os.path.join(t.runs_dir, name)
    try:
      config = run_config(demo, spec)
    except ValueError as e:
      out.append((name, workdir, None, f"skipped: {e}"))
      continue
    left = t.num_train_steps - done_steps(workdir)
    secs = left * t.batch_size * t.train_len / t.tokens_per_s
    out.append((name, workdir, config, "finished, reused" if left <= 0 else
                f"train {left} steps, ~{secs:.0f} s"))
  todo = [o for o in out if o[2] is not None]
  train_s = sum(max(0, t.num_train_steps - done_steps(w)) for _, w, _, _ in todo) * (
      t.batch_size * t.train_len / t.tokens_per_s)
  n_variants = len(demo.variants.split(","))
  rows = sum(n_variants if posenc.get(c.posenc.name).uses_rope else 1 for _, _, c, _ in todo) * len(
      demo.lengths.split(","))
  print(f"demo plan ({len(todo)} runs, {t.num_layers} layers, d_model {t.d_model}, "
        f"{t.num_train_steps} steps x {t.batch_size} x {t.train_len} tokens):")
  for name, _, _, note in out:
    print(f"  {name:18s} {note}")
  print(f"  estimate: training ~{train_s / 60:.1f} min (at {t.tokens_per_s:,.0f} tokens/s), "
        f"evaluation ~{rows * EVAL_S_PER_ROW / 60:.1f} min ({rows} rows)", flush=True)
  return out


def run_demo(demo, only=()):
  """Trains what is missing, evaluates; returns the sweep rows."""
  import train  # imported here: its absl flags are defined at import
  t0 = time.perf_counter()
  ready = []
  for name, workdir, config, _ in plan(demo, only):
    if config is None:
      continue
    if done_steps(workdir) < config.num_train_steps:
      t1 = time.perf_counter()
      train.train_and_evaluate(config, workdir)
      print(f"{name}: trained in {time.perf_counter() - t1:.0f} s", flush=True)
    ready.append(workdir)
  if not ready:
    raise ValueError("no demo run could be built in this checkout")
  t_train = time.perf_counter() - t0
  demo.runs = ",".join(ready)
  rows = sweep.run_sweep(demo)
  total = time.perf_counter() - t0
  print(f"demo wall time {total / 60:.1f} min (training {t_train / 60:.1f}, "
        f"evaluation {(total - t_train) / 60:.1f}); results in {demo.out}/")
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/lenx/jax"))
  demo = sweep_demo.get_config("smoke" if FLAGS.smoke else None)
  if FLAGS.runs_dir:
    demo.train.runs_dir = FLAGS.runs_dir
  if FLAGS.out:
    demo.out = FLAGS.out
  run_demo(demo, only=tuple(filter(None, FLAGS.only.split(","))))


if __name__ == "__main__":
  app.run(main, argv=[a.replace("--runs-dir", "--runs_dir") for a in sys.argv])
