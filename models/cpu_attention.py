"""Fused causal attention for XLA:CPU in float32 (and a bfloat16 forward): a C++ kernel
behind ``jax.ffi``.

Why: on a CPU without AVX-512 (AMD EPYC, avx2 + fma, 2 cores) XLA:CPU runs attention's
batched [s, d] x [d, s] dots at ~45 GFLOP/s (the dense layers' GEMMs reach ~130) and the
softmax, its backward and the causal mask as separate passes over [b, h, s, s]: forward +
backward of the attention core took ~30 % of a float32 train step at the peer's shape,
and attention is most of a 16k-token evaluation. ``kernels/causal_attention.cc`` computes
the same thing as FlashAttention-2 (Dao 2023, Alg. 1 and 2: online softmax over key
blocks, the row log-sum-exp saved, P recomputed in the backward) per (batch, head), with a
register-tiled matmul that skips every tile above the causal diagonal (half the FLOPs):
O(block) memory at any length, so it serves training and long evaluation alike. Same
inputs and outputs as ``attention.full_attend`` / ``blockwise_attend`` (q pre-scaled,
[b, s, h, d]); equal to them to float32 rounding (tests/test_cpu_attention.py).

bfloat16 (q, k, v in bf16, as a bf16 model prepares them): the forward multiplies bf16 pairs
with float32 accumulation (AMX tiles, TDPBF16PS, where the CPU has amx_bf16 and d % 32 ==
0; VDPBF16PS where it has AVX512_BF16; the same products widened to float32 elsewhere:
``amx()`` says which, ``LENX_CPU_AMX=0`` keeps the vector tiles), rounds P to bf16 for P V
as XLA's bf16 path does, and keeps the softmax and the output in float32; its gradient is
the float32 backward's at the bf16 inputs (the row log-sum-exp it uses is float32-exact:
the S products of bf16 values are exact in float32). Why: XLA:CPU's bf16 attention on the
AVX-512 + avx512_bf16 EPYC ran its tiles at ~200 GFLOP/s with the softmax in separate passes
over [s, s] blocks: most of SmolLM2's long-prompt time (benchmarks/README.md). On the AMX
Xeon XLA's bf16 dots run on AMX: the vector tiles' 16k evaluation step took 2.2x XLA's
there, the AMX tiles' 0.73x.

Where: ``use_kernel`` - CPU backend, one device (a custom call has no sharding rule),
float32 or bfloat16, self-attention with s and d multiples of 8, an encoding whose logits
are plain q.k (``enc.content_only``) or q.k plus a bias of the query - key distance that the kernel
forms itself from the positions (``enc.kernel_bias()``: ALiBi's slopes, T5's bucket
table; KERPLE's and Sandwich's tables over distances 0..s - 1, used while the positions span
less than s: ``attention.within_span``), or piecewise RoPE logits (Self-Extend, DCA, ReRoPE,
STRING, LM-Infinite, StreamingLLM: ``enc.has_kernel_pieces``; ``piecewise_attention``, forward
only: queries and keys rotated once per part, the part of each pair from its positions, a
tile of one part one product, a tile outside a Lambda mask skipped; XLA's blockwise path ran
these 2-4x slower, benchmarks/piecewise_speed.py). ``attention_with_stats`` also returns the attention
entropy and attended distance, accumulated online in the same pass (no gradient through
them). ``LENX_CPU_ATTENTION=auto|
kernel|xla``: auto = the kernel wherever it applies and builds: on every CPU class measured
(AMD EPYC with avx2 + fma, Zen 4 and Zen 5 with avx512f + avx512_bf16, Intel Xeon with AMX)
float32 train steps and 16k evaluation in the dtype ``auto`` picks there were faster with it,
the rest level but for float32 16k evaluation on Zen 5 (0.96x XLA's speed; paired A/Bs per
class in benchmarks/README.md). kernel = the same, a build failure an error; xla = never.
The library is compiled on first use with the system C++ compiler (``$CXX`` or g++, -O3
-march=native) into ``$LENX_KERNEL_CACHE`` (default ~/.cache/lenx/kernels), keyed by the
source, the jaxlib headers and this CPU's flags. Where it cannot be built, auto falls back
to XLA with one warning; kernel raises.
"""
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import cpu_flags, env_choice

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "causal_attention.cc")
CHOICES = ("auto", "kernel", "xla")
_TARGETS = {"forward": "LenxCausalAttentionForward", "backward": "LenxCausalAttentionBackward",
            "forward_stats": "LenxCausalAttentionForwardStats",
            "forward_bf16": "LenxCausalAttentionForwardBf16",
            "forward_stats_bf16": "LenxCausalAttentionForwardStatsBf16",
            "piecewise": "LenxPiecewiseAttentionForward",
            "piecewise_bf16": "LenxPiecewiseAttentionForwardBf16"}
