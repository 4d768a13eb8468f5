"""RoPE inverse frequencies with context-extension scaling, numerically matching Hugging Face.

Pure numpy math; registers nothing (``posenc/rope.py`` re-exports :func:`rope_frequencies`).

Reference: transformers **5.24.0** ``modeling_rope_utils.py`` (``ROPE_INIT_FUNCTIONS`` and, for
``default``, ``GPTNeoXRotaryEmbedding.compute_default_rope_parameters``); the fixture
``tests/fixtures/hf_rope_reference.json`` was generated from that version.

``scaling`` is an HF ``rope_scaling`` / ``rope_parameters`` dict.  Conventions (see ``_SPEC``):
the legacy key ``type`` is accepted for ``rope_type``; keys whose value is ``None`` count as absent
(HF reads optional keys with ``.get``); ``rope_theta`` inside the dict overrides ``base`` (in HF 5.x
``rope_parameters["rope_theta"]`` is the source of truth); ``partial_rotary_factor`` is accepted by
every type and gives ``rotary_dim = int(head_dim * partial_rotary_factor)`` as in HF.

Rounding: HF raises ``base`` to the float32 exponent ``arange(0, d, 2) / d``; the rounding of that
exponent is amplified by ``ln(base)`` when rotary_dim is not a power of two, so we reproduce the
float32 exponent exactly, do everything else in float64 and cast the result to float32 once
(max relative difference to HF over the fixture: 4.5e-7, from HF's float32 YaRN/llama3 blends).
"""
import math
import numbers

import numpy as np

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")

# rope_type -> (required keys, optional keys); ``_COMMON`` keys are optional for every type.
_SPEC = {
  "default": ((), ()),
  "linear": (("factor",), ()),
  "ntk": (("factor",), ()),
  "dynamic": (("factor",), ()),
  "yarn": (("factor",), ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                           "mscale_all_dim", "attention_factor", "truncate")),
  "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
  "longrope": (("short_factor", "long_factor"),
                 ("factor", "attention_factor", "original_max_position_embeddings")),
}
_COMMON = ("partial_rotary_factor", "rope_theta")
# (larger key, smaller key) pairs that must be strictly ordered; defaults as HF (YaRN paper: 32 / 1).
_ORDERED = {"yarn": ("beta_fast", "beta_slow"), "llama3": ("high_freq_factor", "low_freq_factor")}
_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "truncate": True, "partial_rotary_factor": 1.0}


def _is_num(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _factor_list(v):
  return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_num(x) and x > 0 for x in v)


# key -> (predicate, description used in the error message)
_CHECKS = {
  "factor": (lambda v: _is_num(v) and v >= 1, "a number >= 1"),
  "partial_rotary_factor": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
  "rope_theta": (lambda v: _is_num(v) and v > 1, "a number > 1"),
  "original_max_position_embeddings": (
    lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0, "a positive int"),
  "beta_fast": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "beta_slow": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "mscale": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
  "mscale_all_dim": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
  "attention_factor": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "truncate": (lambda v: isinstance(v, bool), "a bool"),
  "low_freq_factor": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "high_freq_factor": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "short_factor": (_factor_list, "a non-empty list of numbers > 0"),
  "long_factor": (_factor_list, "a non-empty list of numbers > 0"),
}


def _rotary_dim(head_dim, partial_rotary_factor):
  if not isinstance(head_dim, numbers.Integral) or isinstance(head_dim, bool) or head_dim <= 0:
    raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
  dim = int(head_dim * partial_rotary_factor)
  if dim < 2 or dim % 2:
    raise ValueError(f"rotary_dim = int(head_dim * partial_rotary_factor) = int({head_dim} * "
                         f"{partial_rotary_factor}) = {dim} must be even and >= 2")
  return dim


