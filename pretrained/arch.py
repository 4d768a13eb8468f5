"""What a Llama-architecture checkpoint declares, in one format-independent record, and
the Hugging Face parameter names both readers produce (``state`` dicts map these names
to float32 arrays in the Hugging Face / torch layout, [out, in] for matrices)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Arch:
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  norm_eps: float
  rope_base: float
  rotary_dim: int
  context_length: int  # the length it was trained at: factor=auto divides by it
  tie_embeddings: bool
  rope_scaling: str = ""  # JSON of a Hugging Face rope_scaling dict the checkpoint declares


LAYER_KEYS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj")


def layer_name(i, key):
  return f"model.layers.{i}.{key}.weight"


def expected_shapes(arch):
  """{Hugging Face name: shape} of every parameter the checkpoint must hold."""
  a, q, kv = arch, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
  per_layer = {"input_layernorm": (a.d_model,), "self_attn.q_proj": (q, a.d_model),
               "self_attn.k_proj": (kv, a.d_model), "self_attn.v_proj": (kv, a.d_model),
               "self_attn.o_proj": (a.d_model, q), "post_attention_layernorm": (a.d_model,),
               "mlp.gate_proj": (a.mlp_dim, a.d_model), "mlp.up_proj": (a.mlp_dim, a.d_model),
               "mlp.down_proj": (a.d_model, a.mlp_dim)}
  shapes = {"model.embed_tokens.weight": (a.vocab_size, a.d_model),
            "model.norm.weight": (a.d_model,)}
  for i in range(a.num_layers):
    shapes.update({layer_name(i, k): s for k, s in per_layer.items()})
  if not a.tie_embeddings:
    shapes["lm_head.weight"] = (a.vocab_size, a.d_model)
  return shapes


def check_state(arch, state, source):
  """Raises ValueError naming the first missing or misshapen parameter."""
  for name, shape in expected_shapes(arch).items():
    if name not in state:
      raise ValueError(f"{source}: parameter {name} is missing")
    if tuple(state[name].shape) != shape:
      raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
