"""Small building blocks with explicit control of matmul precision.

Parameters are float32. With ``dtype="bfloat16"`` matmul *inputs* are cast to
bfloat16 while products accumulate in float32 (``preferred_element_type``),
the usual mixed-precision recipe; everything else stays float32. ``mixed_dot``
keeps the backward matmuls in bfloat16 too (autodiff of a bf16 x bf16 -> f32
dot would multiply the f32 cotangent by an up-cast f32 weight: f32 speed), and its
hand-written backward also serves float32 (see ``_dot_bwd``).
"""
import functools
import math
import os
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.xla_ops import row_major

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _cpuinfo_field(name, path="/proc/cpuinfo"):
  """The first value of ``name`` in /proc/cpuinfo ('' where the file is absent, e.g. macOS)."""
  try:
    with open(path) as f:
      for line in f:
        if line.split(":", 1)[0].strip() == name:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


@functools.lru_cache(maxsize=None)
def cpu_flags(path="/proc/cpuinfo"):
  """The CPU feature flags (empty where /proc/cpuinfo is absent); read once per path,
  since every compiled step asks (``cpu_dots``)."""
  return frozenset(_cpuinfo_field("flags", path).split())


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description(path="/proc/cpuinfo"):
  """{"model": CPU model name (with its x86 family / model numbers), "flags": which of
  SPEED_FLAGS it has}: what a speed figure must name, since matmul speed (and whether bf16
  helps) depends on them. The numbers matter where the name does not tell CPU classes
  apart: a cloud VM's "AMD EPYC" is Zen 4 (family 25) or Zen 5 (family 26)."""
  flags = cpu_flags(path)
  model = _cpuinfo_field("model name", path) or platform.processor()
  family = _cpuinfo_field("cpu family", path)
  if family:
    model += f" (family {family} model {_cpuinfo_field('model', path)})"
  return {"model": model, "flags": [f for f in SPEED_FLAGS if f in flags]}


