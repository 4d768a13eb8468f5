"""Hugging Face Llama directories: ``config.json`` -> ``Arch``, ``*.safetensors`` -> state
(read with the safetensors numpy API; no torch). Names and layout are already Hugging
Face's, rotate-half RoPE included, so nothing is permuted."""
import glob
import json
import os

import numpy as np
from safetensors.numpy import load_file

from pretrained.arch import Arch

MODEL_TYPES = ("llama",)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_arch(path):
  c = read_json(os.path.join(path, "config.json"))
  if c.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not supported; supported: "
                     f"{', '.join(MODEL_TYPES)}")
  for flag in ("attention_bias", "mlp_bias"):
    if c.get(flag):
      raise ValueError(f"{path}: {flag}=true is not supported (lenx projections have no bias)")
  if c.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act {c['hidden_act']!r} is not supported; supported: silu")
  rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})  # transformers 4.x / 5.x
  base = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
  if rope.get("rope_type", rope.get("type", "default")) == "default":
    rope = {}
  heads = c["num_attention_heads"]
  head_dim = c.get("head_dim") or c["hidden_size"] // heads
  return Arch(
      num_layers=c["num_hidden_layers"], d_model=c["hidden_size"], num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
      mlp_dim=c["intermediate_size"], vocab_size=c["vocab_size"],
      norm_eps=c.get("rms_norm_eps", 1e-6),
      rope_base=float(base), rotary_dim=int(head_dim * c.get("partial_rotary_factor", 1.0)),
      context_length=c.get("max_position_embeddings", 2048),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      rope_scaling=json.dumps(rope) if rope else "")


def read_state(path, arch):
  del arch
  state = {}
  for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    state.update({k: np.asarray(v, np.float32) for k, v in load_file(f).items()})
  return state
