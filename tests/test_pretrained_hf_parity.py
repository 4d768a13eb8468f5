"""Parity with Hugging Face ``transformers`` (issue 11, "Parity, proven" (a) and (b), and the
tokenizer agreement): lenx against ``tests/fixtures/hf_llama_reference.npz``, which
``tests/fixtures/make_hf_llama_reference.py`` computes with torch + transformers in a separate
venv (its docstring says how and with which versions).

(a) the tiny random GQA Llama (untied head) of ``tests/fixtures/tiny_llama.py`` as a Hugging Face
    directory and as llama.cpp-permuted GGUF (F32, Q8_0): logits <= 1e-4 max abs (float32);
(b) the real SmolLM2-135M Q4_1 GGUF: 64-token prompt logits (last position, all 49152; top-20
    per position) <= 1e-3 max abs, 32-token greedy continuation identical;
tokenizer: the GGUF tokenizer's ids equal transformers' on a paragraph of each test book.
"""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import pretrained
from input_pipeline import tokenizer
from models.generate import generate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_hf_llama_reference as hf_ref  # noqa: E402
import tiny_llama  # noqa: E402

SMOLLM2 = "pretrained:smollm2-135m"
REF = dict(np.load(hf_ref.OUT))


def forward(model, ids):
  """lenx logits [len(ids), vocab] (float32) of one sequence."""
  return np.asarray(model(jnp.asarray(ids)[None], jnp.arange(len(ids))[None]))[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The reference's tiny checkpoint, rebuilt by the same writer (fingerprint checked)."""
  d = tmp_path_factory.mktemp("tiny_hf_parity")
  hf = tiny_llama.write_hf(str(d / "hf"))
  assert hf_ref.fingerprint(load_file(os.path.join(hf, "model.safetensors"))) == str(
      REF["tiny_fingerprint"]), "tiny_llama.py changed: rerun make_hf_llama_reference.py"
  paths = {"hf": hf}
  for key, qtype in hf_ref.TINY_GGUF.items():
    paths[key] = tiny_llama.write_gguf(hf, str(d / f"{key}.gguf"), qtype)
  return paths


@pytest.mark.parametrize("key", ["hf", "gguf", "q8"])
def test_tiny_llama_logits_match_transformers(tiny, key):
  """(a) safetensors dir, GGUF with llama.cpp's q/k permutation (F32), and Q8_0 GGUF (both
  sides dequantise with gguf.quants): each against transformers loading the same file."""
  _, model = pretrained.load(tiny[key])
  diff = np.abs(forward(model, REF["tiny_ids"]) - REF[f"tiny_logits_{key}"]).max()
  assert diff <= 1e-4, f"{key}: max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def smollm2():
  return pretrained.load(SMOLLM2)


def test_smollm2_prompt_tokens_match_transformers():
  text = hf_ref.book_text("melville_moby_dick.txt")[hf_ref.SMOL_FROM_CHAR:][:2000]
  ids = tokenizer.load(SMOLLM2).encode(text)[:hf_ref.SMOL_LEN]
  assert np.array_equal(ids, REF["smol_ids"])


def test_smollm2_logits_match_transformers(smollm2):
  """(b) 64-token prompt: all logits at the last position, and at every position the
  reference's top-20 tokens, <= 1e-3 max abs; the top-20 sets agree."""
  _, model = smollm2
  logits = forward(model, REF["smol_ids"])
  assert logits.shape == (hf_ref.SMOL_LEN, 49152)
  last = np.abs(logits[-1] - REF["smol_last_logits"]).max()
  top = np.abs(np.take_along_axis(logits, REF["smol_top_ids"], axis=1)
               - REF["smol_top_values"]).max()
  assert last <= 1e-3 and top <= 1e-3, f"max abs diff: last position {last:.2e}, top-20 {top:.2e}"
  ours = np.argsort(-logits, axis=1)[:, :hf_ref.TOP_K]
  assert all(set(a) == set(b) for a, b in zip(ours, REF["smol_top_ids"]))


def test_smollm2_greedy_continuation_matches_transformers(smollm2):
  """(b) 32 greedy tokens with lenx's KV cache (models/generate.py) = transformers'
  generate(do_sample=False); the smallest top-1/top-2 gap on the way is 0.055."""
  _, model = smollm2
  prompt = REF["greedy_prompt"]
  assert np.array_equal(tokenizer.load(SMOLLM2).encode(hf_ref.GREEDY_PROMPT), prompt)
  out = generate(model, prompt[None], hf_ref.GREEDY_NEW, temperature=0.0)[0, len(prompt):]
  assert out.tolist() == REF["greedy_tokens"].tolist()


@pytest.mark.parametrize("book", hf_ref.test_books())
def test_smollm2_tokenizer_matches_transformers_on_a_test_book_paragraph(book):
  tok = tokenizer.load(SMOLLM2)
  para = hf_ref.book_paragraph(hf_ref.book_text(book))
  ids = tok.encode(para)
  assert ids.tolist() == REF["tok_" + book].tolist()
  assert tok.decode(ids) == para
