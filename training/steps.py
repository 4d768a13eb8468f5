"""Pure, jit-compiled train and eval steps over (graphdef, params) pytrees.

The model is split once into a static graphdef and a pure dict of parameters;
steps merge them inside jit, so the compiled function sees only arrays and the
training state can be donated (updated in place).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.layers import jit
from models.loss import masked_mean, token_nll


def split_model(model):
  """(graphdef, pure-dict params) of an nnx model.

  All state must be trainable ``nnx.Param``: the optimizer updates everything in
  params. Constants (RoPE frequencies, ...) belong in static Python attributes.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise TypeError("model holds non-Param arrays, which training would update: "
                    f"{list(nnx.to_pure_dict(rest))}; store constants as tuples/floats")
  return nnx.split(model)[0], nnx.to_pure_dict(params)


def batch_nll(graphdef, params, batch, dropout_rng=None):
  """Per-token NLL [b, s] of a batch."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.features(batch["inputs"], batch["positions"], dropout_rng=dropout_rng)
  return token_nll(model, hidden, batch["targets"])


def make_train_step(graphdef, tx, seed):
  """step(state, batch) -> (state, metrics); state = {"params", "opt_state", "step"}."""

  def loss_fn(params, batch, rng):
    nll = batch_nll(graphdef, params, batch, rng)
    return masked_mean(nll, batch["loss_mask"])

  @jit(donate_argnums=0)
  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])  # dropout = f(seed, step)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_step(graphdef):
  """eval(params, batch) -> {"nll_sum", "tokens"} (host divides: exact token weighting)."""

  @jit
  def eval_step(params, batch):
    nll = batch_nll(graphdef, params, batch)
    mask = batch["loss_mask"]
    return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}

  return eval_step
