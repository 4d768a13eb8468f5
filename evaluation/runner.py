"""One results row: a trained run, under one variant, at one length and mode.

The variant's model is built from ``apply_variant``'s config and given the run's
trained parameters (only ``nnx.Param`` leaves: non-trainable state such as RoPE
inverse frequencies belongs to the variant and must not be overwritten by the
checkpoint's). One eval function is compiled per (model, length), ahead of time,
so compile time is measured separately from run time and reused for all batches, and
kept per ``program_key`` so that the next row with the same model structure and shapes
(another seed of the run group, a variant that only changes parameters) compiles nothing.
"""
import collections
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import extensions
from evaluation import windows
from evaluation.metrics import Accumulator
from models import build_model
from models.attention import use_blockwise
from models.layers import jit, resolve_dtype
from models.loss import nll_and_entropy, per_token
from training.steps import split_model


def eval_dtype_for(dtype):
  """--dtype: "" (each run's own model.dtype) or a dtype name, "auto" resolved here."""
  return resolve_dtype(dtype)[0] if dtype else ""


def variant_model(run_model, variant_config, dtype=""):
  """The model of ``variant_config`` carrying ``run_model``'s trained parameters; ``dtype``
  (as ``eval_dtype_for``) overrides the matmul dtype, recorded in ``variant_config``."""
  if dtype:
    variant_config.model.dtype = eval_dtype_for(dtype)
  model = build_model(variant_config)
  nnx.update(model, nnx.state(run_model, nnx.Param))
  return model


def length_unsupported(model, length):
  """The row status "unsupported: <why>" where the model's encoding cannot address
  ``length`` positions (a learned table shorter than it), else None: a sweep or needle grid
  records it and goes on to the next cell."""
  try:
    model.posenc.check_positions(length - 1)
  except ValueError as e:
    return f"unsupported: {e}"
  return None


def one_variant(run_config, run_model, variant, eval_len, dtype=""):
  """(config, model) of a run under one variant spec (``"yarn"``, ``"dynamic:factor=2"``)
  set up for ``eval_len`` tokens, in ``dtype`` (``variant_model``): what a script decoding
  one variant (sample.py, benchmarks/generate_speed.py) runs."""
  specs = extensions.parse_variants(variant)
  if len(specs) != 1:
    raise ValueError(f"--variant takes one variant, got {variant!r}")
  config = extensions.apply_variant(run_config, specs[0], eval_len)
  return config, variant_model(run_model, config, dtype)


def _computation(config):
  """The config without what only names a variant or feeds the RoPE frequencies."""
  d = config.to_dict()
  d.pop("variant_resolved", None)
  enc = d.get("posenc", {}).get(d.get("posenc", {}).get("name"), {})
  for key in ("scaling", "scaling_json", "eval_len"):
    enc.pop(key, None)
  return d


def same_computation(run_config, run_model, variant_config, model):
  """Whether ``model`` (a variant of the run) computes exactly what the run's model does:
  the configs agree except for the RoPE scaling fields, and the rotary frequencies and
  attention factor those fields produce are identical (e.g. any ``factor=auto`` scaling at
  or below the original length, where the factor is 1)."""
  if _computation(run_config) != _computation(variant_config):
    return False
  tables = [(getattr(m.posenc, "inv_freq", None), getattr(m.posenc, "attention_factor", None))
            for m in (run_model, model)]
  return tables[0] == tables[1]


def program_key(config):
  """What fixes a model's compiled program: ``build_model`` reads only ``config.model`` and
  ``config.posenc`` (constants such as RoPE frequencies are static attributes derived from
  them); the seed, run name and data do not enter the program."""
  return json.dumps({"model": config.model.to_dict(), "posenc": config.posenc.to_dict()},
                    sort_keys=True, default=repr)


_PROGRAMS = collections.OrderedDict()  # (what, program_key, argument shapes) -> executable
_MAX_PROGRAMS = 64


def compiled_program(fn, args, key=None):
  """(executable, seconds spent compiling): ``fn`` lowered and compiled for ``args``; with a
  ``key`` (as ``program_key``, plus what ``fn`` computes) reused from an earlier call with
  the same key and argument shapes (0 seconds).
  Measured on a 2-core AVX2 EPYC: ~1 s per compile of the demo's 2-layer model (~0.2 s of it
  tracing and lowering), about as much again for a separate attention-statistics program."""
  full = key and (key, jax.tree.structure(args),
                  tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)))
  if full in _PROGRAMS:
    _PROGRAMS.move_to_end(full)
    return _PROGRAMS[full], 0.0
  t0 = time.perf_counter()
  executable = fn.lower(*args).compile()
  if full:
    _PROGRAMS[full] = executable
    while len(_PROGRAMS) > _MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return executable, time.perf_counter() - t0


def make_eval_fn(model, with_correct, stats_rows=0):
  """jit f(state, inputs, targets, positions) -> {"nll" [B,L], "entropy" [B,L],
  "correct" [B,L]?, "attn_entropy" / "attn_distance" [layers] of the first stats_rows
  windows?}."""
  graphdef, state = split_model(model)

  def f(state, inputs, targets, positions):
    m = nnx.merge(graphdef, state)
    hidden, stats = m.features(inputs, positions, with_stats=stats_rows)
    nll, ent = per_token(m, hidden, targets, nll_and_entropy)
    out = {"nll": nll, "entropy": ent}  # entropy of the predicted next-token distribution
    if stats_rows:
      out.update(_stacked(stats))
    if with_correct:  # synthetic vocabularies are small: full logits are cheap
      out["correct"] = jnp.argmax(m.logits(hidden), axis=-1) == targets
    return out

  return jit(f), state