DTYPES = (jnp.float32, jnp.bfloat16)  # of q, k, v


def _library_path():
  """Where this source, built for this CPU and these FFI headers, lives."""
  key = hashlib.sha256()
  for part in (open(SOURCE, "rb").read(), jax.ffi.include_dir().encode(), jax.__version__.encode(),
               " ".join(sorted(cpu_flags())).encode()):
    key.update(part)
  root = os.environ.get("LENX_KERNEL_CACHE", os.path.expanduser("~/.cache/lenx/kernels"))
  return os.path.join(root, key.hexdigest()[:16], "libcausal_attention.so")


def _build(path):
  """Compiles SOURCE into path (atomically: a half-written library is never loaded)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
  except (OSError, subprocess.CalledProcessError) as e:
    os.unlink(tmp)
    detail = getattr(e, "stderr", "") or str(e)
    raise RuntimeError(f"building the CPU attention kernel failed ({' '.join(cmd[:2])} ...): "
                       f"{detail.strip()[-2000:]}") from e
  os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def load():
  """Builds (once per source and CPU) and registers the FFI targets; raises on failure."""
  path = _library_path()
  if not os.path.exists(path):
    _build(path)
  lib = ctypes.cdll.LoadLibrary(path)
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"lenx_causal_attention_{name}",
                                jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path


@functools.lru_cache(maxsize=None)
def _available():
  try:
    load()
    return True
  except (RuntimeError, OSError) as e:
    warnings.warn(f"{e}\nfalling back to XLA's attention (LENX_CPU_ATTENTION=xla silences this)")
    return False


def amx():
  """Whether the bf16 forward multiplies with AMX tiles here: built for a CPU with amx_bf16,
  the tile registers granted by the OS, ``LENX_CPU_AMX`` not 0 (False where the kernel does
  not build)."""
  return _available() and bool(ctypes.cdll.LoadLibrary(load()).LenxCpuAmx())


def enabled(backend=None):
  """(bool, why): whether causal self-attention may run the kernel on this machine."""
  choice = env_choice("LENX_CPU_ATTENTION", CHOICES)
  if choice == "xla":
    return False, "LENX_CPU_ATTENTION=xla"
  if (backend or jax.default_backend()) != "cpu" or jax.device_count() != 1:
    return False, "not a single-device CPU backend"
  if choice == "kernel":
    load()  # a build failure is an error when asked for explicitly
    return True, "LENX_CPU_ATTENTION=kernel"
  if not _available():
    return False, "the kernel could not be built (see the warning)"
  return True, ("faster than XLA's attention in float32 on the CPUs measured (avx2; avx512f) "
                "and in bf16 (avx512_bf16; AMX tiles on amx_bf16)")


# The kernel's sequence length is a whole number of 8-row tiles; ``attention.attend`` pads
# a chunk of another length (a needle prompt ends wherever its answer starts).
SEQ_MULTIPLE = 8


def use_kernel(q, k, enc):
  """Whether ``attention.attend`` hands (q, k, v) to ``causal_attention`` (q, k: arrays or
  ``jax.ShapeDtypeStruct``s)."""
  s, d = q.shape[1], q.shape[3]
  shapes_fit = q.shape == k.shape and s % SEQ_MULTIPLE == 0 and d % 8 == 0
  plain = (enc.content_only or enc.kernel_bias(max_distance=s - 1) is not None
           or enc.has_kernel_pieces)
  return (shapes_fit and plain and q.dtype == k.dtype and q.dtype in DTYPES and enabled()[0])


def _threads():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _call(name, outputs, *args, **attrs):
  load()  # registers the targets (once) whoever calls first
  return jax.ffi.ffi_call(f"lenx_causal_attention_{name}", outputs, vmap_method="sequential")(
      *args, threads=np.int64(_threads()), **attrs)


def causal_attention(q, k, v, bias=None):
  """causal softmax(q k^T + bias) v for q, k, v [b, s, h, d] float32 or bfloat16 (one dtype;
  q pre-scaled) -> [b, s, h, d] float32. bias: None, or (q_pos, k_pos [b or 1, s] int, slopes
  [h] or None, table [h, T] or None) for bias_ij = -slopes_h |i - j| + table_h[clamp(i - j, 0, T - 1)]
  at the positions i, j of query and key (``PositionalEncoding.distance_bias``); slopes and
  table are differentiable."""
  return _attention(q, k, v, *_bias_operands(q, *(bias or (None,) * 4)))


def _bias_operands(q, q_pos, k_pos, slopes, table):
  """(q_pos, k_pos, slopes [h], table [h, T], parts) as the kernel reads them: positions
  [b, s] int32 (None: [1, 1] placeholders, the kernel reads no positions without a bias or
  statistics), zero arrays for the absent parts, and parts = 1 (slopes) | 2 (table)."""
  b, s, h, _ = q.shape
  parts = (slopes is not None) | 2 * (table is not None)
  if q_pos is None:
    q_pos = k_pos = jnp.zeros((1, 1), jnp.int32)
  else:
    q_pos, k_pos = (jnp.broadcast_to(p, (b, s)).astype(jnp.int32) for p in (q_pos, k_pos))
  slopes = jnp.zeros((h,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
  table = jnp.zeros((h, 1), jnp.float32) if table is None else table.astype(jnp.float32)
  return q_pos, k_pos, slopes, table, parts


def attention_with_stats(q, k, v, q_pos, k_pos, bias, rows):
  """(``causal_attention(q, k, v, ...)``, {"entropy", "distance"}): the mean attention
  entropy (nats) and attended distance |i - j| (positions) over the queries and heads of
  the first ``rows`` batch rows, as ``attention.attention_stats`` defines them; one pass of
  the kernel (the sums ride along the online softmax). bias: None or (slopes, table) as
  ``enc.kernel_bias()``. The output has ``causal_attention``'s gradient; the statistics
  are diagnostics, with none."""
  out, entropy, distance = _attention_stats(
      q, k, v, *_bias_operands(q, q_pos, k_pos, *(bias or (None, None))), rows)
  return out, {"entropy": jnp.mean(entropy[:rows]), "distance": jnp.mean(distance[:rows])}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_pos, k_pos, slopes, table, parts):
  return _forward(q, k, v, q_pos, k_pos, slopes, table, parts)[0]


def _target(name, q):
  """The handler of ``name`` for q's dtype."""
  return name + "_bf16" if q.dtype == jnp.bfloat16 else name


