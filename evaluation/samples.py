"""What extrapolation failure looks like in text: each run continues the same test-book
passage from prompts of 1x, 4x and 16x its training length (``samples.md``).

  python -m evaluation.samples --out=results/demo runs/demo/*-s0

Every prompt ends at the same place of the first test book (character offset ``--at``), so
the continuations of different runs and lengths continue the same text; only how much of it
the model sees differs. Sampling: temperature 0.8, top-k 40, seed 0 (greedy decoding of these
small byte models loops at any length, which would hide the difference).
"""
import argparse
import glob
import time

import numpy as np

import sample
from evaluation.results import write_atomic
from input_pipeline import text as text_data
from input_pipeline.base import decode
from training import checkpoint

MULTIPLES = (1, 4, 16)


def _passage(config, end, length):
  doc = text_data.books_docs("test", config.data.get("data_dir", ""),
                             config.data.get("books_dir", ""))[0]
  if end > len(doc):
    raise ValueError(f"--at {end} is past the first test book ({len(doc)} bytes)")
  return np.asarray(doc[end - length:end], np.int32)


def _show(ids):
  return decode(ids).replace("```", "'''")


def samples_markdown(runs, *, at, new_tokens, seed=0):
  out = ["# Samples past the training length", "",
         f"Each run continues the first test book from byte {at}; prompts of 1x / 4x / 16x its "
         f"training length end there. {new_tokens} new bytes, temperature 0.8, top-k 40, "
         f"seed {seed}, KV-cached decoding (`models/generate.py`). Shown: the prompt's last 120 "
         "bytes, then `>>>`, then the continuation.", ""]
  for run in runs:
    config = checkpoint.read_config(run)
    out += [f"## {config.get('name') or run} ({run}, train_len {config.train_len})", ""]
    for k in MULTIPLES:
      prompt = _passage(config, at, k * config.train_len)
      t0 = time.perf_counter()
      try:
        _, new, _ = sample.continuation(run, prompt, max_new_tokens=new_tokens, temperature=0.8,
                                        top_k=40, seed=seed)
      except ValueError as e:  # e.g. a learned table shorter than prompt + new tokens
        out += [f"**{k}x**: not generated: {e}", ""]
        continue
      secs = time.perf_counter() - t0
      out += [f"**{k}x ({len(prompt)} bytes of prompt; {secs:.1f} s)**", "", "```",
              _show(prompt[-120:]) + " >>>" + _show(np.asarray(new)), "```", ""]
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="run directories (globs allowed)")
  p.add_argument("--out", required=True, help="directory for samples.md")
  p.add_argument("--at", type=int, default=300_000, help="byte offset in the first test book")
  p.add_argument("--new-tokens", type=int, default=160)
  a = p.parse_args()
  runs = sorted({r for spec in a.runs for r in (glob.glob(spec) or [spec])})
  write_atomic(f"{a.out}/samples.md", samples_markdown(runs, at=a.at, new_tokens=a.new_tokens))
  print(f"wrote {a.out}/samples.md")


if __name__ == "__main__":
  main()
