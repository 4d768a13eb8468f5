"""The demo study: small byte-level models on the shipped books at train_len 128, one run
group per encoding family, each trained with several seeds under ONE shared recipe, then
evaluated from 64 to 4096 tokens (32x) with the RoPE extension variants and a Position
Interpolation fine-tune.

  python demo.py                                   # quick study (27-30 min, 2-core CPU)
  python demo.py --full                            # every registered family (hours on CPU)
  python eval_extrapolate.py --config=configs/sweep_demo.py   # evaluate existing runs only

Arguments: none = the quick demo; "full" = every family; "smoke" = the micro version the
tests run (2 runs x 2 seeds x 2 lengths x 2 variants + a fine-tune, 3 training steps).

Top-level fields are the eval_extrapolate options; ``train`` is read by demo.py only:
``train.runs`` maps a run group (its seeds live in ``<runs_dir>/<group>-s<seed>``) to the
config argument string of configs/default.py plus ``overrides`` ("a.b=v;c=w", applied
with the type of the default). ``train.finetunes`` maps a group to (source group,
configs/finetune.py arguments): one fine-tune per seed of the source.

The recipe (results/demo/README.md has the measurements behind each value): every family
shares model size, data, steps, batch, learning-rate schedule and initialisation; the only
per-family settings are those of the family's own paper (none in the quick demo).
"""
import ml_collections

import posenc

QUICK_RUNS = {
    "nope": ("posenc=nope", ""),
    "sinusoidal": ("posenc=sinusoidal", ""),
    "learned": ("posenc=learned", ""),
    "rope": ("posenc=rope", ""),
    "alibi": ("posenc=alibi", ""),
    "t5_bias": ("posenc=t5_bias", ""),
}
EXTRA_FULL_RUNS = {  # the full study adds every other registered family
    "rope_randomized": ("posenc=rope", "positions.kind=randomized;positions.max_len=4096"),
}
FINETUNES = {"rope-pi512": ("rope", "train_len=512,variant=linear")}
SMOKE_RUNS = {
    "rope": ("posenc=rope", ""),
    "alibi_passkey": ("posenc=alibi,data=passkey", "data.num_eval_sequences=8"),
}


def full_runs():
  """Every registered encoding (one group each) plus the extra runs."""
  runs = {name: (f"posenc={name}", "") for name in posenc.names()}
  runs.update(QUICK_RUNS)
  runs.update(EXTRA_FULL_RUNS)
  return runs


def _runs(spec):
  return ml_collections.ConfigDict(
      {name: dict(args=args, overrides=overrides) for name, (args, overrides) in spec.items()})


def _finetunes(spec, steps):
  return ml_collections.ConfigDict(
      {name: dict(source=src, args=f"{args},steps={steps}") for name, (src, args) in spec.items()})


KINDS = ("quick", "full", "needle", "smoke", "needle_smoke")
# The retrieval recipe (issue 13; results/needle_demo/README.md has the measurements): an
# induction warm-up (repeated random spans only) before the needle mixture; without it no
# 2-layer byte model here learnt to copy a pass key (answer NLL stayed at ln 10).
NEEDLE_MIXTURE = "data.repeat_warmup_steps={warm};data.needle_fraction=0.25;data.repeat_fraction=0.25"


