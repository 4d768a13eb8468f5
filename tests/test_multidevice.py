"""Data-parallel / FSDP training on 8 simulated CPU devices equals one device, and
checkpoints move between meshes. Runs in a child process: the device count must be
set before jax starts, and this pytest process has already started it."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
  import json, os, sys
  import jax, numpy as np
  from tests.conftest import make_tiny_config
  import train
  from training import checkpoint
  from training.mesh import make_mesh, state_sharding
  assert len(jax.devices()) == 8, jax.devices()
  tmp = sys.argv[1]

  def run(name, data, fsdp, steps=4, stop_after=None):
    c = make_tiny_config(data="markov", train_len=16, batch_size=8, num_train_steps=6,
                         log_every=1, eval_every=100, checkpoint_every=steps)
    c.mesh.data, c.mesh.fsdp = data, fsdp
    train.train_and_evaluate(c, os.path.join(tmp, name), stop_after=stop_after or steps)
    with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
      return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]

  one = run("one", 1, 1, steps=6)
  dp = run("dp", -1, 1)  # 8-way data parallel, checkpoint at step 4
  fsdp = run("fsdp", 2, 4)  # 2-way data x 4-way parameter sharding
  resumed = run("dp", 1, 1, stop_after=2)  # the 8-way checkpoint resumed on one device
  # fsdp really shards: the largest kernel is split 4 ways
  mesh = make_mesh({"data": 2, "fsdp": 4})
  spec = state_sharding(mesh, {"w": np.zeros((32, 96))})["w"].spec
  print(json.dumps({"one": one, "dp": dp, "fsdp": fsdp, "resumed": resumed, "spec": str(spec)}))
""")


def test_mesh_matches_single_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one = out["one"]
  assert len(one) == 6
  for name in ("dp", "fsdp"):
    assert max(abs(a - b) for a, b in zip(out[name], one[:4])) < 1e-5, (name, out[name], one)
  assert len(out["resumed"]) == 6  # 4 logged before the move + 2 after
  assert max(abs(a - b) for a, b in zip(out["resumed"][4:], one[4:])) < 1e-5, out
  assert "fsdp" in out["spec"]
