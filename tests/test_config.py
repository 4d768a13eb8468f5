"""Config errors are early and name the valid choices."""
import pytest

from configs.common import resolve
from configs.default import get_config


@pytest.mark.parametrize("arg, message", [
    ("posenc=ropee", "unknown positional encoding 'ropee'; valid choices: .*alibi.*rope"),
    ("data=wiki", "unknown data source 'wiki'; valid choices: books, text_dir, tfds, markov"),
])
def test_unknown_names(arg, message):
  with pytest.raises(ValueError, match=message):
    resolve(get_config(arg))


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown size 'huge'; valid choices: tiny, small, base"):
    get_config("size=huge")
  with pytest.raises(ValueError, match="unknown config argument 'lenght'; valid keys: posenc"):
    get_config("lenght=5")
  with pytest.raises(ValueError, match="invalid literal"):
    get_config("train_len=abc")


@pytest.mark.parametrize("field, value, message", [
    ("model.norm", "batchnorm", "unknown model.norm 'batchnorm'; valid choices: rmsnorm, layernorm"),
    ("model.mlp", "relu", "valid choices: swiglu, gelu"),
    ("model.dtype", "float16", "valid choices: float32, bfloat16"),
    ("optim.schedule", "linear", "unknown optim.schedule 'linear'; valid choices: cosine, wsd"),
    ("model.num_heads", 3, "d_model=128 is not divisible by model.num_heads=3"),
    ("train_len", 0, "config.train_len must be > 0"),
    ("model.dropout", 1.5, "dropout must be in"),
])
def test_invalid_values(field, value, message):
  config = get_config()
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message):
    resolve(config)


def test_invalid_rope_scaling_is_rejected_before_compiling():
  config = get_config("posenc=rope")
  config.posenc.rope.scaling.rope_type = "yarnn"
  with pytest.raises(ValueError, match="unknown rope_type 'yarnn'; valid rope types: default"):
    resolve(config)
  config.posenc.rope.scaling.rope_type = "linear"
  config.posenc.rope.scaling.factor = 0.5
  with pytest.raises(ValueError, match="'factor' must be a number >= 1"):
    resolve(config)


def test_every_knob_is_overridable_from_the_command_line(monkeypatch):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  argv = ["prog", "--config=configs/default.py:posenc=rope,size=small",
          "--config.posenc.rope.base=500000", "--config.num_train_steps=7",
          "--config.posenc.rope.scaling.rope_type=yarn", "--config.posenc.rope.scaling.factor=4",
          "--config.model.dtype=bfloat16"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads overrides from sys.argv
  fv(argv)
  c = resolve(fv.config)
  assert (c.posenc.rope.base, c.num_train_steps, c.model.d_model) == (500000, 7, 256)
  assert c.posenc.rope.scaling.factor == 4.0 and c.model.dtype == "bfloat16"
  assert c.model.head_dim == 64 and c.model.mlp_dim == 688


def test_auto_dtype_follows_the_hardware():
  import jax
  from configs.common import resolve
  from models.layers import auto_dtype, cpu_flags
  assert auto_dtype("cpu", {"avx2", "fma", "amx_bf16"})[0] == "bfloat16"
  assert auto_dtype("cpu", {"avx2", "avx512f", "avx512_bf16"})[0] == "bfloat16"
  dtype, why = auto_dtype("cpu", {"avx2", "fma"})
  assert dtype == "float32" and "no bf16" in why
  assert auto_dtype("gpu", set())[0] == "bfloat16"
  c = get_config("posenc=rope")
  c.model.dtype = "auto"
  r = resolve(c)  # resolved once, so config.json records the dtype that ran
  assert r.model.dtype == auto_dtype()[0] and r.model.dtype_auto == auto_dtype()[1]
  assert r.model.dtype == ("bfloat16" if cpu_flags() & {"amx_bf16", "avx512_bf16"}
                           or jax.default_backend() != "cpu" else "float32")


def test_cpu_description_names_model_and_speed_flags(tmp_path):
  from models.layers import cpu_description
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
                  "flags\t\t: fpu sse2 avx avx2 fma bmi2\nprocessor\t: 1\n")
  assert cpu_description(str(info)) == {"model": "AMD EPYC (family 26 model 2)",
                                        "flags": ["avx2", "fma"]}
  info.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: avx2\n")  # no family: name only
  assert cpu_description(str(info))["model"] == "AMD EPYC 7B13"
  assert cpu_description(str(tmp_path / "absent"))["flags"] == []


def test_cpu_dots_follow_the_hardware_and_the_override(monkeypatch):
  from models.layers import cpu_dots
  monkeypatch.delenv("LENX_CPU_DOTS", raising=False)
  assert cpu_dots("cpu", {"avx2", "fma"})[0] == "eigen"
  assert cpu_dots("cpu", {"avx2", "avx512f", "amx_bf16"})[0] == "ynnpack"
  assert cpu_dots("gpu", set())[0] == ""
  monkeypatch.setenv("LENX_CPU_DOTS", "ynnpack")
  assert cpu_dots("cpu", {"avx2"}) == ("ynnpack", "LENX_CPU_DOTS")
  monkeypatch.setenv("LENX_CPU_DOTS", "mkl")
  with pytest.raises(ValueError, match="LENX_CPU_DOTS='mkl'; valid choices: auto, ynnpack, eigen"):
    cpu_dots("cpu", set())


@pytest.mark.parametrize("library", ["eigen", "ynnpack"])
def test_lenx_jit_compiles_with_the_chosen_dot_library(monkeypatch, library):
  """Eigen = no YNNPACK fusion in the compiled step; same numbers either way."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from models.layers import jit
  if jax.default_backend() != "cpu":
    pytest.skip("an XLA:CPU compiler option")
  monkeypatch.setenv("LENX_CPU_DOTS", library)
  x = jax.random.normal(jax.random.key(0), (64, 64))
  f = jit(lambda a: jnp.tanh(a @ a))
  assert ("ynn" in f.lower(x).compile().as_text()) == (library == "ynnpack")
  np.testing.assert_allclose(f(x), jnp.tanh(x @ x), rtol=1e-5, atol=1e-5)
