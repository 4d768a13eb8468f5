"""Helpers shared by config files: ``key=value`` arguments, derived fields, validation.

Validation runs before any compilation and names the valid choices, so a typo
costs a second, not a compile.
"""
import ml_collections

import input_pipeline
from input_pipeline import positions
import posenc
from models.layers import auto_dtype
from training.optim import check_schedule

SIZES = {  # num_layers, d_model, num_heads
    "tiny": (2, 128, 4),
    "small": (4, 256, 4),
    "base": (6, 384, 6),
}
MLPS, NORMS, DTYPES = (("swiglu", "gelu"), ("rmsnorm", "layernorm"),
                       ("float32", "bfloat16", "auto"))


def parse_args(arg, defaults):
  """'a=1,b=x' -> dict over ``defaults`` (values cast to the default's type)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value; valid keys: {', '.join(defaults)}")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid keys: {', '.join(defaults)}")
    out[key] = type(defaults[key])(value)
  return out


def normalize_argv(argv):
  """--max-tokens=1 -> --max_tokens=1 (the issues spell flags with dashes, absl with '_');
  ``--config...`` stays as written. For every script's ``app.run``."""
  out = []
  for a in argv:
    if a.startswith("--") and not a.startswith("--config"):
      name, eq, value = a[2:].partition("=")
      a = "--" + name.replace("-", "_") + eq + value
    out.append(a)
  return out


def _choice(what, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def _positive(config, *paths):
  for path in paths:
    node = config
    for part in path.split("."):
      node = node[part]
    if not node > 0:
      raise ValueError(f"config.{path} must be > 0, got {node}")


def resolve(config):
  """Validated copy with derived fields filled in (head_dim, mlp_dim)."""
  config = ml_collections.ConfigDict(config.to_dict())
  validate(config)
  m = config.model
  if m.dtype == "auto":  # resolved once here, so config.json records what ran
    m.dtype, m.dtype_auto = auto_dtype()
  if m.head_dim == 0:
    m.head_dim = m.d_model // m.num_heads
  if m.mlp_dim == 0:  # Llama: 8/3 d rounded up to a multiple of 16 (256 -> 688)
    m.mlp_dim = -(-(8 * m.d_model // 3) // 16) * 16 if m.mlp == "swiglu" else 4 * m.d_model
  name = config.posenc.name
  posenc.get(name).finalize_config(config.posenc[name], config)  # validates, fills derived fields
  positions.check_config(config)  # randomized positions fit the encoding's table
  return config


def validate(config):
  """Raises ValueError naming the bad field and the valid choices."""
  _choice("positional encoding", config.posenc.name, posenc.names())
  _choice("data source", config.data.name, input_pipeline.VALID_NAMES)
  positions.validate(config.positions, config.train_len)
  _choice("model.mlp", config.model.mlp, MLPS)
  _choice("model.norm", config.model.norm, NORMS)
  _choice("model.dtype", config.model.dtype, DTYPES)
  check_schedule(config.optim)
  _positive(config, "train_len", "batch_size", "num_train_steps", "model.num_layers",
            "model.d_model", "model.num_heads", "optim.learning_rate", "checkpoint_every",
            "eval_every", "log_every")
  if config.model.head_dim == 0 and config.model.d_model % config.model.num_heads:
    raise ValueError(f"model.d_model={config.model.d_model} is not divisible by "
                     f"model.num_heads={config.model.num_heads}; set model.head_dim explicitly")
  kv = config.model.num_kv_heads
  if kv < 0 or (kv and config.model.num_heads % kv):
    raise ValueError(f"model.num_kv_heads={kv} must divide model.num_heads="
                     f"{config.model.num_heads} (0 = num_heads)")
  if not 0.0 <= config.model.dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {config.model.dropout}")
  if config.model.get("mlp_chunk", 0) < 0:
    raise ValueError(f"model.mlp_chunk must be >= 0 (0 = the whole sequence at once), got "
                     f"{config.model.mlp_chunk}")