def validate_rope_scaling(scaling, head_dim=None):
  """Check an HF-style scaling dict; return a normalised copy (``rope_type`` set, ``type`` and
  ``None`` values dropped).  Raises ``ValueError`` naming the problem.  With ``head_dim`` the
  longrope factor-list lengths (``rotary_dim // 2``) are checked too."""
  if scaling is None:
    return {"rope_type": "default"}
  if not isinstance(scaling, dict):
    raise ValueError(f"rope scaling must be a dict or None, got {type(scaling).__name__}")
  cfg = {k: v for k, v in scaling.items() if v is not None}
  legacy = cfg.pop("type", None)
  rope_type = cfg.setdefault("rope_type", legacy if legacy is not None else "default")
  if legacy is not None and legacy != rope_type:
    raise ValueError(f"conflicting rope_type={rope_type!r} and legacy type={legacy!r}")
  if not isinstance(rope_type, str) or rope_type not in _SPEC:
    raise ValueError(f"unknown rope_type {rope_type!r}; valid rope types: {', '.join(ROPE_TYPES)}")
  required, optional = _SPEC[rope_type]
  missing = [k for k in required if k not in cfg]
  if missing:
    raise ValueError(f"rope_type {rope_type!r} is missing required key(s) {missing}")
  allowed = {"rope_type", *required, *optional, *_COMMON}
  unknown = sorted(set(cfg) - allowed)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} for rope_type {rope_type!r}; "
                         f"allowed keys: {sorted(allowed)}")
  for key, value in cfg.items():
    ok, what = _CHECKS.get(key, (lambda v: True, ""))
    if not ok(value):
      raise ValueError(f"rope scaling {key!r} must be {what}, got {value!r} (rope_type {rope_type!r})")
  if rope_type in _ORDERED:
    big, small = _ORDERED[rope_type]
    b, s = cfg.get(big, _DEFAULTS.get(big)), cfg.get(small, _DEFAULTS.get(small))
    if b <= s:
      raise ValueError(f"rope_type {rope_type!r} needs {big} > {small}, got {big}={b}, {small}={s}")
  if rope_type == "longrope" and head_dim is not None:
    half = _rotary_dim(head_dim, cfg.get("partial_rotary_factor", 1.0)) // 2
    for key in ("short_factor", "long_factor"):
      if len(cfg[key]) != half:
        raise ValueError(f"longrope {key} has length {len(cfg[key])}, expected length {half} "
                                 f"(rotary_dim // 2)")
  return cfg


def _default_inv(dim, base):
  """Original RoPE (Su et al. 2021, RoFormer eq. 15): theta_i = base^(-2i/d), i = 0..d/2-1.
  The exponent 2i/d is rounded to float32 exactly as HF's ``arange(0, d, 2).float() / d``."""
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return 1.0 / (float(base) ** exponent.astype(np.float64))


def _original(cfg, max_pos, rope_type):
  orig = cfg.get("original_max_position_embeddings", max_pos)
  if orig is None:
    raise ValueError(f"rope_type {rope_type!r} needs original_max_position_embeddings in the scaling "
                         "dict or max_position_embeddings")
  return orig


def _ntk_base(base, factor, dim):
  """NTK-aware base change: base' = base * factor^(d / (d - 2))."""
  if dim <= 2:
    raise ValueError(f"NTK base scaling needs rotary_dim > 2, got {dim}")
  return base * factor ** (dim / (dim - 2))


def _linear(cfg, dim, base, seq_len, max_pos):
  """Position Interpolation (Chen et al. 2023, arXiv 2306.15595, eq. 4): f'(x, m) = f(x, m / s),
  i.e. theta_i / s.  HF ``_compute_linear_scaling_rope_parameters``."""
  return _default_inv(dim, base) / cfg["factor"], 1.0


def _ntk(cfg, dim, base, seq_len, max_pos):
  """Static "NTK-aware scaled RoPE" (bloc97, r/LocalLLaMA 2023; YaRN paper arXiv 2309.00071
  eq. 14-16): base' = base * s^(d/(d-2)), so the lowest frequency is interpolated by exactly s
  while the highest is unchanged.  Not in HF (the seq_len-free counterpart of ``dynamic``)."""
  return _default_inv(dim, _ntk_base(base, cfg["factor"], dim)), 1.0


def _dynamic(cfg, dim, base, seq_len, max_pos):
  """Dynamic NTK (emozilla 2023; HF ``_compute_dynamic_ntk_parameters``): with L = max_position_
  embeddings and l = max(seq_len, L), base' = base * (s*l/L - (s-1))^(d/(d-2))."""
  if max_pos is None:
    raise ValueError("rope_type 'dynamic' needs max_position_embeddings (the original length)")
  length = max_pos if seq_len is None else max(seq_len, max_pos)
  factor = cfg["factor"]
  return _default_inv(dim, _ntk_base(base, (factor * length / max_pos) - (factor - 1), dim)), 1.0


