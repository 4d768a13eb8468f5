"""The sweep: runs x variants x lengths -> rows in ``<out>/results.jsonl`` -> report.

Resumable: a row whose key (run dir, variant, length, mode, stride, split,
max_tokens) is already in results.jsonl is not recomputed. Every job ends as a row:
``status`` is "ok", "unsupported: <reason>" (the encoding cannot represent the
length, e.g. a learned table) or "skipped: <reason>" (the variant does not apply to
the run's encoding), so figures and summary can be re-rendered from the file alone.
"""
import glob
import json
import os
import sys
import time

from tqdm import tqdm

import input_pipeline
from evaluation import report, runner, windows
from evaluation.results import ResultsFile, row_key
from evaluation.variants import NotApplicable, apply_variant, parse_variants
from training import checkpoint

# batch_size 0: windows per batch = this // length (1..64). Small batches stay in cache:
# the demo's rows (2 x d128, 131,072 tokens, float32, 2-core AMD EPYC avx2 + fma, three
# interleaved repeats) ran 10-15 % faster at 4096 tokens than at 8192 or 32768 from 128 to
# 2048 tokens per window, and as fast at 4096.
DEFAULT_BATCH_TOKENS = 4096


def expand_runs(spec):
  """'runs/a,runs/b*' -> sorted run dirs (each with config.json); ValueError if none match."""
  items = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(",")
  out = []
  for item in filter(None, (s.strip() for s in items)):
    matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    matches = [m for m in matches if checkpoint.is_run(m)]
    if not matches:
      raise ValueError(f"--runs entry {item!r} matches no run directory (a dir with config.json) "
                       "nor a pretrained checkpoint (pretrained:NAME, a .gguf file, an HF dir)")
    out.extend(m for m in matches if m not in out)
  return out


def parse_lengths(spec):
  items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
  try:
    lengths = [int(x) for x in items if str(x).strip()]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise ValueError(f"--lengths must be positive integers, got {spec!r}")
  return sorted(set(lengths))


SAMPLES = ("spread", "first")


def segment_len_for(opts, lengths):
  """Evaluation segment length: the longest evaluated length ("spread"), 0 for "first"."""
  sample = getattr(opts, "sample", "first")  # ConfigDicts and plain objects alike
  if sample not in SAMPLES:
    raise ValueError(f"unknown sample {sample!r}; valid choices: {', '.join(SAMPLES)}")
  return max(lengths) if sample == "spread" and opts.max_tokens else 0


def portable_path(path):
  """A run dir as rows store it: relative to the working directory when inside it (so
  results files carry no machine-specific absolute paths), else absolute."""
  rel = os.path.relpath(os.path.realpath(path), os.path.realpath(os.getcwd()))
  return os.path.realpath(path) if rel.startswith("..") else rel


