"""The lenx demo (``make demo``): train small byte models, one per encoding family, then
evaluate them from 64 to 4096 tokens and write results/demo/ (configs/sweep_demo.py).

  python demo.py            # 27-30 min on a 2-core CPU; reuses finished runs in runs/demo/
  python demo.py --full     # every registered family, same recipe (runs/demo_full/)
  python demo.py --smoke    # micro version (seconds): 2 runs x 2 seeds x 2 lengths x 2 variants

On a CPU, one run per core trains at a time in a pinned worker process (training/workers.py).
Every run group is trained once per seed (``<runs_dir>/<group>-s<seed>``, config.seed and
config.name recorded in its config.json and in every results row).
A run is reused when its latest checkpoint step equals num_train_steps; an interrupted
run resumes. An encoding or option that is not registered in this checkout is skipped
with a message, so the demo works for the others.
"""
import copy
import functools
import os
import sys
import time

import ml_collections
from absl import app, flags, logging

import posenc

from configs import finetune, sweep_demo
from configs.common import resolve
from configs.default import get_config
from models.layers import resolve_dtype
from evaluation import phenomena, results, sweep
from training import checkpoint, compile_cache, workers
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined when run as a script (so tests can import this module
  next to other scripts that define flags of the same names)."""
  flags.DEFINE_bool("smoke", False, "Micro version: 2 tiny runs, 2 lengths, 2 variants.")
  flags.DEFINE_bool("full", False, "Full study: every registered family (runs/demo_full).")
  flags.DEFINE_bool("needle", False, "Retrieval study: the quick families trained with the "
                    "needle mixture, then the needle grid (runs/demo_needle).")
  flags.DEFINE_string("only", "", "Comma list of demo run names to use (default: all).")
  flags.DEFINE_string("runs_dir", "", "Override train.runs_dir.")
  flags.DEFINE_string("out", "", "Override the output directory.")


# Seconds per evaluated row by the dtype the demo runs in. bf16: make demo on the 2-core
# Xeon with AMX (0.4-1 s compile + 1-5 s for 131072 tokens). float32: the whole quick demo
# on a 2-core AMD EPYC with AVX2 only (where `auto` picks it), 2026-12-01, with the fused CPU
# attention kernel for every quick family (ALiBi / T5 biases included) and one compile per
# program across seeds: 231 rows in 14.9 min (it was 7.2 s per row before those two changes);
# 15.5 min on 2026-12-02 from an empty compile cache (a first run: 1.5 min of it compiling
# the rows' programs, 3.1 the attention statistics with their own compiles); 12.6 min (3.3 s
# per row) once the kernel computed the statistics in its own pass (10.6 min forward, 1.2
# compiling). bf16 (Xeon) not re-measured since.
EVAL_S_PER_ROW = {"bfloat16": 4.0, "float32": 3.3}
# demo.py --needle, bf16, the Xeon: 105 cells of 0.5x-8x L in 3.4 min; float32 not measured,
# scaled by the perplexity rows' float32 / bf16 ratio of the previous session (7.2 / 4.0 s
# per row). The grid now reaches 64x L: on the Zen 4 EPYC (bf16, one run, none + yarn, 3
# depths x 20 trials) a cell of the full grid costs 1.63x one of 0.5x-8x (223 s for 48
# cells vs 85.5 s for 30), so both are scaled by that
NEEDLE_S_PER_CELL = {"bfloat16": 3.3, "float32": 6.4}


def _set(config, dotted, text):
  """config.a.b = text cast to the type of the current value."""
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  if leaf not in node:
    raise ValueError(f"unknown config field {dotted!r}")
  old = node[leaf]
  node[leaf] = text.lower() in ("1", "true") if isinstance(old, bool) else type(old)(text)


def seeds_of(demo):
  return [int(x) for x in str(demo.train.seeds).split(",") if x.strip()]


def run_config(demo, spec, seed=0, name=""):
  """The training config of one demo run (ValueError if this checkout cannot build it)."""
  t = demo.train
  config = get_config(f"{spec.args},train_len={t.train_len}")
  config.model.num_layers, config.model.d_model, config.model.num_heads = (
      t.num_layers, t.d_model, t.num_heads)
  config.batch_size, config.num_train_steps = t.batch_size, t.num_train_steps
  config.optim.warmup_steps, config.eval_tokens = t.warmup_steps, t.eval_tokens
  config.optim.learning_rate = t.learning_rate
  config.model.dtype = t.get("dtype", "float32")
  config.eval_every = config.checkpoint_every = t.num_train_steps
  config.log_every = max(1, min(20, t.num_train_steps))
  config.seed, config.name = seed, name
  for item in filter(None, f"{spec.overrides};{t.get('overrides', '')}".split(";")):
    key, _, value = item.partition("=")
    _set(config, key.strip(), value.strip())
  resolve(config)  # validates: unknown encodings / position kinds raise here
  return config


def finetune_config(spec, source_dir, name):
  """configs/finetune.py on the trained source run (same seed); recorded under ``name``."""
  config = finetune.get_config(f"init_from={source_dir},{spec.args}")
  config.name = name
  return config


def done_steps(workdir):
  if not os.path.exists(checkpoint.config_path(workdir)):
    return 0
  return checkpoint.manager(workdir).latest_step() or 0


class Job:
  """One training run of the plan: a (group, seed) pair, or the fine-tune of one."""

  def __init__(self, name, seed, workdir, steps, tokens_per_step, make_config, source=None,
               speed=1.0):
    self.name, self.seed, self.workdir, self.steps = name, seed, workdir, steps
    self.tokens_per_step, self.make_config, self.source = tokens_per_step, make_config, source
    self.speed = speed  # training tokens/s relative to rope (benchmarks/encodings.py)

  def left(self):
    return max(0, self.steps - done_steps(self.workdir))


def plan(demo, only=()):
  """(jobs, notes) in training order, and prints the timing plan."""
  t, jobs, notes = demo.train, [], []
  wanted = lambda name: not only or name in only
  for name, spec in t.runs.items():
    if not wanted(name):
      continue
    try:
      encoding = run_config(demo, spec).posenc.name
    except ValueError as e:
      notes.append(f"  {name:18s} skipped: {e}")
      continue
    for seed in seeds_of(demo):
      jobs.append(Job(name, seed, os.path.join(t.runs_dir, f"{name}-s{seed}"), t.num_train_steps,
                      t.batch_size * t.train_len,
                      functools.partial(run_config, demo, spec, seed, name),
                      speed=t.speed_vs_rope.get(encoding, 1.0)))
  by_key = {(j.name, j.seed): j for j in jobs}
  for name, spec in t.get("finetunes", {}).items():
    args = dict(kv.split("=", 1) for kv in spec.args.split(","))
    for seed in seeds_of(demo):
      src = by_key.get((spec.source, seed))
      if src is None or not wanted(name):
        continue
      jobs.append(Job(name, seed, os.path.join(t.runs_dir, f"{name}-s{seed}"), int(args["steps"]),
                      t.batch_size * t.train_len,  # finetune.py keeps the tokens per step
                      functools.partial(finetune_config, spec, src.workdir, name), src,
                      speed=src.speed))
  _print_plan(demo, jobs, notes)
  return jobs


def _print_plan(demo, jobs, notes):
  t = demo.train
  dtype = resolve_dtype(t.get("dtype", "float32"))[0]
  cores = workers.cpu_slots(demo.train.get("workers", 0))
  rate = (t.core_tokens_per_s if cores else t.tokens_per_s)[dtype]
  secs = lambda j: (j.left() * j.tokens_per_step / (rate * j.speed)
                   + (t.run_overhead_s if j.left() else 0))
  n_groups = len({j.name for j in jobs if j.source is None})
  print(f"demo plan ({len(jobs)} runs: {n_groups} groups x seeds {t.seeds} + fine-tunes; "
        f"{t.num_layers} layers, d_model {t.d_model}, {t.num_train_steps} steps x "
        f"{t.batch_size} x {t.train_len} tokens, lr {t.learning_rate}; "
        + (f"{len(cores)} runs at a time, one per CPU core" if cores else "one run at a time")
        + "):")
  for j in jobs:
    left = j.left()
    print(f"  {os.path.basename(j.workdir):22s} "
          + ("finished, reused" if not left else f"train {left} steps, ~{secs(j):.0f} s"))
  print("\n".join(notes))
  grid = demo.get("needle") or demo  # what the study evaluates: perplexity rows or needle cells
  per_row = (NEEDLE_S_PER_CELL if "needle" in demo else EVAL_S_PER_ROW)[dtype]
  n_variants = len(grid.variants.split(","))
  groups = {(j.name, j.source is None) for j in jobs}
  rope = {name for name, spec in t.runs.items() if "posenc=rope" in spec.args}
  rows = (len(seeds_of(demo)) * len(grid.lengths.split(",")) * len(grid.get("depths", "-").split(","))
          * sum(n_variants if (name in rope and primary) else 1 for name, primary in groups))
  print(f"  estimate: training ~{_makespan(jobs, secs, max(1, len(cores))) / 60:.1f} min (at "
        f"{rate:,.0f} tokens/s{' per core' if cores else ''}, {dtype}), evaluation ~{rows * per_row / 60:.1f} min ({rows} rows)", flush=True)


def _makespan(jobs, secs, slots):
  """Wall seconds to train ``jobs`` in order on ``slots`` workers, a fine-tune after its
  source (the schedule of workers.run_pool)."""
  free, end = [0.0] * slots, {}
  for j in jobs:
    slot = min(range(slots), key=free.__getitem__)
    start = max(free[slot], end.get(id(j.source), 0.0))
    free[slot] = end[id(j)] = start + secs(j)
  return max(free)


def run_demo(demo, only=()):
  """Trains what is missing, evaluates; returns the sweep rows."""
  t0 = time.perf_counter()
  jobs = plan(demo, only)
  if not jobs:
    raise ValueError("no demo run could be built in this checkout")
  _train(jobs, workers.cpu_slots(demo.train.get("workers", 0)))
  t_train = time.perf_counter() - t0
  # Extension variants apply to the pre-trained runs; a fine-tune is evaluated as trained.
  demo.runs = ",".join(j.workdir for j in jobs if j.source is None)
  if demo.get("task") == "needle":
    return _needle_grid(demo, t0, t_train)
  rows = sweep.run_sweep(demo)
  tuned = [j.workdir for j in jobs if j.source is not None]
  if tuned:
    ft = copy.deepcopy(demo)
    ft.runs, ft.variants = ",".join(tuned), "none"
    rows = sweep.run_sweep(ft)
  results.write_atomic(os.path.join(demo.out, "phenomena.md"),
                       "# Published phenomena, checked\n\n" + phenomena.markdown(rows) + "\n")
  _print_wall_time("demo", t0, t_train, demo.out)
  return rows


def _train(jobs, cores):
  """Trains the jobs that are not finished: one worker process per core, or in-process."""
  todo = [j for j in jobs if j.left()]
  if cores:
    tasks = {id(j): workers.Task.training(os.path.basename(j.workdir), j.workdir, j.make_config)
             for j in todo}
    for j in todo:
      tasks[id(j)].after = tasks.get(id(j.source))
    workers.run_pool(list(tasks.values()), cores)
    return
  import train  # imported here: its absl flags are defined at import
  for job in todo:
    t1 = time.perf_counter()
    train.train_and_evaluate(job.make_config(), job.workdir)
    print(f"{os.path.basename(job.workdir)}: trained in {time.perf_counter() - t1:.0f} s",
          flush=True)


def _print_wall_time(study, t0, t_train, out):
  total = time.perf_counter() - t0
  print(f"{study} wall time {total / 60:.1f} min (training {t_train / 60:.1f}, "
        f"evaluation {(total - t_train) / 60:.1f}); results in {out}/")


def _needle_grid(demo, t0, t_train):
  """The retrieval study's evaluation: eval_needle's grid over the trained runs."""
  import eval_needle  # pylint: disable=g-import-not-at-top
  opts = ml_collections.ConfigDict({**demo.needle.to_dict(), "runs": demo.runs, "out": demo.out})
  rows = eval_needle.run_grid(opts)
  eval_needle.write_report(demo.out, rows)
  _print_wall_time("needle study", t0, t_train, demo.out)
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  compile_cache.enable()
  if FLAGS.full and FLAGS.needle:
    raise app.UsageError("--full and --needle are two different studies; pick one")
  kind = "full" if FLAGS.full else "needle" if FLAGS.needle else "quick"
  demo = sweep_demo.get_config(("needle_smoke" if FLAGS.needle else "smoke") if FLAGS.smoke
                               else kind)
  if FLAGS.runs_dir:
    demo.train.runs_dir = FLAGS.runs_dir
  if FLAGS.out:
    demo.out = FLAGS.out
  run_demo(demo, only=tuple(filter(None, FLAGS.only.split(","))))


if __name__ == "__main__":
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  define_flags()
  app.run(main, argv=[a.replace("--runs-dir", "--runs_dir") for a in sys.argv])
