"""Several small training runs at once on a CPU, one process per core (demo.py).

Why: the demo's runs are tiny (4 x 128 tokens per step, d_model 128), too small for two
threads to share one step well. Measured on a 2-core AMD EPYC (avx2 + fma, KVM), the demo
recipe's step (benchmarks/throughput.py, 2 layers, d128, batch 4, seq 128, float32, 300
steps): one process on both cores 20.8k tokens/s; one process pinned to one core 15.7-17.0k;
two processes pinned to one core each 15.9k + 17.5k = 33.4k together, 1.6x the one process.

A worker is ``python -m training.worker`` pinned to one core (``os.sched_setaffinity``:
XLA:CPU's thread pool and lenx's attention kernel size themselves from the affinity mask);
it stays up for the next run on its core (a fresh process per run cost ~4 s of imports and
start-up each) and reads each job, pickled, from stdin; a training run writes its output to
``<workdir>/train.log``. An interrupted run resumes from its checkpoint like any run.
A run that fails does not stop the others; runs that start from it (fine-tunes) are
skipped, and the error names each failed run and its log after everything else finished.
"""
import os
import pickle
import select
import subprocess
import sys
import time

import jax

from training import compile_cache

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


class _Worker:
  """A ``training.worker`` process pinned to ``cpu``, given one job at a time."""

  def __init__(self, cpu):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])), **compile_cache.child_env())
    self.proc = subprocess.Popen([sys.executable, "-m", "training.worker", str(cpu)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

  def alive(self):
    return self.proc.poll() is None

  def send(self, task, args):
    os.makedirs(os.path.dirname(task.log) or ".", exist_ok=True)
    module, function, _ = task.call
    pickle.dump((task.log, module, function, args), self.proc.stdin)
    self.proc.stdin.flush()

  def succeeded(self):
    """The answer to the job sent last (call once its line is readable); a worker that
    died answers nothing: failed."""
    answer = self.proc.stdout.readline().strip()
    if not answer:  # it died: reaped here, so that the next job starts a fresh worker
      self.proc.wait()
    return answer == b"ok"

  def stop(self, now=False):
    if now:
      self.proc.terminate()
    else:
      self.proc.stdin.close()  # EOF: the worker returns after its last job
    self.proc.wait()


def _tail(path, lines=15):
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run_pool(tasks, cpus, poll_s=0.2):
  """Runs every task, at most one per core of ``cpus`` at a time, a task only after the
  task it starts from (``after``) succeeded. Raises RuntimeError naming the failed runs
  (and their logs) once the rest finished; on an interrupt the workers are stopped (their
  runs resume from the last checkpoint next time)."""
  pending, running, failed, skipped, t0 = list(tasks), {}, [], [], {}
  pool = {}  # cpu -> _Worker, kept for the next task on that core
  try:
    while pending or running:
      for task in [t for t in pending if t.after in failed + skipped]:
        pending.remove(task)
        skipped.append(task)
        print(f"{task.name}: skipped, {task.after.name} did not finish", flush=True)
      free = [c for c in cpus if c not in running]
      ready = [t for t in pending
               if t.after is None or t.after not in pending + list(running.values())]
      for cpu, task in zip(free, ready):
        args = task.call[2]()  # first: a bad config raises here, before a worker waits on it
        pending.remove(task)
        if cpu not in pool or not pool[cpu].alive():
          pool[cpu] = _Worker(cpu)
        pool[cpu].send(task, args)
        running[cpu], t0[task.name] = task, time.perf_counter()
      answered = select.select([pool[c].proc.stdout for c in running], [], [], poll_s)[0]
      for cpu, task in list(running.items()):
        if pool[cpu].proc.stdout not in answered:
          continue
        del running[cpu]
        if pool[cpu].succeeded():
          print(f"{task.name}: done in {time.perf_counter() - t0[task.name]:.0f} s "
                f"(core {cpu})", flush=True)
        else:
          failed.append(task)
          print(f"{task.name}: FAILED, last lines of {task.log}:\n" + _tail(task.log),
                flush=True)
  finally:
    for worker in pool.values():
      worker.stop(now=bool(running))
  if failed:
    raise RuntimeError("failed: " + ", ".join(f"{t.name} (log: {t.log})" for t in failed)
                       + "".join(f"; skipped: {t.name} (needs {t.after.name})" for t in skipped))
