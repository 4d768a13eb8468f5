"""A checkpoint's own byte-level BPE tokenizer (GPT-2 style), built with Hugging Face
``tokenizers`` from GGUF metadata (``tokenizer.ggml.*``) or a ``tokenizer.json``.

  tok = load("pretrained:smollm2-135m")
  ids = tok.encode("The whale")            # int32 array, no BOS (as the checkpoint's
                                           # tokenizer.ggml.add_bos_token / HF default)
  tok.decode(ids) == "The whale"
  tok.token_bytes[ids].sum() == len("The whale".encode())   # bits-per-byte accounting

Byte-level BPE maps each byte to one printable character (GPT-2 ``bytes_to_unicode``),
so a token's length in bytes is its length in those characters; ``token_bytes`` is
what lets a token model report bits per *byte*, comparable with lenx's byte models.
"""
import functools
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from pretrained import registry

# tokenizer.ggml.pre -> pre-tokenizers, as llama.cpp's llama-vocab.cpp splits before BPE:
# GPT-2's regex, and for SmolLM2 ("smollm", like StarCoder) each digit on its own first.
_BYTE_LEVEL = lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
PRE_TOKENIZERS = {
    "gpt2": lambda: _BYTE_LEVEL(),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL()]),
}
CONTROL = 3  # llama.cpp token type of special tokens (<|endoftext|>, <|im_start|>, ...)


@functools.lru_cache(maxsize=1)
def _byte_chars():
  """GPT-2 ``bytes_to_unicode`` image: the 256 characters that stand for single bytes."""
  return frozenset(pre_tokenizers.ByteLevel.alphabet())


class BPETokenizer:
  """encode / decode / vocab_size / token_bytes over a ``tokenizers.Tokenizer``."""

  def __init__(self, tok, bos_id=None, eos_id=None):
    self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.token_bytes = self._token_bytes()

  def _token_bytes(self):
    """Bytes each token stands for [vocab] int32 (special tokens: their text's length)."""
    special = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
    out = np.zeros(self.vocab_size, np.int32)
    chars = _byte_chars()
    for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
      if i in special:
        out[i] = len(special[i].encode("utf-8"))
      elif set(piece) <= chars:
        out[i] = len(piece)
      else:
        raise ValueError(f"token {i} {piece!r} is not byte-level BPE; supported: GPT-2-style "
                         "byte-level BPE tokenizers")
    return out

  def encode(self, text):
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def from_gguf(path):
  from pretrained import gguf_file
  r = gguf_file.reader(path)
  model = gguf_file.field(r, "tokenizer.ggml.model")
  pre = gguf_file.field(r, "tokenizer.ggml.pre", "gpt2")
  if model != "gpt2" or pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer {model!r} / pre-tokenizer {pre!r} is not supported; "
                     f"supported: tokenizer.ggml.model 'gpt2' with pre {', '.join(PRE_TOKENIZERS)}")
  tokens = gguf_file.field(r, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in gguf_file.field(r, "tokenizer.ggml.merges")]
  types = gguf_file.field(r, "tokenizer.ggml.token_type", [1] * len(tokens))
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True)
                          for t, ty in zip(tokens, types) if ty == CONTROL])
  return BPETokenizer(tok, gguf_file.field(r, "tokenizer.ggml.bos_token_id", None),
                      gguf_file.field(r, "tokenizer.ggml.eos_token_id", None))


def from_tokenizer_json(path):
  return BPETokenizer(tokenizers.Tokenizer.from_file(path))


@functools.lru_cache(maxsize=4)
def load(spec):
  """The tokenizer of a checkpoint spec (see ``pretrained.registry``)."""
  path = registry.resolve(spec)
  if path.endswith(".gguf"):
    return from_gguf(path)
  json_path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(json_path):
    raise FileNotFoundError(f"{path} has no tokenizer.json (needed to tokenize text for it)")
  return from_tokenizer_json(json_path)
