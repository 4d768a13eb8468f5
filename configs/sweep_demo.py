"""The demo sweep: small byte-level models on the shipped books at train_len 128, one per
encoding family, evaluated from 64 to 4096 tokens (32x) with the RoPE variants.

  python demo.py                                              # train (or reuse) + evaluate
  python eval_extrapolate.py --config=configs/sweep_demo.py   # evaluate existing runs only
  python eval_extrapolate.py --config=configs/sweep_demo.py:smoke --out=/tmp/x

Argument "smoke": the micro version the end-to-end test runs (2 runs x 2 lengths x 2
variants, 3 training steps, tiny model; one run is synthetic so every figure is drawn).

Top-level fields are the eval_extrapolate options; ``train`` is read by demo.py only:
``train.runs`` maps a run name (its directory under ``train.runs_dir``) to the config
argument string of configs/default.py plus ``overrides`` ("a.b=v;c=w", applied with the
type of the default).
"""
import ml_collections

# Encoding families of the demo; a name not registered yet is skipped by demo.py.
DEMO_RUNS = {
    "nope": ("posenc=nope", ""),
    "sinusoidal": ("posenc=sinusoidal", ""),
    "learned": ("posenc=learned", ""),
    "rope": ("posenc=rope", ""),
    "alibi": ("posenc=alibi", ""),
    "t5_bias": ("posenc=t5_bias", ""),
    "kerple_log": ("posenc=kerple_log", ""),
    "fire": ("posenc=fire", ""),
    "rope_randomized": ("posenc=rope", "positions.kind=randomized;positions.max_len=4096"),
}
SMOKE_RUNS = {
    "rope": ("posenc=rope", ""),
    "alibi_passkey": ("posenc=alibi,data=passkey", "data.num_eval_sequences=8"),
}


def _runs(spec):
  return ml_collections.ConfigDict(
      {name: dict(args=args, overrides=overrides) for name, (args, overrides) in spec.items()})


def get_config(arg=None):
  smoke = arg == "smoke"
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown sweep_demo argument {arg!r}; valid choices: smoke")
  c = ml_collections.ConfigDict()
  c.runs = "/tmp/lenx_demo_smoke/runs/*" if smoke else "runs/demo/*"
  c.lengths = "16,32" if smoke else "64,128,256,512,1024,2048,4096"
  c.variants = "none,linear" if smoke else "none,linear,ntk,dynamic,yarn,llama3"
  c.mode = "nonoverlapping"
  c.stride = 0
  c.split = "test"
  c.max_tokens = 1024 if smoke else 16384  # scored tokens per length (whole windows)
  c.batch_size = 0  # 0: 32768 tokens per batch
  c.stats_windows = 1  # windows for the attention entropy / distance diagnostics
  c.out = "/tmp/lenx_demo_smoke/results" if smoke else "results/demo"

  c.train = ml_collections.ConfigDict()
  c.train.runs_dir = "/tmp/lenx_demo_smoke/runs" if smoke else "runs/demo"
  c.train.runs = _runs(SMOKE_RUNS if smoke else DEMO_RUNS)
  c.train.train_len = 16 if smoke else 128
  c.train.num_layers, c.train.d_model, c.train.num_heads = (1, 32, 2) if smoke else (2, 128, 4)
  c.train.batch_size = 4 if smoke else 32
  c.train.num_train_steps = 3 if smoke else 350
  c.train.warmup_steps = 1 if smoke else 50
  c.train.eval_tokens = 256 if smoke else 16384  # validation at the end of training only
  c.train.tokens_per_s = 14000.0  # measured training throughput of the demo model (2-core CPU)
  return c