def _forward(q, k, v, q_pos, k_pos, slopes, table, parts):
  b, s, h, _ = q.shape
  out, lse = _call(_target("forward", q), (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                               jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
                   q, k, v, q_pos, k_pos, slopes, table, parts=np.int64(parts))
  return out, (q, k, v, out, lse, q_pos, k_pos, slopes, table)


def _backward(parts, res, g):
  q, k, v, out, lse, q_pos, k_pos, slopes, table = res
  dtype = q.dtype  # bf16 inputs: float32's backward at their values, cotangents cast back
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  b, _, h, _ = q.shape
  shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  per_row = (jax.ShapeDtypeStruct((b, h), jnp.float32),
             jax.ShapeDtypeStruct((b, h, table.shape[1]), jnp.float32))
  dq, dk, dv, dslopes, dtable = _call("backward", (shape, shape, shape) + per_row, q, k, v, out,
                                      lse, g.astype(jnp.float32), q_pos, k_pos, slopes, table,
                                      parts=np.int64(parts))
  dslopes = jnp.sum(dslopes, axis=0) if parts & 1 else jnp.zeros_like(slopes)
  dtable = jnp.sum(dtable, axis=0) if parts & 2 else jnp.zeros_like(table)
  dq, dk, dv = (t.astype(dtype) for t in (dq, dk, dv))
  return dq, dk, dv, None, None, dslopes, dtable


_attention.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention_stats(q, k, v, q_pos, k_pos, slopes, table, parts, rows):
  return _forward_stats(q, k, v, q_pos, k_pos, slopes, table, parts, rows)[0]


def _forward_stats(q, k, v, q_pos, k_pos, slopes, table, parts, rows):
  """(out, entropy [b, h, s], distance [b, h, s]) (zero past the first ``rows`` batch rows),
  and _forward's residuals."""
  b, s, h, _ = q.shape
  per_query = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  out, lse, entropy, distance = _call(
      _target("forward_stats", q), (jax.ShapeDtypeStruct(q.shape, jnp.float32), per_query, per_query,
                        per_query), q, k, v, q_pos, k_pos, slopes, table,
      parts=np.int64(parts), stats_rows=np.int64(rows))
  return (out, entropy, distance), (q, k, v, out, lse, q_pos, k_pos, slopes, table)


_attention_stats.defvjp(_forward_stats, lambda parts, rows, res, g: _backward(parts, res, g[0]))


def piecewise_attention(queries, keys, v, q_pos, k_pos, pieces, rows=0):
  """Causal attention whose logits are piecewise RoPE (``extensions.piecewise``): pair (i, j)
  gets part c's logit queries[part_q[c]][i] . keys[part_k[c]][j] or is masked, c from the
  positions by ``pieces`` = (part_q, part_k, div, sinks, near, sink): c = near[clamp(i // div
  - j // div, 0, T - 1)] (``sink`` for keys at positions < sinks; -1 = masked). queries /
  keys [P, b, s, h, d] (one dtype, q pre-scaled), v [b, s, h, d] -> (out [b, s, h, d]
  float32, {"entropy", "distance"} over the first ``rows`` batch rows, or None). Forward
  only (evaluation): no gradient rule; ``attention.attend`` wraps it in ``forward_only``."""
  part_q, part_k, div, sinks, near, sink = pieces
  b, s, h, _ = v.shape
  per_query = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  q_pos, k_pos = (jnp.broadcast_to(p, (b, s)).astype(jnp.int32) for p in (q_pos, k_pos))
  tables = [jnp.asarray(np.asarray(t, np.int32)) for t in (part_q, part_k, near, sink)]
  out, _, entropy, distance = _call(
      _target("piecewise", v), (jax.ShapeDtypeStruct(v.shape, jnp.float32), per_query,
                                per_query, per_query),
      queries, keys, v, q_pos, k_pos, *tables, div=np.int64(div), sinks=np.int64(sinks),
      stats_rows=np.int64(rows))
  if not rows:
    return out, None
  return out, {"entropy": jnp.mean(entropy[:rows]), "distance": jnp.mean(distance[:rows])}


if __name__ == "__main__":  # python -m models.cpu_attention: build now, print where
  print(load(), file=sys.stdout)
