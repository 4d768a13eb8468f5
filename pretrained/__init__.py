"""Pretrained Llama-architecture checkpoints (GGUF or Hugging Face safetensors) as lenx runs.

  config = read_config("pretrained:smollm2-135m")     # a lenx config (model, rope, tokenizer)
  config, model = load("path/to/model.gguf")          # DecoderLM with the checkpoint's weights

The config is an ordinary lenx config: ``train_len`` (and ``posenc.rope.original_len``) is
the checkpoint's context length, so ``factor=auto`` variants extend relative to it;
``data.tokenizer`` names the checkpoint whose BPE tokenizer the text tasks use. Registry,
paths and fetching: ``pretrained.registry``; formats: ``gguf_file`` and ``hf_dir``.
"""
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrained import gguf_file, hf_dir, registry
from pretrained.arch import LAYER_KEYS, check_state, layer_name
from pretrained.registry import is_checkpoint, resolve, run_id

__all__ = ["is_checkpoint", "read_arch", "read_config", "load", "resolve", "run_id"]


def _format(path):
  return gguf_file if path.endswith(".gguf") else hf_dir


@functools.lru_cache(maxsize=8)
def read_arch(spec):
  path = resolve(spec)
  return _format(path).read_arch(path)


def read_config(spec):
  """The lenx config (ConfigDict, resolved) of a checkpoint: model shape, RoPE, tokenizer."""
  from configs.common import resolve as resolve_config  # configs import the input pipeline
  from configs.default import get_config
  a = read_arch(spec)
  c = get_config("posenc=rope")
  c.train_len = a.context_length
  c.batch_size = 1  # fine-tuning keeps tokens per step = context length (configs/finetune.py)
  c.model.update(num_layers=a.num_layers, d_model=a.d_model, num_heads=a.num_heads,
                 num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, mlp_dim=a.mlp_dim,
                 mlp="swiglu", norm="rmsnorm", norm_eps=a.norm_eps,
                 tie_embeddings=a.tie_embeddings, vocab_size=a.vocab_size)
  rope = c.posenc.rope
  rope.base = a.rope_base
  rope.partial_rotary_factor = a.rotary_dim / a.head_dim
  rope.original_len = a.context_length
  rope.scaling_json = a.rope_scaling
  c.data.tokenizer = registry.run_id(spec)
  return resolve_config(c)


def lenx_params(a, state):
  """Hugging Face state (torch layout: y = x W^T) -> lenx pure-dict params (y = x K):
  every matrix transposed; q/k/v fused into ``qkv`` ([q | k | v] columns, what
  ``models.attention.Attention`` splits), gate/up fused into ``up`` ([gate | up],
  ``models.layers.swiglu``)."""
  w = lambda i, key: state[layer_name(i, key)]
  blocks = {}
  for i in range(a.num_layers):
    qkv = np.concatenate([w(i, k).T for k in LAYER_KEYS[1:4]], axis=1)
    blocks[i] = {"attn_norm": {"scale": w(i, "input_layernorm")},
                 "attn": {"qkv": {"kernel": qkv}, "out": {"kernel": w(i, "self_attn.o_proj").T}},
                 "mlp_norm": {"scale": w(i, "post_attention_layernorm")},
                 "mlp": {"up": {"kernel": np.concatenate([w(i, "mlp.gate_proj").T,
                                                          w(i, "mlp.up_proj").T], axis=1)},
                         "down": {"kernel": w(i, "mlp.down_proj").T}}}
  params = {"embedding": state["model.embed_tokens.weight"], "blocks": blocks,
            "final_norm": {"scale": state["model.norm.weight"]}}
  if not a.tie_embeddings:
    params["head"] = {"kernel": state["lm_head.weight"].T}
  return params


def load(spec, *, verbose=False):
  """(config, DecoderLM) of a checkpoint, parameters float32."""
  from models import build_model
  t0 = time.perf_counter()
  path, a, config = resolve(spec), read_arch(spec), read_config(spec)
  state = _format(path).read_state(path, a)
  check_state(a, state, path)
  abstract = nnx.eval_shape(lambda: build_model(config))
  graphdef, params = nnx.split(abstract)
  pure = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), lenx_params(a, state))  # device, once
  nnx.replace_by_pure_dict(params, pure)
  model = nnx.merge(graphdef, params)
  if verbose:
    print(f"loaded {spec} ({a.num_layers} layers, d_model {a.d_model}) in "
          f"{time.perf_counter() - t0:.1f}s")
  return config, model
