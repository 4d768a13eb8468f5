"""Sample a continuation from a run (or a pretrained checkpoint) with a KV cache.

  python sample.py --run=runs/rope --prompt="It was a dark and stormy night" --max-new-tokens=200
  python sample.py --run=runs/rope --prompt-from=test:2048 --variant=yarn --temperature=0
  python sample.py --run=pretrained:smollm2-135m --prompt="The whale" --max-new-tokens=40
  python sample.py --run=runs/rope --prompt-from=test:1024 --sinks=4 --window=124   # StreamingLLM

--prompt-from=SPLIT:N takes the first N tokens of the split's first book (the same prompt for
every run). --variant as in eval_extrapolate.py (factor=auto = (prompt + new tokens) /
train_len); dynamic NTK / LongRoPE re-rotate the cached keys at every length
(models/generate.py). --temperature=0 is greedy. --sinks with --window evicts
(StreamingLLM: cache = sinks + window tokens, positions counted inside the cache).
Prints the prompt's tail and the continuation; --json prints one JSON object instead.
"""
import json
import sys
import time

import numpy as np
from absl import app, flags

from configs.common import normalize_argv
from evaluation.runner import one_variant
from input_pipeline import text as text_data
from input_pipeline.codec import Codec
from models.generate import generate
from training import checkpoint
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "Run directory or pretrained checkpoint (pretrained:NAME).")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_string("prompt_from", None, "SPLIT:N = first N tokens of the split's first book.")
flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus: smallest set with this much probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same text).")
flags.DEFINE_string("variant", "none", "Context-extension variant (see eval_extrapolate.py).")
flags.DEFINE_integer("sinks", None, "StreamingLLM: initial tokens kept when evicting.")
flags.DEFINE_integer("window", None, "StreamingLLM: recent tokens kept (cache = sinks + window).")
flags.DEFINE_string("dtype", "", "Matmul dtype: auto | float32 | bfloat16 ('' = the run's own).")
flags.DEFINE_bool("json", False, "Print one JSON object (prompt, continuation, timings).")


def book_ids(config, codec, split, end=None):
  """Token ids of the split's first book up to byte ``end`` (all of it by default): its
  bytes, or the run's BPE of its text (a character cut at ``end`` is dropped)."""
  doc = text_data.books_docs(split, config.data.get("data_dir", ""),
                             config.data.get("books_dir", ""))[0]
  if end is not None and end > len(doc):
    raise ValueError(f"byte {end} is past the first {split} book ({len(doc)} bytes)")
  head = np.asarray(doc[:end])
  if not codec.bpe:
    return head.astype(np.int32)
  return np.asarray(codec.encode(bytes(head).decode("utf-8", errors="ignore")), np.int32)


def book_prompt(config, codec, spec):
  """The first N tokens of the split's first book (``SPLIT:N``)."""
  split, _, n = spec.partition(":")
  if split not in ("train", "validation", "test") or not n.isdigit():
    raise ValueError("--prompt-from must be SPLIT:N with SPLIT train|validation|test, "
                     f"got {spec!r}")
  ids = book_ids(config, codec, split)
  if len(ids) < int(n):
    raise ValueError(f"the first {split} book has {len(ids)} tokens, fewer than {n}")
  return np.asarray(ids[:int(n)], np.int32)


def continuation(run, prompt_ids, *, max_new_tokens, variant="none", sinks=None, window=None,
                 dtype="", **sampling):
  """(config as run: variant and dtype applied, new token ids, seconds) of one sampled
  continuation of ``prompt_ids``; ``dtype`` overrides the run's matmul dtype (as
  eval_extrapolate.py --dtype)."""
  vconf, model = one_variant(*checkpoint.load_run(run), variant,
                             len(prompt_ids) + max_new_tokens, dtype)
  if (sinks is None) != (window is None):
    raise ValueError("--sinks and --window go together (StreamingLLM cache = sinks + window)")
  capacity = sinks + window if sinks is not None else None
  start = time.perf_counter()
  out = generate(model, np.asarray(prompt_ids)[None], max_new_tokens, capacity=capacity,
                 sinks=sinks, **sampling)
  return vconf, out[0, len(prompt_ids):], time.perf_counter() - start


def main(argv):
  del argv
  if not FLAGS.run or (FLAGS.prompt is None) == (FLAGS.prompt_from is None):
    raise app.UsageError("need --run and exactly one of --prompt / --prompt-from")
  config = checkpoint.read_config(FLAGS.run)
  codec = Codec(config)
  prompt = (book_prompt(config, codec, FLAGS.prompt_from) if FLAGS.prompt_from
            else np.asarray(codec.encode(FLAGS.prompt), np.int32))
  _, new, seconds = continuation(
      FLAGS.run, prompt, max_new_tokens=FLAGS.max_new_tokens, variant=FLAGS.variant,
      sinks=FLAGS.sinks, window=FLAGS.window, dtype=FLAGS.dtype, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
  text = codec.decode(new)
  if FLAGS.json:
    print(json.dumps({"run": FLAGS.run, "variant": FLAGS.variant, "prompt_tokens": len(prompt),
                      "new_tokens": len(new), "seconds": round(seconds, 3),
                      "continuation": text}))
  else:
    print(f"... {codec.decode(prompt[-200:])}\n>>> {text}")
    print(f"[{len(new)} tokens in {seconds:.1f}s incl. compile]", file=sys.stderr)


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  app.run(main, argv=normalize_argv(sys.argv))