def auto_dtype(backend=None, flags=None):
  """("bfloat16" | "float32", why) for ``model.dtype = "auto"``: bf16 matmul inputs where
  the hardware multiplies bf16 natively (accelerators; CPUs with AMX-BF16 or AVX512-BF16),
  float32 elsewhere: without bf16 hardware XLA:CPU converts bf16 in software and the
  bf16 step is slower than float32 (issue 14: 0.52-0.56x vs 0.64x the peer on AVX2)."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "bfloat16", f"{backend} backend"
  native = sorted((cpu_flags() if flags is None else set(flags)) & {"amx_bf16", "avx512_bf16"})
  if native:
    return "bfloat16", "CPU has " + " and ".join(native)
  return "float32", "CPU has no bf16 matmul instructions (amx_bf16 / avx512_bf16)"


CPU_DOTS = ("auto", "ynnpack", "eigen")
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions: Eigen dots


def env_choice(name, choices):
  """The value of environment variable ``name`` (default choices[0]); anything not in
  ``choices`` is an error naming them."""
  value = os.environ.get(name, choices[0])
  if value not in choices:
    raise ValueError(f"{name}={value!r}; valid choices: {', '.join(choices)}")
  return value


def cpu_dots(backend=None, flags=None):
  """("ynnpack" | "eigen", why): which library runs XLA:CPU's dots in lenx's steps.
  XLA:CPU hands dots (and the elementwise work around them) to YNNPACK by default, whose
  kernels are built for AVX-512 / AMX. On a CPU without AVX-512 XLA's Eigen GEMMs are
  faster inside lenx's steps (AMD EPYC, avx2 + fma, 2 cores; paired A/B, both executables
  in one process, 24 interleaved steps, median ratio of step times Eigen / YNNPACK, see
  benchmarks/README.md): train at the peer's shape float32 0.84, bfloat16 0.72; the demo's
  shape float32 0.94; eval 16k float32 1.00. On the AVX-512 + AMX Xeon YNNPACK won in
  bf16 (Eigen 1.56x the time), so it stays there; on the AVX-512 + AVX512-BF16 EPYC (Zen 4,
  no AMX) too: bf16 (its ``auto``) Eigen 1.37x the time, float32 0.87x at the peer's shape
  and 0.99x at the demo's (the choice is per process, not per dtype). ``LENX_CPU_DOTS=ynnpack|eigen``
  overrides the choice (benchmarks A/B it that way)."""
  forced = env_choice("LENX_CPU_DOTS", CPU_DOTS)
  if (backend or jax.default_backend()) != "cpu":
    return "", "not a CPU backend"
  if forced != "auto":
    return forced, "LENX_CPU_DOTS"
  if "avx512f" in (cpu_flags() if flags is None else set(flags)):
    return "ynnpack", "CPU has avx512f (XLA:CPU's default)"
  return "eigen", "CPU has no avx512f: Eigen's GEMMs beat YNNPACK's there"


def jit(fn=None, **kwargs):
  """``jax.jit`` with the dot library of ``cpu_dots()`` (usable as a decorator, with or
  without jit's keyword arguments)."""
  if fn is None:
    return functools.partial(jit, **kwargs)
  return jax.jit(fn, compiler_options=EIGEN_DOTS if cpu_dots()[0] == "eigen" else None,
                 **kwargs)


def resolve_dtype(name):
  """(concrete dtype name, why): "auto" -> ``auto_dtype()``; float32 / bfloat16 as given
  (why ""); anything else a ValueError naming the valid choices."""
  if name == "auto":
    return auto_dtype()
  compute_dtype(name)
  return name, ""


def compute_dtype(name):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)}")
  return DTYPES[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(x, w, dtype):
  return _dot_fwd(x, w, dtype)[0]


def _dot_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  return jnp.dot(xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _dot_bwd(dtype, res, g):
  """dx = g W^T, dW = x^T g with g cast to the matmul dtype (bf16: Micikevicius et al.
  2018, mixed precision, activation gradients in half precision), products accumulated
  in f32. Written by hand for float32 too: autodiff's transpose of the dot (through the
  reshape of [b, s, d] to [b s, d]) makes XLA:CPU write every dW operand transposed,
  a copy per projection (measured, train step at the peer's shape: -25 %)."""
  xc, wc = res
  gc = g.astype(dtype)
  dx = jnp.dot(gc, wc.T, preferred_element_type=jnp.float32)
  xf, gf = xc.reshape(-1, xc.shape[-1]), gc.reshape(-1, gc.shape[-1])
  dw = jnp.dot(row_major(xf.T), gf, preferred_element_type=jnp.float32)  # x^T: bf16 needs a
  # real copy, or XLA:CPU runs the product in f32 on up-cast operands (posenc.xla_ops)
  return dx, dw  # float32, the primal dtype (mixed_dot passes float32 in)


_dot.defvjp(_dot_fwd, _dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_t(x, w, dtype):
  return _dot_t_fwd(x, w, dtype)[0]


def _dot_t_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  return jnp.einsum("...d,vd->...v", xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _dot_t_bwd(dtype, res, g):
  """As ``_dot_bwd`` for x W^T with W [dout, din] stored untransposed (tied head):
  dW = g^T x is computed in W's own layout. (Through ``mixed_dot(x, W.T)``, XLA:CPU fused
  the transpose of x^T g into the dot's output layout, which its bf16 GEMMs do not
  support: 'Unsupported element type for DotThunk: BF16 x BF16 = F32' at run time.)"""
  xc, wc = res
  gc = g.astype(dtype)
  dx = jnp.dot(gc, wc, preferred_element_type=jnp.float32)
  xf, gf = xc.reshape(-1, xc.shape[-1]), gc.reshape(-1, gc.shape[-1])
  dw = jnp.dot(row_major(gf.T), xf, preferred_element_type=jnp.float32)  # [dout, din]
  return dx, dw


_dot_t.defvjp(_dot_t_fwd, _dot_t_bwd)


def mixed_dot_t(x, w, dtype):
  """x [..., din] @ w^T for w [dout, din] (e.g. a tied embedding) -> float32."""
  return _dot_t(x.astype(jnp.float32), w.astype(jnp.float32), dtype)


def mixed_dot(x, w, dtype):
  """x [..., din] @ w [din, dout] -> float32, inputs in ``dtype`` (jnp.float32 or bfloat16)."""
  return _dot(x.astype(jnp.float32), w.astype(jnp.float32), dtype)


class Dense(nnx.Module):
  """y = x @ W without bias, W ~ N(0, std^2); float32 output."""

  def __init__(self, din, dout, *, std=0.02, dtype="float32", rngs):
    self.kernel = nnx.Param(jax.nn.initializers.normal(std)(rngs.params(), (din, dout)))
    self.dtype = compute_dtype(dtype)

  def __call__(self, x):
    return mixed_dot(x, self.kernel[...], self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
  """Zhang & Sennrich 2019, eq. 4: x / sqrt(mean(x^2) + eps) * scale (float32)."""
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * r * scale, (x, r, scale)


def _rms_norm_bwd(eps, res, g):
  """With x^ = x r and gs = g * scale: dx = r (gs - x^ mean(gs x^)), dscale = sum g x^
  (d r / d x = -r^3 x / n). One pass each, where autodiff keeps the broadcast scale
  and the reciprocal's chain as separate [b, s, d] tensors."""
  del eps
  x, r, scale = res
  xhat, gs = x * r, g * scale
  dx = r * (gs - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  dscale = jnp.sum((g * xhat).reshape(-1, x.shape[-1]), axis=0)
  return dx, dscale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
  """RMSNorm with the fused backward above; same parameter (``scale``) as nnx.RMSNorm,
  so checkpoints of either load into the other."""

  def __init__(self, dim, *, epsilon=1e-6, rngs):
    rngs.params()  # drawn (unused) like nnx.RMSNorm, so a seed gives the same model as before
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.epsilon = epsilon

  def __call__(self, x):
    return rms_norm(x.astype(jnp.float32), self.scale[...], self.epsilon)


def make_norm(kind, dim, *, eps=1e-6, rngs):
  """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016), float32."""
  if kind == "rmsnorm":
    return RMSNorm(dim, epsilon=eps, rngs=rngs)
  if kind == "layernorm":
    return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
  raise ValueError(f"unknown norm {kind!r}; valid choices: rmsnorm, layernorm")


@jax.custom_vjp
def swiglu(h):
  """Shazeer 2020, eq. 6 (FFN_SwiGLU before W2): silu(gate) * up, h = [gate, up] (last axis)."""
  gate, up = jnp.split(h, 2, axis=-1)
  return jax.nn.silu(gate) * up


def _swiglu_fwd(h):
  return swiglu(h), h


def _swiglu_bwd(h, g):
  """d gate = g up s (1 + gate (1 - s)), d up = g silu(gate), s = sigmoid(gate): one
  fused pass that writes the [gate, up] cotangent the up-projection's backward reads."""
  gate, up = jnp.split(h, 2, axis=-1)
  sig = jax.nn.sigmoid(gate)
  return (jnp.concatenate([g * up * sig * (1.0 + gate * (1.0 - sig)), g * gate * sig], axis=-1),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
      h = swiglu(h)
    else:
      h = jax.nn.gelu(h)
    return self.down(h)


def late_zeros(like, shape, dtype):
  """Zeros of ``shape`` computed from ``like``'s data (times zero), so that XLA creates them
  once ``like`` exists. Why: zeros that depend on nothing (a loop's initial buffers) were
  created by XLA:CPU's scheduler at the start of the program, those of every layer alive at
  once (SmolLM2 at 32k tokens: 30 x 72 MB of blockwise attention outputs in 3.0 GB of
  scratch; 2.9 -> 0.7 GB with this and ``map_chunks``)."""
  zero = jnp.nan_to_num(like.reshape(-1)[0].astype(jnp.float32) * 0)  # a NaN or inf stays local
  return jnp.broadcast_to(zero.astype(dtype), shape)


def scan_blocks(fn, init, n, like):
  """``lax.scan(fn, init, arange(n))`` with fn(i, carry) -> (carry, y): (carry, ys stacked
  [n, ...]), the ys' buffers ``late_zeros`` of ``like`` (every slot is overwritten)."""
  shapes = jax.eval_shape(lambda c: fn(0, c)[1], init)
  ys = jax.tree.map(lambda a: late_zeros(like, (n, *a.shape), a.dtype), shapes)

  def put(i, state):
    carry, y = fn(i, state[0])
    return carry, jax.tree.map(lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                               state[1], y)
  return jax.lax.fori_loop(0, n, put, (init, ys))


def map_blocks(fn, n, like):
  """``lax.map(fn, arange(n))`` with the outputs' buffers ``late_zeros`` of ``like``."""
  return scan_blocks(lambda i, carry: (carry, fn(i)), (), n, like)[1]


# Positions per chunk of norm + MLP in long sequences (``config.model.mlp_chunk``): past
# 4096 the chunks' matmuls are as fast as one (peer shape at 16k: 4441-4683 tokens/s before,
# 4349-5272 after) and nothing at or below the demo's longest 4096 changes.
MLP_CHUNK = 4096


def map_chunks(fn, x, chunk):
  """fn(x) for a per-position fn of x [b, s, d], computed ``chunk`` positions at a time (one
  chunk's intermediates live at once, ``map_blocks``) when s > chunk; chunk 0 = all at
  once. Why: in a long evaluation the MLP's [b, s, 2 * mlp_dim] float32 hidden states were
  the largest buffers left once attention ran in blocks."""
  b, s, d = x.shape
  if not chunk or s <= chunk:
    return fn(x)
  n = -(-s // chunk)
  xs = jnp.pad(x, ((0, 0), (0, n * chunk - s), (0, 0))).reshape(b, n, chunk, d)
  y = map_blocks(lambda i: fn(xs[:, i]), n, x)  # [n, b, chunk, d_out]
  return jnp.swapaxes(y, 0, 1).reshape(b, n * chunk, -1)[:, :s]


def dropout(x, rate, rng):
  """Inverted dropout; identity when rng is None or rate == 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