def get_config(arg=None):
  kind = arg or "quick"
  if kind not in KINDS:
    raise ValueError(f"unknown sweep_demo argument {arg!r}; valid choices: {', '.join(KINDS[1:])}")
  smoke = kind.endswith("smoke")
  root = {"quick": "demo", "full": "demo_full", "needle": "demo_needle_seeds",
          "smoke": "/tmp/lenx_demo_smoke", "needle_smoke": "/tmp/lenx_needle_smoke"}[kind]
  c = ml_collections.ConfigDict()
  c.runs = f"{root}/runs/*" if smoke else f"runs/{root}/*"
  c.lengths = "16,32" if smoke else "64,128,256,512,1024,2048,4096"
  # Llama-3 scaling and the 2024 methods (extensions/) are in the full study only (budget).
  c.variants = "none,linear" if smoke else (
      "none,linear,ntk,dynamic,yarn" + (",llama3,ntk_by_parts,self_extend,rerope" if kind == "full"
                                        else ""))
  c.mode = "nonoverlapping"
  c.stride = 0
  c.split = "test"
  c.max_tokens = 1024 if smoke else 131072  # scored tokens per length
  c.sample = "spread"  # max_tokens // 4096 segments spread over the test books, same at every length
  c.batch_size = 0  # 0: evaluation.sweep.DEFAULT_BATCH_TOKENS (4096) per batch
  c.stats_windows = 1  # windows for the attention entropy / distance diagnostics
  c.out = f"{root}/results" if smoke else f"results/{root}"

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.runs_dir = f"{root}/runs" if smoke else f"runs/{root}"
  t.runs = _runs(SMOKE_RUNS if smoke else (full_runs() if kind == "full" else QUICK_RUNS))
  t.seeds = "0,1" if smoke else "0,1,2"  # every run group is trained once per seed
  t.train_len = 16 if smoke else 128
  t.num_layers, t.d_model, t.num_heads = (1, 32, 2) if smoke else (2, 128, 4)
  # The shared recipe (results/demo/README.md, "Why families lagged"): 1.43M training
  # tokens per run as before, in 2800 steps of 4 x 128 instead of 350 of 32 x 128. Adam
  # moves a parameter by at most ~lr per step, so the position signals that start at zero
  # (T5 buckets, learned rows) were capped by sum(lr) = 0.57 (T5 bias range +-0.5 after
  # 350 steps); 8x the steps gives them room (T5 2.271 -> 1.735 nats, rope 1.802 -> ...).
  t.batch_size = 4
  t.num_train_steps = 3 if smoke else 2800
  t.warmup_steps = 1 if smoke else 400
  t.learning_rate = 3e-3
  t.dtype = "float32" if smoke else "auto"  # bf16 where the CPU/accelerator has bf16 matmuls
  t.eval_tokens = 256 if smoke else 16384  # validation at the end of training only
  t.finetunes = _finetunes({"rope-pi32": ("rope", "train_len=32,variant=linear")} if smoke
                           else FINETUNES, 2 if smoke else 400)
  # Steady training tokens/s of rope at this recipe (4 x 128, 2 layers, d_model 128) and
  # each family's speed relative to it, measured with benchmarks/encodings.py
  # (--steps=300; families within ~10 % of rope are left at 1.0, the box's noise). bf16:
  # 2-core Xeon with AMX-BF16, 2026-11-30 (where `auto` picks bf16). float32: 2-core AMD
  # EPYC with AVX2 only, 2026-12-01 (where `auto` picks float32; the Xeon ran f32 at 38.6k),
  # re-measured there with the fused CPU attention kernel (two 300-step runs per family, the
  # box's noise +-15 %): rope 22.1k, alibi 0.89x, nope 0.93x, learned 0.97x, sinusoidal
  # 0.88x, t5_bias 0.83x, so float32 plans with the six families' mean, 20.2k.
  # The fixed cost of a run (compile, validation, checkpoint): make demo trained 1.43M
  # tokens in 37-52 s.
  t.tokens_per_s = ml_collections.ConfigDict({"bfloat16": 60000.0, "float32": 20200.0})
  # On a CPU the runs train side by side, one process pinned to each core
  # (training/workers.py): a step this small does not use two threads well. Per core,
  # float32 on the EPYC (throughput.py at this recipe, rope, 300 steps): 15.7-17.0k alone,
  # 15.9k + 17.5k for two at once; the plan uses 16.0k x the families' 0.91 mean = 14.6k.
  # bf16 per core: two pinned processes at once on a 2-core AMD EPYC with avx512_bf16 (Zen 4,
  # no AMX; throughput.py at this recipe, rope, 300 steps, 2026-12-02): 36.6k + 36.6k (33.5k
  # alone); one process on both cores there: rope 44.9k, the six quick families 0.96-1.07x
  # of it (encodings.py). Not measured per core on the AMX Xeon.
  t.core_tokens_per_s = ml_collections.ConfigDict({"bfloat16": 36000.0, "float32": 14600.0})
  # Training: 0 = one run per CPU core at a time, each in a worker process pinned to its
  # core (training/workers.py: 1.6x the training throughput of one process on the 2-core
  # EPYC; make demo's training there 24.9 -> 18.6 min, 16.5 once each worker stayed up for
  # its core's next run and every program was cached); 1 = one run at a time in this
  # process (always so on an accelerator). Evaluation stays in this process: one worker per
  # core made the demo's evaluation only 1.1x faster in row time and no faster end to end
  # (14.9 -> 14.6 min; each row on one core took 1.8x as long as on two), not worth it.
  t.workers = 0
  t.speed_vs_rope = ml_collections.ConfigDict(
      {"cope": 0.28, "fire": 0.28, "shaw": 0.7, "transformer_xl": 0.55})
  # A run's fixed cost in a worker (compile, validation, checkpoint): make demo on the EPYC
  # (2026-12-02, empty compile cache) took 105.8 s per 2800-step run for 98 s of steps,
  # ~13 s for a family's first run (its compiles), ~3 s for the next seeds (cached).
  t.run_overhead_s = 8.0
  t.overrides = ""  # applied to every run after its own overrides
  if kind.startswith("needle"):
    _needle_study(c, smoke)
  return c


