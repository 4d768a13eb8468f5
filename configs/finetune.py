"""Fine-tune a trained run at a longer length with a RoPE extension (the Position
Interpolation paper's protocol, Chen et al. 2023 sec. 3: a few hundred steps at
the target length).

  python train.py --config=configs/finetune.py:init_from=runs/rope,train_len=512,variant=linear \
      --workdir=runs/rope-pi512

Starts from the source run's config (config.json) and its latest parameters;
``variant`` is any evaluation variant spec (``linear``, ``yarn:beta_fast=16``,
``none`` for plain fine-tuning); ``factor`` defaults to new/old train_len. The
workdir's init_from.json records the source run and the variant.
"""
import os

from configs.common import parse_args
from evaluation.variants import apply_variant, parse_variants
from training.checkpoint import read_config

DEFAULTS = {"init_from": "", "train_len": 512, "variant": "linear", "steps": 200, "lr": 3e-4}


def get_config(arg=None):
  args = parse_args(arg.replace(";", ",") if arg else arg, DEFAULTS)
  if not args["init_from"]:
    raise ValueError("configs/finetune.py needs init_from=<run workdir>")
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
  config.init_from = os.path.abspath(args["init_from"])
  config.init_variant = variants[0].label  # recorded in init_from.json
  config.train_len = args["train_len"]
  config.num_train_steps = args["steps"]
  config.batch_size = max(1, source.batch_size * source_len // args["train_len"])  # same tokens/step
  config.optim.learning_rate = args["lr"]
  config.optim.warmup_steps = min(20, args["steps"] // 10)
  config.eval_every = config.checkpoint_every = max(1, args["steps"] // 4)
  return config
