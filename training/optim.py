"""AdamW with linear warmup, a cosine or warmup-stable-decay schedule, global-norm clipping."""
import jax
import optax


SCHEDULES = ("cosine", "wsd")


def check_schedule(cfg):
  """(schedule, decay_fraction) of an optim config; ValueError naming the valid choices.
  Called by configs.common.validate (before a workdir is written) and by the schedule."""
  kind, fraction = cfg.get("schedule", "cosine"), cfg.get("decay_fraction", 0.2)
  if kind not in SCHEDULES:
    raise ValueError(f"unknown optim.schedule {kind!r}; valid choices: {', '.join(SCHEDULES)}")
  if not 0 < fraction <= 1:
    raise ValueError(f"optim.decay_fraction must be in (0, 1], got {fraction}")
  return kind, fraction


def learning_rate_schedule(cfg, num_steps):
  """0 -> peak over warmup_steps, then down to min_lr_ratio * peak at num_steps:
  "cosine" (Loshchilov & Hutter 2017) or "wsd", warmup-stable-decay (Hu et al. 2024,
  MiniCPM, sec. 4; Hagele et al. 2024): the peak held until the last ``decay_fraction`` of
  the steps, then a linear decay. Adam moves a parameter by about lr per step, so the sum
  of the schedule bounds how far a parameter that starts at zero can travel (a learned
  position table, T5's buckets): WSD's sum is ~1.5x cosine's for the same steps."""
  kind, fraction = check_schedule(cfg)
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  end = cfg.learning_rate * cfg.min_lr_ratio
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=end)
  decay = max(1, min(int(round(fraction * num_steps)), num_steps - warmup))
  stable = max(num_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
       optax.constant_schedule(cfg.learning_rate),
       optax.linear_schedule(cfg.learning_rate, end, decay)],
      boundaries=[warmup, warmup + stable])


def make_optimizer(cfg, num_steps):
  """optax transform; weight decay only on matrices (ndim >= 2), not norms/scalars."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=decay_mask),
  )
