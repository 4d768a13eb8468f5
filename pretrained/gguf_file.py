"""GGUF (llama.cpp) Llama checkpoints: metadata -> ``Arch``, tensors -> Hugging Face state.

Tensors are dequantised to float32 with ``gguf.quants.dequantize``. llama.cpp's converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of ``attn_q`` /
``attn_k`` within each head so that RoPE pairs are adjacent rows (2i, 2i+1), as llama.cpp's
rotation pairs them; Hugging Face (and lenx, ``posenc.rope``) pair row i with i + d/2
(rotate-half). ``unpermute_qk`` restores the Hugging Face order, so one rotary code serves
both formats (proved by tests/test_pretrained.py).
"""
import functools
import json

import gguf
import numpy as np

from pretrained.arch import Arch, layer_name

ARCHITECTURES = ("llama",)
Q = gguf.GGMLQuantizationType
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K,
                Q.Q4_K, Q.Q5_K, Q.Q6_K)
ROPE_SCALING_TYPES = ("none", "linear", "yarn")
# GGUF tensor name -> Hugging Face name ({i}: block index)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                "output": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_MISSING = object()


@functools.lru_cache(maxsize=2)
def reader(path):
  return gguf.GGUFReader(path)


def field(r, key, default=_MISSING):
  f = r.fields.get(key)
  if f is None:
    if default is _MISSING:
      raise ValueError(f"GGUF metadata has no {key!r}")
    return default
  return f.contents()


def unpermute_qk(w, n_head):
  """Inverse of llama.cpp's permute: per head, rows [a0, b0, a1, b1, ...] (adjacent RoPE
  pairs) -> [a0, a1, ..., b0, b1, ...] (rotate-half pairs i, i + d/2). w [n_head * d, ...]."""
  return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name):
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if unknown)."""
  parts = gguf_name.split(".")
  if parts[-1] != "weight":
    return None
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
    return layer_name(int(parts[1]), LAYER_NAMES[parts[2]])
  if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
    return GLOBAL_NAMES[parts[0]]
  return None


def _rope_scaling(r, context_length):
  kind = field(r, "llama.rope.scaling.type", "none")
  if kind not in ROPE_SCALING_TYPES:
    raise ValueError(f"GGUF llama.rope.scaling.type {kind!r} is not supported; supported: "
                     f"{', '.join(ROPE_SCALING_TYPES)}")
  if any(t.name == "rope_freqs.weight" for t in r.tensors):
    raise ValueError("GGUF holds rope_freqs.weight (per-frequency factors, e.g. Llama 3.1); "
                     "not supported from GGUF: load the Hugging Face directory instead")
  if kind == "none":
    return ""
  d = {"rope_type": kind, "factor": float(field(r, "llama.rope.scaling.factor"))}
  if kind == "yarn":
    d["original_max_position_embeddings"] = int(
        field(r, "llama.rope.scaling.original_context_length", context_length))
  return json.dumps(d)


def read_arch(path):
  r = reader(path)
  arch = field(r, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  names = {t.name for t in r.tensors}
  d_model = int(field(r, "llama.embedding_length"))
  heads = int(field(r, "llama.attention.head_count"))
  head_dim = d_model // heads
  context = int(field(r, "llama.context_length"))
  return Arch(
      num_layers=int(field(r, "llama.block_count")), d_model=d_model, num_heads=heads,
      num_kv_heads=int(field(r, "llama.attention.head_count_kv", heads)), head_dim=head_dim,
      mlp_dim=int(field(r, "llama.feed_forward_length")),
      vocab_size=int(next(t.shape[1] for t in r.tensors if t.name == "token_embd.weight")),
      # stored as float32: its shortest decimal (1e-5), not the widened 9.9999997e-6
      norm_eps=float(str(np.float32(field(r, "llama.attention.layer_norm_rms_epsilon")))),
      rope_base=float(field(r, "llama.rope.freq_base", 10000.0)),
      rotary_dim=int(field(r, "llama.rope.dimension_count", head_dim)),
      context_length=context, tie_embeddings="output.weight" not in names,
      rope_scaling=_rope_scaling(r, context))


def dequantize(t):
  """float32 array of a GGUF tensor, numpy (row-major) shape = reversed GGML shape."""
  if t.tensor_type not in TENSOR_TYPES:
    raise ValueError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, not supported; "
                     f"supported: {', '.join(q.name for q in TENSOR_TYPES)}")
  shape = tuple(int(n) for n in reversed(t.shape.tolist()))
  return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


def read_state(path, arch):
  """{Hugging Face name: float32 array} with q/k rows back in rotate-half order."""
  state = {}
  for t in reader(path).tensors:
    name = hf_name(t.name)
    if name is None:  # e.g. biases: a plain Llama has none, and dropping one would be silent
      raise ValueError(f"{path}: GGUF tensor {t.name} is not part of the supported Llama "
                       "layout (token_embd, output_norm, output, blk.N.{" +
                       ",".join(LAYER_NAMES) + "}.weight)")
    w = dequantize(t)
    if name.endswith("q_proj.weight"):
      w = unpermute_qk(w, arch.num_heads)
    elif name.endswith("k_proj.weight"):
      w = unpermute_qk(w, arch.num_kv_heads)
    state[name] = w
  return state
