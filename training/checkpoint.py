"""Checkpoints (orbax) and run directories.

A run directory holds ``config.json`` (the resolved config, enough to rebuild
the model), ``checkpoints/<step>/`` and metrics. Orbax writes each checkpoint to
a temporary directory and renames it when complete, so a SIGKILL at any moment
leaves the previous checkpoints intact.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

import pretrained
from models import build_model
from training.optim import make_optimizer
from training.steps import split_model

# Fields that may change between a run and its resumption without mixing two
# experiments (bookkeeping only). Everything else must match.
BOOKKEEPING = ("log_every", "eval_every", "eval_tokens", "checkpoint_every", "keep_checkpoints",
               "num_train_steps", "data.data_dir", "mesh")


def config_path(workdir):
  return os.path.join(workdir, "config.json")


def is_run(path):
  """A lenx run directory (has config.json) or a pretrained checkpoint spec."""
  return pretrained.is_checkpoint(path) or os.path.exists(config_path(path))


def latest_step(workdir):
  """Latest checkpoint step of a run (0 for a pretrained checkpoint, None if none yet)."""
  return 0 if pretrained.is_checkpoint(workdir) else manager(workdir).latest_step()


def read_config(workdir):
  """The resolved config saved in a run directory, or a pretrained checkpoint's
  (``pretrained.read_config``); clear error if neither."""
  if pretrained.is_checkpoint(workdir):
    return pretrained.read_config(workdir)
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} is not a lenx run directory: no config.json there")
  with open(path) as f:
    saved = json.load(f)
  # Fields added to lenx after the run was made take their defaults.
  from configs.default import get_config
  config = get_config(f"posenc={saved['posenc']['name']}").to_dict()
  return ml_collections.ConfigDict(_merge(config, saved))


def _merge(base, override):
  out = dict(base)
  for k, v in override.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def write_config(workdir, config):
  os.makedirs(workdir, exist_ok=True)
  tmp = config_path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, config_path(workdir))


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
  return out


def config_differences(old, new):
  """Dotted keys whose values differ, ignoring BOOKKEEPING fields."""
  a = _flatten(json.loads(old.to_json_best_effort()))
  b = _flatten(json.loads(new.to_json_best_effort()))
  keep = lambda k: not any(k == f or k.startswith(f + ".") for f in BOOKKEEPING)
  return sorted(k for k in set(a) | set(b) if keep(k) and a.get(k) != b.get(k))


def check_compatible(workdir, config):
  """Raises if ``workdir`` holds a run of a different experiment."""
  if not os.path.exists(config_path(workdir)):
    return
  diffs = config_differences(read_config(workdir), config)
  if diffs:
    raise ValueError(
        f"workdir {workdir!r} holds a run with a different config ({', '.join(diffs)}); "
        "use a new --workdir, or the same config to resume")


def manager(workdir, keep=None):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(mngr, state):
  """Asynchronous save of the train state at its step (call mngr.wait_until_finished)."""
  mngr.save(int(state["step"]), args=ocp.args.StandardSave(state))


def restore(mngr, abstract_state, step=None):
  """Restores ``step`` (default latest) into the structure of ``abstract_state``."""
  step = mngr.latest_step() if step is None else step
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return mngr.restore(step, args=ocp.args.StandardRestore(target))


def load_run(workdir, step=None, *, with_step=False):
  """(config, model[, step]) from a run directory, parameters from its checkpoint (or from
  a pretrained checkpoint, step 0)."""
  if pretrained.is_checkpoint(workdir):
    return pretrained.load(workdir) + ((0,) if with_step else ())
  config = read_config(workdir)
  mngr = manager(workdir)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint under {workdir}/checkpoints")
  model = build_model(config)
  graphdef, params = split_model(model)
  tx = make_optimizer(config.optim, config.num_train_steps)
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params),
                                     "step": jnp.zeros((), jnp.int32)})
  step = mngr.latest_step() if step is None else step
  restored = restore(mngr, abstract, step)
  model = nnx.merge(graphdef, restored["params"])
  return (config, model, step) if with_step else (config, model)