def make_stats_fn(model):
  """jit f(state, inputs, positions) -> (entropy [layers], distance [layers]) (full attention)."""
  graphdef, state = split_model(model)

  def f(state, inputs, positions):
    _, stats = nnx.merge(graphdef, state).features(inputs, positions, with_stats=True)
    return _stacked(stats)

  return jit(f), state


def _stacked(stats):
  """Per-layer statistics -> {"attn_entropy" [layers], "attn_distance" [layers]}."""
  return {"attn_entropy": jnp.stack([s["entropy"] for s in stats]),
          "attn_distance": jnp.stack([s["distance"] for s in stats])}


def _stats_fields(stats, rows):
  return {k: [float(x) for x in stats[k]] for k in ("attn_entropy", "attn_distance")} | {
      "attn_windows": rows}


def stats_windows_of(batch, num_windows):
  """The windows of ``batch`` the statistics read: the first ``num_windows`` that score
  any token."""
  return int(min(num_windows, (np.asarray(batch["loss_mask"]).sum(1) > 0).sum()))


def fused_stats(model, length):
  """Whether the attention statistics come out of the evaluation program itself (the fused
  CPU kernel accumulates them in its pass: no program of their own to compile and run)."""
  return model.blocks[0].attn.uses_kernel(length, model.posenc)


STATS_MAX_BYTES = 1 << 30  # on the full path, statistics only where one layer's probabilities fit


def attention_stats(model, batch, num_windows, key=None):
  """Per-layer mean attention entropy (nats) and attended distance on the first windows
  (``key``: the model's ``program_key``, to reuse a compiled program)."""
  rows = stats_windows_of(batch, num_windows)
  _, length = batch["inputs"].shape
  attn = model.blocks[0].attn
  full = not (use_blockwise(attn.impl, length, attn.block_size, model.posenc)
              or attn.uses_kernel(length, model.posenc))
  if rows == 0 or (full and attn.num_heads * length ** 2 * 4 > STATS_MAX_BYTES):
    return {}  # the full path needs [h, L, L] probabilities (a 16k SmolLM2 window: 9 GB)
  fn, state = make_stats_fn(model)
  args = (state, batch["inputs"][:rows], batch["positions"][:rows])
  program, _ = compiled_program(fn, args, key and ("stats", key))
  return _stats_fields(jax.device_get(program(*args)), rows)


def _eval_args(state, batch):
  return state, batch["inputs"], batch["targets"], batch["positions"]


def evaluate(model, task, *, length, mode="nonoverlapping", stride=0, split="validation",
             batch_size=8, max_tokens=None, stats_windows=1, segment_len=0, key=None):
  """Row fields for ``model`` at ``length``; ValueError "unsupported" if positions overflow.

  key: the model's ``program_key`` (from the config it was built from), so that rows with
  the same program share one compile (``compile_s`` 0 when reused); None compiles anew.

  segment_len > 0 (text): the scored tokens are spread segments (``windows.eval_batches``),
  which are also the units of the standard error; otherwise each window is a unit.

  Attention statistics (``stats_windows`` > 0): of the first batch's first windows, from
  the evaluation program itself where the fused CPU kernel runs (``fused_stats``), else
  from a program of their own (``attention_stats``).
  """
  model.posenc.check_positions(length - 1)  # learned tables: raises before any compile
  stride = windows.resolve_stride(mode, length, stride)
  cluster = "segment" if segment_len and task.is_text else "window"
  acc, compiled, compile_s, run_s = Accumulator(length, cluster), None, 0.0, 0.0
  first, stats = None, {}
  for batch in windows.eval_batches(task, mode, split, length, stride, batch_size, max_tokens,
                                    segment_len):
    if compiled is None:
      first = batch
      rows = stats_windows_of(batch, stats_windows) if fused_stats(model, length) else 0
      fn, state = make_eval_fn(model, not task.is_text, rows)
      compiled, compile_s = compiled_program(fn, _eval_args(state, batch),
                                             key and (("eval", not task.is_text, rows), key))
    t0 = time.perf_counter()
    out = jax.device_get(compiled(*_eval_args(state, batch)))
    if getattr(task, "token_bytes", None) is not None:  # tokenized text: bits per byte
      batch = {**batch, "target_bytes": task.token_bytes[batch["targets"]]}
    if rows and not stats:  # the first batch's windows (the same ones at every length)
      stats = _stats_fields(out, rows)
    acc.add(batch, out)
    run_s += time.perf_counter() - t0
  row = acc.row(task.is_text)
  row.update(stats)
  if first is not None and stats_windows and not stats:
    t0 = time.perf_counter()
    row.update(attention_stats(model, first, stats_windows, key))
    row["stats_s"] = time.perf_counter() - t0
  row.update(stride=stride, compile_s=compile_s, run_s=run_s)
  return row
