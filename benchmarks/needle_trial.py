"""One needle trial (evaluation.needle.score_example) of a run under a variant: wall time of
the prompt's prefill and of the candidate keys, and the process's peak RSS.

  python benchmarks/needle_trial.py --run=pretrained:smollm2-135m --variant=self_extend \
      --length=32768 --depth=0.3 --dtype=auto
  python benchmarks/needle_trial.py ... --candidates=branch   # the old path, for comparison

--candidates: ``peek`` (what ships: each candidate scored in place in the cache's free slots)
or ``branch`` (each candidate on ``CachedDecoder.branch``, whose first step copies the whole
cache). Peak RSS is the process's high-water mark: run one process per configuration.
Prints one line with the CPU.
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from evaluation import needle
from evaluation.runner import one_variant
from input_pipeline.codec import Codec
from models.generate import CachedDecoder
from models.layers import cpu_description
from training import checkpoint
from training.allocator import reexec_with_huge_pages


class _Timed(CachedDecoder):
  """A decoder that records the wall time of its prompt and of its candidates."""

  times, candidates = {}, "peek"

  def feed(self, tokens, last_only=False):
    start = time.perf_counter()
    out = super().feed(tokens, last_only).block_until_ready()
    self.times["prefill_s"] = time.perf_counter() - start
    return out

  def peek(self, tokens, last_only=False):
    start = time.perf_counter()
    if self.candidates == "branch":  # the branch's own step (not timed as a prompt)
      out = CachedDecoder.feed(self.branch(), tokens, last_only)
    else:
      out = super().peek(tokens, last_only)
    out.block_until_ready()
    self.times["candidates_s"] = self.times.get("candidates_s", 0.0) + time.perf_counter() - start
    return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", default="pretrained:smollm2-135m")
  parser.add_argument("--variant", default="none")
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--depth", type=float, default=0.5)
  parser.add_argument("--trial", type=int, default=0)
  parser.add_argument("--dtype", default="auto")
  parser.add_argument("--candidates", choices=("peek", "branch"), default="peek")
  args = parser.parse_args(argv)
  config, run = checkpoint.load_run(args.run)
  codec = Codec(config)
  filler = needle.filler_tokens(config, codec, "test")
  _, model = one_variant(config, run, args.variant, args.length, args.dtype)
  example = needle.trial_example(filler, codec.encode, args.length, args.depth, 0, args.trial)
  _Timed.candidates, _Timed.times = args.candidates, {}
  needle.CachedDecoder = _Timed  # score_example's decoder, for this call only
  try:
    start = time.perf_counter()
    hit, rank, _ = needle.score_example(model, example)
    total = time.perf_counter() - start
  finally:
    needle.CachedDecoder = CachedDecoder
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  times = _Timed.times
  print(f"needle trial {args.run} {args.variant} L={args.length} depth={args.depth} "
        f"candidates={args.candidates}: {total:.1f} s (prefill {times['prefill_s']:.1f}, "
        f"candidates {times['candidates_s']:.2f}, compiles included), peak RSS {peak:.2f} GiB, "
        f"exact {int(hit)} rank {rank}; {cpu_description()}", flush=True)


if __name__ == "__main__":
  reexec_with_huge_pages()
  main()
