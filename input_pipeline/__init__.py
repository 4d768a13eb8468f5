"""lenx input pipeline: byte-level text (books / text_dir / tfds) and synthetic tasks.

  task = get_task(config.data, seed)
  batch = task.train_batch(step, batch_size, length)   # pure function of (seed, step)
  for batch in task.eval_batches("validation", length, batch_size, max_tokens=None): ...

Batch keys (numpy): inputs/targets/positions int32 [B,L], loss_mask float32 [B,L];
text eval adds doc_id/offset int32 [B] (-1 on pad rows); synthetic tasks add optimal_nll
float32 [B,L]; copy/passkey add answer_mask float32 [B,L]; passkey adds passkey_distance [B].
Text tasks are bytes (vocab 256, is_text=True: bits/byte = nll / ln 2).
"""
from input_pipeline import recall
from input_pipeline import synthetic
from input_pipeline import text
from input_pipeline.base import Task, decode, encode
from input_pipeline.config import default_data_config

TEXT_TASKS = ("books", "text_dir", "tfds")
SYNTHETIC_TASKS = {"markov": synthetic.MarkovTask, "copy": recall.CopyTask,
                   "passkey": recall.PasskeyTask}
VALID_NAMES = TEXT_TASKS + tuple(SYNTHETIC_TASKS)


def _as_dict(cfg):
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def get_task(data_config, seed: int) -> Task:
  """Task for data_config.name (ConfigDict or dict; missing fields take the defaults)."""
  cfg = default_data_config().to_dict()
  given = _as_dict(data_config)
  for key, value in given.items():
    cfg[key] = {**cfg[key], **_as_dict(value)} if isinstance(cfg.get(key), dict) else value
  name = cfg["name"]
  if name in TEXT_TASKS:
    return text.make_text_task(cfg, seed)
  if name in SYNTHETIC_TASKS:
    return SYNTHETIC_TASKS[name](seed, num_eval_sequences=cfg["num_eval_sequences"],
                                 **cfg[name])
  raise ValueError(f"unknown data name {name!r}; valid choices: {', '.join(VALID_NAMES)}")


__all__ = ["Task", "get_task", "default_data_config", "encode", "decode", "VALID_NAMES"]
