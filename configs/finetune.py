"""Fine-tune a trained run at a longer length with a RoPE extension (the Position
Interpolation paper's protocol, Chen et al. 2023 sec. 3: a few hundred steps at
the target length).

  python train.py --config=configs/finetune.py:init_from=runs/rope,train_len=512,variant=linear \
      --workdir=runs/rope-pi512

Starts from the source run's config (config.json) and its latest parameters;
``variant`` is any evaluation variant spec (``linear``, ``yarn:beta_fast=16``,
``none`` for plain fine-tuning); ``factor`` defaults to new/old train_len. The
workdir's init_from.json records the source run and the variant.

DroPE (Sakana AI 2025, "Extending the Context of Pretrained LLMs by Dropping Their
Positional Embeddings"; its reference code is not in the offline index, so the recipe
follows the issue's description): ``drope=1`` starts from a RoPE run, removes
the encoding (posenc ``nope``; no parameter is positional, so all carry over) and
recalibrates briefly, at the source's length when train_len gives it:

  python train.py --config=configs/finetune.py:init_from=runs/rope,train_len=128,variant=none,drope=1 \
      --workdir=runs/rope-drope

``init_from`` may also be a pretrained checkpoint (``pretrained:smollm2-135m``, a .gguf
file, a Hugging Face directory): the fine-tune then starts from its weights and tokenizer,
its context length as the original length (tokens per step = that length unless
--config.batch_size says otherwise), peak lr 2e-5, rematerialised blocks and bf16 matmuls
where the CPU has them (``_pretrained_recipe``; ~3.5 min per 16k step of SmolLM2-135M on
the 2-core Xeon):

  python train.py \
      --config=configs/finetune.py:init_from=pretrained:smollm2-135m,train_len=16384,variant=yarn,steps=5 \
      --workdir=runs/smollm2-yarn16k
"""

from configs.common import parse_args
from evaluation.variants import apply_variant, parse_variants
from pretrained import is_checkpoint, run_id
from training.checkpoint import read_config

DEFAULTS = {"init_from": "", "train_len": 512, "variant": "linear", "steps": 200, "lr": 0.0,
            "drope": 0}  # lr 0 = the recipe's (below)
RUN_LR = 3e-4  # a lenx run (the byte models' peak lr)
CHECKPOINT_LR = 2e-5  # PI paper sec. 3.1 (AdamW, the 7B/13B LLaMA); YaRN sec. 4 the same


def get_config(arg=None):
  args = parse_args(arg.replace(";", ",") if arg else arg, DEFAULTS)
  if not args["init_from"]:
    raise ValueError("configs/finetune.py needs init_from=<run workdir or pretrained checkpoint>")
  source = read_config(args["init_from"])
  variants = parse_variants(args["variant"])
  if len(variants) != 1:
    raise ValueError(f"finetune takes one variant, got {args['variant']!r}")
  source_len = source.train_len
  config = apply_variant(source, variants[0], args["train_len"])
  rope = config.posenc.get(config.posenc.name)
  if rope is not None and "original_len" in rope:
    rope.original_len = rope.original_len or source_len  # keep the pre-training length
    rope.eval_len = 0
  config.init_from = run_id(args["init_from"])  # absolute path, or pretrained:NAME as given
  if args["drope"]:
    _drop_positional_encoding(config, variants[0])
  config.init_variant = variants[0].label  # recorded in init_from.json
  config.train_len = args["train_len"]
  config.num_train_steps = args["steps"]
  config.batch_size = max(1, source.batch_size * source_len // args["train_len"])  # same tokens/step
  from_checkpoint = is_checkpoint(args["init_from"])
  config.optim.learning_rate = args["lr"] or (CHECKPOINT_LR if from_checkpoint else RUN_LR)
  if from_checkpoint:
    _pretrained_recipe(config)
  config.optim.warmup_steps = min(20, args["steps"] // 10)
  config.eval_every = config.checkpoint_every = max(1, args["steps"] // 4)
  return config


def _pretrained_recipe(config):
  """A checkpoint's fine-tune (besides CHECKPOINT_LR): every block rematerialised (30 layers
  x 16k tokens of activations do not fit otherwise: a SmolLM2-135M 16k step peaks at 9.5 GB
  with it), and bf16 matmuls where the hardware has them (as its evaluation)."""
  config.model.remat = True
  config.model.dtype = "auto"


def _drop_positional_encoding(config, variant):
  """DroPE: the fine-tuned model is the source without its (RoPE) encoding."""
  if config.posenc.name != "rope":
    raise ValueError(f"drope=1 drops a RoPE encoding; the source run uses {config.posenc.name!r}")
  if variant.name != "none":
    raise ValueError(f"drope=1 takes variant=none (no RoPE is left to scale), got {variant.label!r}")
  config.posenc.name = "nope"
