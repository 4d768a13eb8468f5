"""Training throughput of every registered encoding relative to RoPE.

  .venv/bin/python benchmarks/encodings.py [--steps=40] [--size=tiny] [--names=rope,alibi]

Trains each encoding for --steps steps of the default config (books, train_len 128,
batch 32) in a temporary workdir, one after another, and prints one JSON line per
encoding with steady-state tokens/s (first step, i.e. compilation, excluded), the
first-step time and the ratio to rope, then a markdown table.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app, flags, logging

import posenc
import train
from configs.default import get_config

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 40, "Training steps per encoding.")
flags.DEFINE_string("size", "tiny", "Model size argument of configs/default.py.")
flags.DEFINE_string("names", "", "Comma list of encodings (default: all registered).")


def measure(name, steps, size):
  """(tokens/s after the first step, first-step seconds) of a short run."""
  config = get_config(f"posenc={name},size={size}")
  config.num_train_steps = config.log_every = steps
  config.eval_every = config.checkpoint_every = steps
  config.eval_tokens = 4096
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  rate = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][-1]
  first = [r["train/first_step_s"] for r in rows if "train/first_step_s" in r][0]
  return rate, first


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = FLAGS.names.split(",") if FLAGS.names else ["rope"] + [
      n for n in posenc.names() if n != "rope"]
  results = {}
  for name in names:
    rate, first = measure(name, FLAGS.steps, FLAGS.size)
    results[name] = (rate, first)
    ratio = rate / results["rope"][0] if "rope" in results else None
    print(json.dumps({"posenc": name, "tokens_per_s": round(rate), "first_step_s": round(first, 2),
                      "ratio_to_rope": ratio and round(ratio, 3)}), flush=True)
  print("\n| encoding | tokens/s | first step (s) | vs rope |\n|---|---|---|---|")
  for name, (rate, first) in results.items():
    ratio = f"{rate / results['rope'][0]:.2f}" if "rope" in results else "-"
    print(f"| {name} | {rate:,.0f} | {first:.1f} | {ratio} |")


if __name__ == "__main__":
  app.run(main)