def _get_mscale(scale, mscale=1.0):
  """YaRN temperature sqrt(1/t) = 0.1 ln(s) + 1 (arXiv 2309.00071 eq. 22), 1 for s <= 1."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, dim, base, seq_len, max_pos):
  """YaRN (Peng et al. 2023, arXiv 2309.00071 eq. 17-22; HF ``_compute_yarn_parameters``).
  NTK-by-parts: r(d) = L / lambda_d; dims with r > beta_fast keep theta_d, r < beta_slow get
  theta_d / s, linear ramp between; the correction dims are d*ln(L/(2 pi beta))/(2 ln base).
  The explicit ``factor`` is always used (HF 5.24 only warns when it disagrees with
  max_position_embeddings / original_max_position_embeddings)."""
  factor, orig = cfg["factor"], _original(cfg, max_pos, "yarn")

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.get("beta_fast", 32)), correction_dim(cfg.get("beta_slow", 1))
  if cfg.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as HF: prevent a singular ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  inv = _default_inv(dim, base)
  attention = cfg.get("attention_factor")
  if attention is None:
    mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # HF truthiness: 0 means unset
      attention = _get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim)
    else:
      attention = _get_mscale(factor)
  return inv / factor * ramp + inv * (1.0 - ramp), attention


def _llama3(cfg, dim, base, seq_len, max_pos):
  """Llama 3.1 scaling (HF ``_compute_llama3_parameters``): wavelengths below L/high_freq_factor
  are kept, above L/low_freq_factor divided by factor, and between blended with
  smooth = (L/lambda - low) / (high - low): (1 - smooth) theta/s + smooth theta."""
  inv = _default_inv(dim, base)
  factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
  orig = _original(cfg, max_pos, "llama3")
  wavelen = 2 * math.pi / inv
  smooth = (orig / wavelen - low) / (high - low)
  blended = (1 - smooth) * inv / factor + smooth * inv
  out = np.where(wavelen > orig / low, inv / factor, blended)
  return np.where(wavelen < orig / high, inv, out), 1.0


def _longrope(cfg, dim, base, seq_len, max_pos):
  """LongRoPE (Ding et al. 2024, arXiv 2402.13753; HF ``_compute_longrope_parameters``):
  theta_i / lambda_i with lambda = long_factor when seq_len > original length, else short_factor;
  attention factor sqrt(1 + ln(s) / ln(L)) for s > 1 (s defaults to max_pos / L)."""
  orig = _original(cfg, max_pos, "longrope")
  attention = cfg.get("attention_factor")
  if attention is None:
    factor = cfg.get("factor")
    if factor is None:
      if max_pos is None:
        raise ValueError("rope_type 'longrope' needs factor, attention_factor or max_position_embeddings")
      factor = max_pos / orig
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
  key = "long_factor" if seq_len and seq_len > orig else "short_factor"
  ext = np.asarray(cfg[key], dtype=np.float32).astype(np.float64)  # HF keeps the lists in float32
  return _default_inv(dim, base) / ext, attention


_COMPUTE = {"default": lambda cfg, dim, base, *_: (_default_inv(dim, base), 1.0),  # unscaled RoPE
      "linear": _linear, "ntk": _ntk, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3,
      "longrope": _longrope}


def rope_frequencies(head_dim, base=10000.0, scaling=None, seq_len=None, max_position_embeddings=None):
  """Return ``(inv_freq, attention_factor)`` as HF ``ROPE_INIT_FUNCTIONS[rope_type]`` would.

  ``inv_freq``: float32 array of length rotary_dim // 2.  ``attention_factor``: python float that
  multiplies both cos and sin (so attention logits scale by its square).  ``seq_len`` matters for
  ``dynamic`` and ``longrope``; ``max_position_embeddings`` is the original length for ``dynamic``
  and the fallback for ``original_max_position_embeddings``."""
  cfg = validate_rope_scaling(scaling, head_dim=head_dim)
  dim = _rotary_dim(head_dim, cfg.get("partial_rotary_factor", 1.0))
  base = float(cfg.get("rope_theta", base))
  if not base > 1:
    raise ValueError(f"base must be > 1, got {base}")
  inv, attention = _COMPUTE[cfg["rope_type"]](cfg, dim, base, seq_len, max_position_embeddings)
  return np.asarray(inv, dtype=np.float32), float(attention)


def adjust_frequencies(inv_freq, resonance=False, p_fraction=1.0):
  """Frequency options applied after any scaling (``extensions/frequency_rounding.py``).

  resonance: Resonance RoPE (Wang et al. 2024, arXiv 2403.00071, eq. 4), every wavelength
  rounded to an integer: theta_i' = 2 pi / round(2 pi / theta_i).
  p_fraction: p-RoPE (Barbero et al. 2025, "Round and Round We Go!", sec. 6), the first
  round(p * r/2) frequencies (the highest) keep rotating, the rest become 0 (identity).
  """
  inv = np.asarray(inv_freq, dtype=np.float64)
  if not 0.0 <= p_fraction <= 1.0:
    raise ValueError(f"p_fraction must be in [0, 1], got {p_fraction}")
  if resonance:
    inv = 2 * math.pi / np.round(2 * math.pi / inv)
  keep = int(round(p_fraction * inv.shape[-1]))
  inv = np.where(np.arange(inv.shape[-1]) < keep, inv, 0.0)
  return inv.astype(np.float32)
