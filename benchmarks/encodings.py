"""Training throughput of every registered encoding relative to RoPE.

  .venv/bin/python benchmarks/encodings.py [--steps=300] [--recipe=demo] [--names=rope,alibi]

Trains each encoding for --steps steps in a temporary workdir, one after another, with
the demo study's recipe (``--recipe=demo``: configs/sweep_demo.py, the model, batch,
length and dtype the demo trains with, so its plan estimate can use measured rates) or
configs/default.py (``--recipe=default``: size tiny, batch 32). Prints the CPU (model and
speed flags) and the dtype, then one JSON line per encoding with steady-state tokens/s
(train.py's rate after the first logging interval, i.e. compilation excluded), the
first-step time and the ratio to rope, then a markdown table.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import ml_collections
from absl import app, flags, logging

import posenc
import train
from configs import sweep_demo
from configs.common import resolve
from configs.default import get_config
from models.layers import cpu_description
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 300, "Training steps per encoding.")
flags.DEFINE_enum("recipe", "demo", ["demo", "default"], "Whose shape and recipe to time.")
flags.DEFINE_string("names", "", "Comma list of encodings (default: all registered).")
flags.DEFINE_enum("dtype", "", ["", "auto", "float32", "bfloat16"], "Override the recipe's dtype.")


def encoding_config(name, recipe):
  """The training config of encoding ``name`` under the chosen recipe (unresolved)."""
  if recipe == "demo":
    import demo  # the demo's own config builder, so the timed model is the demo's
    spec = ml_collections.ConfigDict({"args": f"posenc={name}", "overrides": ""})
    return demo.run_config(sweep_demo.get_config(), spec)
  return get_config(f"posenc={name},size=tiny")


def measure(name, steps, recipe, dtype=""):
  """(tokens/s after the first logging interval, first-step seconds, dtype) of a short run."""
  config = encoding_config(name, recipe)
  config.model.dtype = dtype or config.model.dtype
  config = resolve(config)  # "auto" -> the dtype that runs, reported below
  config.num_train_steps = config.eval_every = config.checkpoint_every = steps
  config.log_every = max(1, steps // 10)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 2)
  config.eval_tokens = 4096
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]
  first = [r["train/first_step_s"] for r in rows if "train/first_step_s" in r][0]
  return sorted(rates)[len(rates) // 2], first, config.model.dtype


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(json.dumps({"cpu": cpu_description(), "recipe": FLAGS.recipe}), flush=True)
  names = FLAGS.names.split(",") if FLAGS.names else ["rope"] + [
      n for n in posenc.names() if n != "rope"]
  results = {}
  for name in names:
    rate, first, dtype = measure(name, FLAGS.steps, FLAGS.recipe, FLAGS.dtype)
    results[name] = (rate, first)
    ratio = rate / results["rope"][0] if "rope" in results else None
    print(json.dumps({"posenc": name, "dtype": dtype, "tokens_per_s": round(rate),
                      "first_step_s": round(first, 2), "ratio_to_rope": ratio and round(ratio, 3)}),
          flush=True)
  print("\n| encoding | tokens/s | first step (s) | vs rope |\n|---|---|---|---|")
  for name, (rate, first) in results.items():
    ratio = f"{rate / results['rope'][0]:.2f}" if "rope" in results else "-"
    print(f"| {name} | {rate:,.0f} | {first:.1f} | {ratio} |")


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  app.run(main)
