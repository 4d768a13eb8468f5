"""Text <-> token ids for a run: bytes (vocab 256) or the checkpoint's BPE tokenizer
(``config.data.tokenizer``, input_pipeline/tokenizer.py). Used by sample.py and the
needle task (evaluation/needle.py) to turn prompts and needles into tokens."""
import numpy as np

from input_pipeline import tokenizer as tokenizer_lib


class Codec:
  """encode(text) -> int32 ids, decode(ids) -> text (invalid UTF-8 replaced)."""

  def __init__(self, config):
    spec = config.data.get("tokenizer", "")
    self.bpe = tokenizer_lib.load(spec) if spec else None

  def encode(self, text):
    if self.bpe:
      return self.bpe.encode(text)
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids):
    if self.bpe:
      return self.bpe.decode(ids)
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
