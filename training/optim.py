"""AdamW with linear warmup, cosine decay and global-norm clipping."""
import jax
import optax


def learning_rate_schedule(cfg, num_steps):
  """0 -> peak over warmup_steps, then cosine down to min_lr_ratio * peak at num_steps."""
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg, num_steps):
  """optax transform; weight decay only on matrices (ndim >= 2), not norms/scalars."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=decay_mask),
  )