def _needle_study(c, smoke):
  """The retrieval study (``python demo.py --needle``): the quick demo's families, three
  seeds, trained with the needle mixture (an induction warm-up of 4800 steps of 16 windows,
  then 3200 steps of the mixture), then the needle grid instead of perplexity. Results:
  results/needle_demo_seeds (results/needle_demo: the first, one-seed study, warm-up 2400).

  Why 4800: with 2400 warm-up steps RoPE formed its induction head in 1 seed of 3 (seed 0,
  the first study's); with 4800 in all three (at ~1900, ~2300 and ~4500 steps;
  results/needle_demo/README.md, evaluation.heads)."""
  t = c.train
  t.seeds = "0,1" if smoke else "0,1,2"
  t.train_len = 64 if smoke else 128  # a needle example takes 46 bytes
  t.batch_size = 2 if smoke else 16
  t.num_train_steps = 4 if smoke else 8000
  t.overrides = NEEDLE_MIXTURE.format(warm=2 if smoke else 4800)
  # measured in the study (bf16, 2-core Intel Xeon with avx512_bf16 + amx_bf16): 5600 x 16 x
  # 128 tokens in 274-328 s per run; float32
  # scaled by the quick recipe's float32 / bf16 ratio (not measured at this batch)
  t.tokens_per_s = ml_collections.ConfigDict({"bfloat16": 40000.0, "float32": 25700.0})
  # per core, float32, the EPYC (throughput.py, batch 16, rope): 20.7k tokens/s in one
  # process on both cores, 13.5k + 13.6k for two pinned processes; bf16 scaled by 13.5 / 20.7
  t.core_tokens_per_s = ml_collections.ConfigDict({"bfloat16": 26000.0, "float32": 13500.0})
  t.finetunes = ml_collections.ConfigDict()
  if smoke:
    t.runs = _runs({"rope": ("posenc=rope", ""), "alibi": ("posenc=alibi", "")})
  c.out = "/tmp/lenx_needle_smoke/results" if smoke else "results/needle_demo_seeds"
  c.task = "needle"
  c.needle = ml_collections.ConfigDict(dict(
      lengths="x1,x2" if smoke else "grid", depths="0,1" if smoke else "0,0.5,1",
      trials=2 if smoke else 20, distractors=9, variants="none,yarn", split="test", seed=0,
      dtype=""))