def batch_size_for(batch_size, length):
  return batch_size or max(1, min(64, DEFAULT_BATCH_TOKENS // length))


class _Run:
  """A run directory, loaded lazily (only when one of its rows is still missing).

  eval_dtype: matmul dtype to evaluate in instead of the run's own (parameters are float32
  either way; only the variant models built for the rows use it)."""

  def __init__(self, run_dir, eval_dtype=""):
    self.dir, self.config = run_dir, checkpoint.read_config(run_dir)
    self.eval_dtype = eval_dtype
    if eval_dtype:
      self.config.model.dtype = eval_dtype
    self._model = self._task = None
    self.step = checkpoint.latest_step(run_dir)

  @property
  def model(self):
    if self._model is None:
      _, self._model = checkpoint.load_run(self.dir)
    return self._model

  @property
  def task(self):
    if self._task is None:
      self._task = input_pipeline.get_task(self.config.data, self.config.seed)
    return self._task

  def base_row(self, variant, length, opts, stride, segment_len):
    c = self.config
    name = os.path.basename(os.path.normpath(self.dir))
    return {"run": name, "group": c.get("name") or name, "seed": c.seed,
            "run_dir": portable_path(self.dir), "posenc": c.posenc.name,
            "positions": c.get("positions", {}).get("kind", "contiguous"), "data": c.data.name,
            "variant": variant.label, "variant_name": variant.name,
            "variant_params": variant.param_dict(), "train_len": c.train_len,
            "length": length, "mode": opts.mode, "stride": stride, "split": opts.split,
            "max_tokens": opts.max_tokens, "segment_len": segment_len, "step": self.step,
            "dtype": c.model.dtype, **({"eval_dtype": self.eval_dtype} if self.eval_dtype else {})}


# fields a row reuses from an identical variant's row (everything measured)
_OWN_FIELDS = ("status", "variant", "variant_name", "variant_params", "variant_resolved",
               "seconds")


def _compute(run, variant, length, opts, stride, segment_len, reference=None):
  """Row fields (without the base) of one job. ``reference``: the run's "none" row at this
  length (or None); a variant that computes exactly the same (``runner.same_computation``)
  reuses its numbers instead of recomputing them, marked ``same_as``."""
  try:
    config = apply_variant(run.config, variant, length)
  except NotApplicable as e:
    return {"status": f"skipped: {e}"}
  resolved = {"variant_resolved": json.loads(config.variant_resolved)}  # defaults, auto filled
  if opts.mode == "sliding" and not run.task.is_text:
    return {"status": f"skipped: sliding mode needs a text task, {run.config.data.name!r} is not"}
  model = runner.variant_model(run.model, config)
  if (reference and reference.get("status") == "ok" and variant.label != "none"
      and runner.same_computation(run.config, run.model, config, model)):
    reused = {k: v for k, v in reference.items() if k not in _OWN_FIELDS and k not in
              run.base_row(variant, length, opts, stride, segment_len)}
    return {"status": "ok", **resolved, **reused, "same_as": "none"}
  unsupported = runner.length_unsupported(model, length)
  if unsupported:
    return {"status": unsupported, **resolved}
  fields = runner.evaluate(
      model, run.task, length=length, mode=opts.mode, stride=stride, split=opts.split,
      batch_size=batch_size_for(opts.batch_size, length), max_tokens=opts.max_tokens or None,
      stats_windows=opts.stats_windows, segment_len=segment_len,
      key=runner.program_key(config))
  return {"status": "ok", **resolved, **fields}


def _describe(row):
  if row["status"] != "ok":
    return f"{row['run']} {row['variant']} L={row['length']}: {row['status'][:90]}"
  metric = f"bpb {row['bpb']:.3f}" if "bpb" in row else f"excess {row['excess_nll']:.3f}"
  se = "n/a" if row.get("nll_se") is None else f"{100 * row['nll_se']:.1f} %"
  cost = (f"same computation as {row['same_as']}: its numbers" if row.get("same_as") else
          f"compile {row['compile_s']:.1f}s, run {row['run_s']:.1f}s")
  return (f"{row['run']} {row['variant']} L={row['length']}: ppl {row['ppl']:.3f} "
          f"(se {se}) {metric} ({row['tokens']} tok, {cost})")


def run_sweep(opts, *, verbose=True):
  """Computes the missing rows, then writes summary.md and the figures; returns all rows.

  opts: runs, lengths, variants, mode, stride, split, max_tokens, sample (default
  "first"), batch_size, stats_windows, out, dtype (optional, "" = each run's own) (a
  ConfigDict or any object with these).
  """
  windows.check_mode(opts.mode, 1, 1)
  eval_dtype = runner.eval_dtype_for(getattr(opts, "dtype", ""))
  runs = [_Run(d, eval_dtype) for d in expand_runs(opts.runs)]
  lengths, variants = parse_lengths(opts.lengths), parse_variants(opts.variants)
  # "none" first, wherever it is listed: the variants that compute what it computes at a
  # length reuse its row instead of computing their own (and none its own after them)
  variants = sorted(variants, key=lambda v: v.label != "none")
  os.makedirs(opts.out, exist_ok=True)
  results = ResultsFile(os.path.join(opts.out, "results.jsonl"))
  segment_len = segment_len_for(opts, lengths)
  jobs = [(r, v, n) for r in runs for v in variants for n in lengths]
  bar = tqdm(total=len(jobs), desc="sweep", unit="row", file=sys.stderr, dynamic_ncols=True,
             disable=not verbose)
  computed = 0
  for run, variant, length in jobs:
    stride = windows.resolve_stride(opts.mode, length, opts.stride)
    windows.check_mode(opts.mode, length, stride)
    row = run.base_row(variant, length, opts, stride, segment_len)
    bar.set_postfix_str(f"{row['run']} {variant.label} L={length}")
    if row_key(row) not in results:
      t0 = time.perf_counter()
      reference = results.rows.get(row_key({**row, "variant": "none"}))
      row.update(_compute(run, variant, length, opts, stride, segment_len, reference))
      row["seconds"] = time.perf_counter() - t0
      results.add(row)
      computed += 1
      if verbose:
        bar.write(_describe(row))
    bar.update(1)
  bar.close()
  rows = list(results.rows.values())
  report.write_all(opts.out, rows)
  if verbose:
    print(f"{computed} rows computed, {len(jobs) - computed} already in {results.path}")
  return rows
