"""Default lenx training config.

Launch:
  python train.py --config=configs/default.py:posenc=rope --workdir=runs/rope
  python train.py --config=configs/default.py:posenc=alibi,data=copy,train_len=256 \
      --workdir=runs/alibi-copy --config.num_train_steps=2000

Arguments (after ':'): posenc=<encoding>, data=books|text_dir|tfds|markov|copy|passkey,
train_len=<int>, size=tiny|small|base. Every field below can then be overridden
with --config.x.y=value (e.g. --config.posenc.rope.base=500000).
"""
import ml_collections

import input_pipeline
from input_pipeline import positions
import posenc
from configs.common import SIZES, parse_args
from models.layers import MLP_CHUNK
from training import compile_cache

DEFAULTS = {"posenc": "rope", "data": "books", "train_len": 128, "size": "tiny"}


def get_config(arg=None):
  args = parse_args(arg, DEFAULTS)
  if args["size"] not in SIZES:
    raise ValueError(f"unknown size {args['size']!r}; valid choices: {', '.join(SIZES)}")
  num_layers, d_model, num_heads = SIZES[args["size"]]

  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameters, data order and dropout
  c.name = ""  # run group: runs differing only in seed share it; results average over it
  c.train_len = args["train_len"]  # tokens per training window (the length we extrapolate from)
  c.batch_size = 32  # windows per step
  c.num_train_steps = 2000  # optimizer steps
  c.log_every = 20  # steps between train-metric logs
  c.eval_every = 200  # steps between validation evaluations at train_len
  c.eval_tokens = 32768  # validation tokens scored per evaluation
  c.checkpoint_every = 200  # steps between checkpoints (and at the end)
  c.keep_checkpoints = 2  # most recent checkpoints kept
  c.init_from = ""  # another run's workdir to initialise parameters from (fine-tuning)
  c.init_variant = "none"  # extension variant applied when fine-tuning from init_from
  c.compilation_cache_dir = compile_cache.DEFAULT_DIR  # persistent XLA compile cache; "" = off

  c.mesh = ml_collections.ConfigDict()  # device mesh (training/mesh.py)
  c.mesh.data = -1  # batch-parallel ways; -1 = all devices left after fsdp
  c.mesh.fsdp = 1  # ways to shard params/optimizer state (ZeRO-3 style); 1 = replicated
  c.mesh.distributed = False  # multi-host: call jax.distributed.initialize() first

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = num_layers  # transformer blocks
  c.model.d_model = d_model  # residual width
  c.model.num_heads = num_heads  # attention heads
  c.model.num_kv_heads = 0  # key/value heads (grouped-query attention); 0 = num_heads
  c.model.head_dim = 0  # per-head width; 0 = d_model // num_heads
  c.model.mlp_dim = 0  # MLP hidden width; 0 = 8/3 d_model (swiglu) or 4 d_model (gelu)
  c.model.mlp = "swiglu"  # swiglu | gelu
  c.model.norm = "rmsnorm"  # rmsnorm | layernorm (pre-norm either way)
  c.model.norm_eps = 1e-6  # epsilon of the norms (Llama checkpoints: 1e-5 or 1e-6)
  c.model.dropout = 0.0  # dropout on embeddings and residual branches
  c.model.dtype = "float32"  # float32 | bfloat16 (bf16 matmul inputs, f32 accumulation) | auto
                             # (bf16 where the hardware has bf16 matmuls; models/layers.py)
  c.model.tie_embeddings = True  # output head shares the token embedding
  c.model.logn_base_len = 0  # >0: log-n query scaling max(1, log(pos+1)/log(this)); 0 = off
  c.model.vocab_size = 256  # filled from the data source
  c.model.attention = "auto"  # auto | full | blockwise; auto = blockwise when seq > 2*block_size
  c.model.block_size = 512  # query/key block of blockwise attention (models/blockwise.py)
  c.model.remat = False  # recompute each block in the backward pass (long fine-tunes: memory
                         # ~ one block's activations + every block's input, ~1.3x step time)
  c.model.mlp_chunk = MLP_CHUNK  # longer sequences run norm + MLP this many positions at a
                                 # time (memory of long evaluations; same result); 0 = never

  c.posenc = ml_collections.ConfigDict(posenc.default_configs())  # one sub-config per encoding
  c.posenc.name = args["posenc"]  # which encoding; see posenc.names()

  c.positions = positions.default_positions_config()  # training position ids (contiguous|...)

  c.data = input_pipeline.default_data_config()
  c.data.name = args["data"]  # books | text_dir | tfds | markov | copy | passkey

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # peak AdamW learning rate
  c.optim.warmup_steps = 100  # linear warmup from 0
  c.optim.min_lr_ratio = 0.1  # the schedule ends at this fraction of the peak
  c.optim.schedule = "cosine"  # after warmup: "cosine" or "wsd" (warmup-stable-decay)
  c.optim.decay_fraction = 0.2  # wsd: the last fraction of the steps decays linearly
  c.optim.weight_decay = 0.1  # decoupled, on matrices only (not norms/biases)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.95  # Adam beta2
  c.optim.grad_clip = 1.0  # global-norm clipping
  return c
