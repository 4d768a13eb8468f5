"""Small building blocks with explicit control of matmul precision.

Parameters are float32. With ``dtype="bfloat16"`` matmul *inputs* are cast to
bfloat16 while products accumulate in float32 (``preferred_element_type``),
the usual mixed-precision recipe; everything else stays float32.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)}")
  return DTYPES[name]


class Dense(nnx.Module):
  """y = x @ W without bias, W ~ N(0, std^2); float32 output."""

  def __init__(self, din, dout, *, std=0.02, dtype="float32", rngs):
    self.kernel = nnx.Param(jax.nn.initializers.normal(std)(rngs.params(), (din, dout)))
    self.dtype = compute_dtype(dtype)

  def __call__(self, x):
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)


def make_norm(kind, dim, *, rngs):
  """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016), float32."""
  if kind == "rmsnorm":
    return nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)
  if kind == "layernorm":
    return nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
  raise ValueError(f"unknown norm {kind!r}; valid choices: rmsnorm, layernorm")


class MLP(nnx.Module):
  """SwiGLU (Shazeer 2020: (silu(x W_g) * x W_u) W_d) or GELU MLP."""

  def __init__(self, cfg, *, rngs):
    if cfg.mlp not in ("swiglu", "gelu"):
      raise ValueError(f"unknown mlp {cfg.mlp!r}; valid choices: swiglu, gelu")
    self.kind = cfg.mlp
    width = 2 * cfg.mlp_dim if cfg.mlp == "swiglu" else cfg.mlp_dim
    self.up = Dense(cfg.d_model, width, dtype=cfg.dtype, rngs=rngs)
    # GPT-2: residual projections scaled by 1/sqrt(2 * layers) at init
    self.down = Dense(cfg.mlp_dim, cfg.d_model, std=0.02 / math.sqrt(2 * cfg.num_layers),
                      dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x):
    h = self.up(x)
    if self.kind == "swiglu":
      gate, up = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * up
    else:
      h = jax.nn.gelu(h)
    return self.down(h)


def dropout(x, rate, rng):
  """Inverted dropout; identity when rng is None or rate == 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
