"""evaluation/heads.py: the attention maps are the model's own attention, and the scores
read the diagonals they name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import resolve
from evaluation import heads
from models import build_model


@pytest.mark.parametrize("name", ["rope", "alibi", "learned", "t5_bias", "cope"])
def test_maps_times_values_give_each_layers_attention_output(name, tiny_config):
  """Every layer's maps, applied to its values and the output projection, reproduce the
  attention branch the model computes (whatever path it takes: kernel, XLA)."""
  model = build_model(resolve(tiny_config(posenc=name, **{"model.num_layers": 2})))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
  pos = jnp.broadcast_to(jnp.arange(24), tokens.shape)
  maps = heads.attention_maps(model, tokens, pos)
  x = model.embed(tokens, pos)
  for block, probs in zip(model.blocks, maps):
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0  # causal
    h = block.attn_norm(x)
    want, _ = block.attn(h, pos, model.posenc)
    _, _, v = block.attn.prepare(*block.attn.project(h), pos, pos, model.posenc)
    got = block.attn.out(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 24, -1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    x, _ = block(x, pos, model.posenc)


def _one_hot_rows(s, key_of):
  """[1, 1, s, s] with row i all on key_of(i)."""
  return jax.nn.one_hot(jnp.array([key_of(i) for i in range(s)]), s)[None, None]


def test_scores_read_the_named_diagonals():
  s, span = 16, 8
  previous = _one_hot_rows(s, lambda i: max(i - 1, 0))
  assert float(heads.diagonal_score(previous, 1)[0]) == 1.0
  assert float(heads.diagonal_score(previous, 0)[0]) == pytest.approx(1 / s)  # row 0 only
  # induction on a span repeated once: query span + j -> key j + 1 (j = 0 .. span - 2)
  induction = _one_hot_rows(s, lambda i: i - span + 1 if span <= i < 2 * span - 1 else i)
  assert float(heads.diagonal_score(induction, span - 1, 1, span)[0]) == 1.0
  assert float(heads.diagonal_score(previous, span - 1, 1, span)[0]) == 0.0


def test_repeat_windows_copy_a_span_into_text_and_copy_nll_is_its_loss(tiny_config):
  text = np.asarray(jax.random.randint(jax.random.key(2), (3, 32), 0, 256))
  rep, first, second = heads.repeat_windows(text, 8, np.random.default_rng(0))
  assert (first, second) == (8, 24)
  assert (rep[:, 8:16] == rep[:, 24:]).all() and (rep[:, :8] == text[:, :8]).all()
  assert (rep[:, 16:24] == text[:, 16:24]).all()
  model = build_model(resolve(tiny_config(posenc="rope")))
  scores = heads.head_scores(model, text, 8, np.random.default_rng(0))
  assert scores["previous"].shape == scores["induction"].shape == (1, 2)
  assert abs(scores["copy_nll"] - np.log(256)) < 0.5  # an untrained byte model: ~uniform
  with pytest.raises(ValueError, match="does not fit twice"):
    heads.repeat_windows(text, 17, np.random.default_rng(0))
