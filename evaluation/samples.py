"""What extrapolation failure looks like in text: each run continues the same test-book
passage from prompts of 1x, 4x and 16x its training length (``samples.md``).

  python -m evaluation.samples --out=results/demo runs/demo/*-s0
  python -m evaluation.samples --out=results/demo pretrained:smollm2-135m \
      --multiples=1,2 --variants=none,yarn --dtype=auto --new-tokens=80

Every prompt ends at the same place of the first test book (byte offset ``--at``), so the
continuations of different runs, variants and lengths continue the same text; only how much
of it the model sees differs (a checkpoint's BPE prompt is the tokenised text before ``--at``).
Sampling: temperature 0.8, top-k 40, seed 0 (greedy decoding of these small byte models loops
at any length, which would hide the difference). One section per run and variant; a rerun
replaces the sections it computes and keeps the others already in ``samples.md``.
"""
import argparse
import glob
import os
import time

import numpy as np

import extensions
import sample
from evaluation.results import write_atomic
from evaluation.runner import eval_dtype_for
from input_pipeline.codec import Codec
from training import checkpoint
from training.allocator import reexec_with_huge_pages

MULTIPLES = (1, 4, 16)
HEADER = ["# Samples past the training length", "",
          "Each run continues the first test book from byte {at}; its prompts (multiples of its "
          "training length, or of a checkpoint's context length) end there. Temperature 0.8, "
          "top-k 40, seed {seed}, KV-cached decoding (`models/generate.py`). Shown: the prompt's "
          "last 120 bytes, then `>>>`, then the continuation.", ""]


def _show(codec, ids, tail_bytes=None):
  """Decoded text (its last ``tail_bytes`` bytes), safe inside a markdown code fence."""
  text = codec.decode(ids)
  if tail_bytes:
    text = text.encode("utf-8")[-tail_bytes:].decode("utf-8", errors="replace")
  return text.replace("```", "'''")


def run_sections(run, *, at, new_tokens, multiples=MULTIPLES, variants=("none",), dtype="",
                 seed=0):
  """[(heading, markdown)] of one run: a section per variant, a sample per multiple."""
  config = checkpoint.read_config(run)
  codec = Codec(config)
  ids = sample.book_ids(config, codec, "test", at)
  unit = "tokens" if codec.bpe else "bytes"
  name = config.get("name") or run
  sections = []
  matmuls = f", {eval_dtype_for(dtype)} matmuls" if dtype else ""
  for variant in variants:
    label = name if variant == "none" else f"{name} + {variant}"
    lines = [f"{new_tokens} new {unit}{matmuls}", ""]
    for k in multiples:
      n = int(k * config.train_len)
      if n > len(ids):
        lines += [f"**{k:g}x**: not generated: only {len(ids)} {unit} before byte {at}", ""]
        continue
      t0 = time.perf_counter()
      try:
        _, new, _ = sample.continuation(run, ids[-n:], max_new_tokens=new_tokens, variant=variant,
                                        dtype=dtype, temperature=0.8, top_k=40, seed=seed)
      except ValueError as e:  # e.g. a learned table shorter than prompt + new tokens
        lines += [f"**{k:g}x**: not generated: {e}", ""]
        continue
      secs = time.perf_counter() - t0
      lines += [f"**{k:g}x ({n} {unit} of prompt; {secs:.1f} s)**", "", "```",
                _show(codec, ids[-n:], 120) + " >>>" + _show(codec, np.asarray(new)), "```", ""]
    sections.append((f"## {label} ({run}, train_len {config.train_len})", "\n".join(lines)))
  return sections


def merge(old_text, sections, header):
  """samples.md with ``sections`` replacing same-heading sections of ``old_text`` in place
  (new headings appended): a rerun for one run never drops the others' samples."""
  parts = old_text.split("\n## ")[1:] if old_text else []
  kept = [("## " + p.split("\n", 1)[0], p.split("\n", 1)[1].strip("\n")) for p in parts]
  new = dict(sections)
  out = [(h, new.pop(h, body)) for h, body in kept] + [s for s in sections if s[0] in new]
  return "\n".join(header + [f"{h}\n\n{body.strip()}\n" for h, body in out])


def samples_markdown(runs, *, at, new_tokens, seed=0, old_text="", **kw):
  sections = [s for run in runs
              for s in run_sections(run, at=at, new_tokens=new_tokens, seed=seed, **kw)]
  return merge(old_text, sections, [line.format(at=at, seed=seed) for line in HEADER])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="run directories (globs allowed) or pretrained:NAME")
  p.add_argument("--out", required=True, help="directory for samples.md")
  p.add_argument("--at", type=int, default=300_000, help="byte offset in the first test book")
  p.add_argument("--new-tokens", type=int, default=160)
  p.add_argument("--multiples", default="1,4,16", help="prompt lengths, x the training length")
  p.add_argument("--variants", default="none", help="comma list (as eval_extrapolate.py)")
  p.add_argument("--dtype", default="", help="matmul dtype override: auto | float32 | bfloat16")
  a = p.parse_args()
  runs = sorted({r for spec in a.runs for r in (glob.glob(spec) or [spec])})
  path = os.path.join(a.out, "samples.md")
  old = open(path).read() if os.path.exists(path) else ""
  text = samples_markdown(runs, at=a.at, new_tokens=a.new_tokens, old_text=old,
                          multiples=[float(m) for m in a.multiples.split(",")],
                          variants=[v.label for v in extensions.parse_variants(a.variants)],
                          dtype=a.dtype)
  write_atomic(path, text)
  print(f"wrote {path}")


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  main()
