"""Evaluate trained runs beyond their training length: perplexity vs length, sweeps, plots.

  python eval_extrapolate.py --runs=runs/rope,runs/alibi --lengths=128,256,512,1024,2048,4096 \
      --variants=none,linear,ntk,dynamic,yarn,llama3 --mode=nonoverlapping --out=results/exp1
  python eval_extrapolate.py --config=configs/sweep_demo.py --out=results/demo
  python eval_extrapolate.py --out=results/exp1 --replot      # figures + summary from rows only
  python eval_extrapolate.py --runs=pretrained:smollm2-135m --lengths=2048,16384 \
      --variants=none,yarn --split=test --max-tokens=16384 --batch-size=1 --out=results/smollm2

--runs: comma list of run dirs, globs allowed (runs/demo/*). --variants: comma list;
parameters follow a ':' (yarn:factor=8,beta_fast=16; factor=auto = length / train_len); a
variant that does not apply to a run's encoding is recorded as skipped. A run may also be a
pretrained checkpoint: pretrained:NAME (python -m pretrained list), a .gguf file or a Hugging
Face directory; its train_len is its context length. --mode sliding uses
--stride (0 = length // 2). --max_tokens bounds the scored tokens per length (0 = whole split).
--dtype evaluates in another matmul dtype than the run's own (auto | float32 | bfloat16; rows
record it as eval_dtype and key on it). A variant that computes exactly what "none" computes
at a length (e.g. factor=auto at or below train_len) reuses none's row (marked same_as).
Flags may be spelled with '-' or '_' (--max-tokens). A --config file (ml_collections) sets the
same options (see configs/sweep_demo.py); explicit command-line flags override it, and
--config.x=y overrides single fields.

Outputs in --out: results.jsonl, summary.md, ppl_vs_length.png, per_position_loss.png,
attention_entropy.png, accuracy_vs_length.png (synthetic runs). Rerunning resumes.
"""
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs.common import normalize_argv
from evaluation import report, results, sweep
from training import compile_cache
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Sweep config (runs, lengths, variants, ...).",
                                lock_config=False)
flags.DEFINE_string("runs", None, "Comma list of run directories (globs allowed) or "
                    "pretrained checkpoints (pretrained:NAME, x.gguf, HF dir).")
flags.DEFINE_string("lengths", None, "Comma list of evaluation lengths.")
flags.DEFINE_string("variants", None, "Comma list of variants, e.g. none,yarn:factor=auto.")
flags.DEFINE_enum("mode", None, ["nonoverlapping", "sliding"], "Window mode.")
flags.DEFINE_integer("stride", None, "Sliding-window stride S (0 = length // 2).")
flags.DEFINE_enum("split", None, ["validation", "test"], "Evaluation split.")
flags.DEFINE_integer("max_tokens", None, "Scored tokens per length at most (0 = all).")
flags.DEFINE_enum("sample", None, ["spread", "first"], "Which text max_tokens scores (text "
                  "runs): spread = max_tokens // max(lengths) segments spread over the split, "
                  "the same targets at every length, each segment a unit of the standard "
                  "error; first = the split's first max_tokens tokens, windows as units.")
flags.DEFINE_integer("batch_size", None, f"Windows per batch (0 = {sweep.DEFAULT_BATCH_TOKENS} "
                     "tokens / length, 1..64).")
flags.DEFINE_integer("stats_windows", None, "Windows for attention statistics (0 = off).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("dtype", None, "Matmul dtype to evaluate in: auto | float32 | bfloat16 "
                    "('' = each run's own model.dtype; pretrained checkpoints: float32).")
flags.DEFINE_bool("replot", False, "Only re-render summary.md and figures from results.jsonl.")

OPTIONS = ("runs", "lengths", "variants", "mode", "stride", "split", "max_tokens", "sample",
           "batch_size", "stats_windows", "dtype", "out")


def default_options():
  """The sweep options and their defaults (a --config file overrides any of them)."""
  return ml_collections.ConfigDict(dict(
      runs="", lengths="128,256,512,1024,2048,4096", variants="none", mode="nonoverlapping",
      stride=0, split="validation", max_tokens=131072, sample="spread", batch_size=0,
      stats_windows=1, dtype="", out=""))


def options_from_flags():
  opts = default_options()
  if FLAGS.config is not None:
    for key in OPTIONS:
      if key in FLAGS.config:
        value = FLAGS.config[key]
        opts[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
  for key in OPTIONS:
    if FLAGS[key].present:
      opts[key] = FLAGS[key].value
  return opts


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  compile_cache.enable()
  opts = options_from_flags()
  if not opts.out:
    raise app.UsageError("--out is required")
  if FLAGS.replot:
    rows = results.read_rows(os.path.join(opts.out, "results.jsonl"))
    if not rows:
      raise app.UsageError(f"--replot: no rows in {opts.out}/results.jsonl")
    for path in report.write_all(opts.out, rows):
      print("wrote", path)
    return
  if not opts.runs:
    raise app.UsageError("--runs (or a --config listing runs) is required")
  sweep.run_sweep(opts)
  print(f"results in {opts.out}/ (summary.md, results.jsonl, *.png)")


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  app.run(main, argv=normalize_argv(sys.argv))
