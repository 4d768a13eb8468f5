"""XLA's scratch memory of one train or eval step, read from the compiled program (compile
only, nothing runs, so it is exact and needs no quiet machine): what a long window costs
beyond the parameters, and where a change of the model code moves it.

  python benchmarks/step_memory.py --mode eval --seq-len 16384               # peer's shape "A"
  python benchmarks/step_memory.py --model pretrained:smollm2-135m --seq-len 32768
  python benchmarks/step_memory.py --mode train --seq-len 8192 --batch 1 --dtype bfloat16
  python benchmarks/step_memory.py --model pretrained:smollm2-135m --mode train --batch 1 \
      --seq-len 16384 --remat                                               # the PI / YaRN fine-tune

Prints one JSON line: temp (scratch) and argument MiB, plus what was compiled. Peak RSS of
a real run is about the process's baseline (~0.2 GB for jax) + arguments + temp.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import throughput  # noqa: E402
from models import build_model  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.steps import make_eval_step, make_train_step, split_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--model", default="peer", help="peer (throughput.py's shape flags) or a "
                 "pretrained spec, e.g. pretrained:smollm2-135m")
  p.add_argument("--mlp-chunk", type=int, default=None, help="override model.mlp_chunk")
  p.add_argument("--remat", action="store_true", help="model.remat=True (long fine-tunes)")
  a, rest = p.parse_known_args(argv)
  a.shape = throughput.parse_args(rest)  # --mode, --seq-len, --batch, --dtype, --layers, ...
  return a


def model_config(a):
  if a.model == "peer":
    config = throughput.lenx_config(a.shape)
  else:
    import pretrained
    config = pretrained.read_config(a.model)
    config.model.dtype = throughput.lenx_config(a.shape).model.dtype  # resolved --dtype
  if a.mlp_chunk is not None:
    config.model.mlp_chunk = a.mlp_chunk
  config.model.remat = a.remat or config.model.get("remat", False)
  return config


def compiled_step(config, batch, seq_len, mode="eval"):
  """The jitted train or eval step of ``config``, lowered with abstract parameters and a
  [batch, seq_len] batch, compiled (nothing runs)."""
  graphdef, params = split_model(nnx.eval_shape(lambda: build_model(config)))
  ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  data = {"inputs": ids, "targets": ids, "positions": ids,
          "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}
  if mode == "eval":
    return make_eval_step(graphdef).lower(params, data).compile()
  tx = make_optimizer(config.optim, config.num_train_steps)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  return make_train_step(graphdef, tx, config.seed).lower(state, data).compile()


def main(argv=None):
  a = parse_args(argv)
  config = model_config(a)
  mem = compiled_step(config, a.shape.batch, a.shape.seq_len, a.shape.mode).memory_analysis()
  mib = lambda n: round(n / 2 ** 20, 1)
  print(json.dumps({
      "model": a.model, "mode": a.shape.mode, "seq_len": a.shape.seq_len, "batch": a.shape.batch,
      "dtype": config.model.dtype, "layers": config.model.num_layers,
      "mlp_chunk": config.model.get("mlp_chunk"), "remat": config.model.get("remat", False),
      "temp_mib": mib(mem.temp_size_in_bytes), "argument_mib": mib(mem.argument_size_in_bytes),
      "jax": jax.__version__}))


if __name__ == "__main__":
  sys.exit(main())
