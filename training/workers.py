"""Several small training runs at once on a CPU, one process per core (demo.py).

Why: the demo's runs are tiny (4 x 128 tokens per step, d_model 128), too small for two
threads to share one step well. Measured on a 2-core AMD EPYC (avx2 + fma, KVM), the demo
recipe's step (benchmarks/throughput.py, 2 layers, d128, batch 4, seq 128, float32, 300
steps): one process on both cores 20.8k tokens/s; one process pinned to one core 15.7-17.0k;
two processes pinned to one core each 15.9k + 17.5k = 33.4k together, 1.6x the one process.

A worker is ``python -m training.worker`` pinned to one core (``os.sched_setaffinity``:
XLA:CPU's thread pool and lenx's attention kernel size themselves from the affinity mask),
reading the pickled (module, function, args) to call from stdin; a training run writes its
output to ``<workdir>/train.log``. An interrupted worker resumes from its checkpoint like any run.
A run that fails does not stop the others; runs that start from it (fine-tunes) are
skipped, and the error names each failed run and its log after everything else finished.
"""
import os
import pickle
import subprocess
import sys
import time

import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_NAME = "train.log"


def cpu_slots(workers=0):
  """The cores to pin one worker each to; [] = train in this process, one run at a time.

  workers: 0 = one per core this process may use when the backend is the CPU (a GPU or
  TPU trains one run at a time in-process); 1 = in-process; n = n workers (at most one
  per core)."""
  if workers < 0:
    raise ValueError(f"workers={workers}; valid: 0 (one per CPU core), 1 (in-process), n > 1")
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if jax.default_backend() != "cpu" or len(cores) < 2 or workers == 1:
    return []
  return cores[:workers or len(cores)]


class Task:
  """One job for the pool: ``module.function(*args())`` in a worker, output to ``log``,
  started only after the Task ``after`` (if any) succeeded."""

  def __init__(self, name, log, module, function, args, after=None):
    self.name, self.log, self.after = name, log, after
    self.call = (module, function, args)  # args: called when the task starts

  @classmethod
  def training(cls, name, workdir, make_config, after=None):
    return cls(name, os.path.join(workdir, LOG_NAME), "train", "train_and_evaluate",
               lambda: (make_config(), workdir), after)


def _start(task, cpu):
  os.makedirs(os.path.dirname(task.log) or ".", exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
  if jax.config.jax_compilation_cache_dir:  # the workers share this process's compile cache
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  module, function, args = task.call
  payload = pickle.dumps((module, function, args()))  # first: a bad config raises here
  with open(task.log, "ab") as log:
    proc = subprocess.Popen([sys.executable, "-m", "training.worker", str(cpu)],
                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env)
  proc.stdin.write(payload)
  proc.stdin.close()
  return proc


def _tail(path, lines=15):
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run_pool(tasks, cpus, poll_s=0.2):
  """Runs every task, at most one per core of ``cpus`` at a time, a task only after the
  task it starts from (``after``) succeeded. Raises RuntimeError naming the failed runs
  (and their logs) once the rest finished; on an interrupt the workers are stopped (their
  runs resume from the last checkpoint next time)."""
  pending, running, failed, skipped, t0 = list(tasks), {}, [], [], {}
  try:
    while pending or running:
      for task in [t for t in pending if t.after in failed + skipped]:
        pending.remove(task)
        skipped.append(task)
        print(f"{task.name}: skipped, {task.after.name} did not finish", flush=True)
      free = [c for c in cpus if c not in running]
      ready = [t for t in pending
               if t.after is None or t.after not in pending + [r for r, _ in running.values()]]
      for cpu, task in zip(free, ready):
        pending.remove(task)
        running[cpu], t0[task.name] = (task, _start(task, cpu)), time.perf_counter()
      for cpu, (task, proc) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[cpu]
        if proc.returncode:
          failed.append(task)
          print(f"{task.name}: FAILED (exit {proc.returncode}), last lines of {task.log}:\n"
                + _tail(task.log), flush=True)
        else:
          print(f"{task.name}: done in {time.perf_counter() - t0[task.name]:.0f} s "
                f"(core {cpu})", flush=True)
      time.sleep(poll_s)
  finally:
    for _, proc in running.values():
      proc.terminate()
      proc.wait()
  if failed:
    raise RuntimeError("failed: " + ", ".join(f"{t.name} (log: {t.log})" for t in failed)
                       + "".join(f"; skipped: {t.name} (needs {t.after.name})" for t in skipped))
