"""Needle retrieval grid (length x depth) for runs and variants (evaluation/needle.py).

  python eval_needle.py --runs=runs/rope,runs/alibi --lengths=x0.5,x1,x2,x4 \
      --depths=0,0.25,0.5,0.75,1 --trials=20 --variants=none,yarn --out=results/needle
  python eval_needle.py --runs=pretrained:smollm2-135m --lengths=1024,2048 --trials=20 \
      --variants=none,yarn --out=results/needle_smollm2

--lengths: token counts, or xF = F times each run's training length; the default, "grid",
is the issue's grid: 0.5x-64x the training length for a run, 1k-32k tokens for a pretrained
checkpoint. Filler comes from the books of --split (byte runs: bytes; a checkpoint: its BPE). Rows go to --out/needle.jsonl
(one per run x variant x length x depth; a rerun skips finished rows, writes are atomic),
each trial's outcome to --out/needle_trials.jsonl as it is scored (an interrupted cell
resumes from its last trial; a cell asked for more trials reuses those scored before;
two processes can split a cell, e.g. `--trials=10` on one core and `--trials=20
--first_trial=10` on the other, then `--trials=20` alone writes the cell's row from the log),
then --out/needle.md (grid + effective length), one heatmap per run and variant, and
--out/needle_by_distance.png (accuracy by how many tokens back the needle sits).
"""
import functools
import os
import sys

import numpy as np
from absl import app, flags

import extensions
from configs.common import normalize_argv
from evaluation import needle, plots, results
from evaluation.needle import filler_tokens, parse_depths
from evaluation.runner import eval_dtype_for, length_unsupported, variant_model
from extensions import NotApplicable
from input_pipeline.codec import Codec
from training import checkpoint
from training.allocator import reexec_with_huge_pages

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined when run as a script (so tests can import this module
  next to other scripts that define flags of the same names)."""
  flags.DEFINE_string("runs", None, "Comma list of run dirs / pretrained checkpoints.")
  flags.DEFINE_string("lengths", needle.GRID,
                      "Token counts or xF (F x train_len); 'grid' = 0.5x-64x the training "
                      "length for a run, 1k-32k tokens for a pretrained checkpoint.")
  flags.DEFINE_string("depths", "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                      "Needle depths in [0, 1].")
  flags.DEFINE_integer("trials", 20, "Trials (seeds) per cell.")
  flags.DEFINE_integer("first_trial", 0,
                       "Score each cell's trials from this one on (another process scores "
                       "the earlier ones into the same --out); the cell's row is written by "
                       "whichever run finds all its trials scored.")
  flags.DEFINE_integer("distractors", 9, "Distractor keys for the rank.")
  flags.DEFINE_string("variants", "none", "Comma list of variants (as eval_extrapolate.py).")
  flags.DEFINE_enum("split", "test", ["validation", "test"], "Books split of the filler.")
  flags.DEFINE_integer("seed", 0, "Seed of the trials.")
  flags.DEFINE_string("dtype", "", "Matmul dtype: auto | float32 | bfloat16 ('' = the run's own).")
  flags.DEFINE_string("out", None, "Output directory.")


KEY_FIELDS = ("run_dir", "variant", "length", "depth", "trials", "distractors", "split", "seed",
              "eval_dtype")  # eval_dtype: only in rows of a --dtype override
# Trial t's example depends on neither the cell's trial count nor anything scored before it.
TRIAL_FIELDS = tuple(k for k in KEY_FIELDS if k != "trials")
def run_grid(opts, log=print):
  """Computes the missing cells; returns all rows."""
  depths = parse_depths(opts.depths)
  first = getattr(opts, "first_trial", 0)
  if not 0 <= first < opts.trials:
    raise ValueError(f"--first_trial={first}: must lie in 0..{opts.trials - 1} (--trials="
                     f"{opts.trials})")
  os.makedirs(opts.out, exist_ok=True)
  store = results.ResultsFile(os.path.join(opts.out, "needle.jsonl"), KEY_FIELDS)
  trial_log = os.path.join(opts.out, "needle_trials.jsonl")
  scored = scored_trials(trial_log)
  eval_dtype = eval_dtype_for(getattr(opts, "dtype", ""))
  for run_dir in [r.strip() for r in opts.runs.split(",") if r.strip()]:
    config = checkpoint.read_config(run_dir)
    lengths = needle.run_lengths(opts.lengths, run_dir, config.train_len)
    loaded = {}
    for variant in extensions.parse_variants(opts.variants):
      for length in lengths:
        for depth in depths:
          name = os.path.basename(os.path.normpath(run_dir))
          row = {"task": "needle", "run": name, "group": config.get("name") or name,
                 "run_seed": config.get("seed"), "run_dir": run_dir,
                 "posenc": config.posenc.name, "variant": variant.label,
                 "train_len": config.train_len, "length": length, "depth": depth,
                 "trials": opts.trials, "distractors": opts.distractors, "split": opts.split,
                 "seed": opts.seed, **({"eval_dtype": eval_dtype} if eval_dtype else {})}
          if store.key(row) in store:
            continue
          if not loaded:
            loaded["config"], loaded["model"] = checkpoint.load_run(run_dir)
            loaded["codec"] = Codec(config)
            loaded["filler"] = filler_tokens(config, loaded["codec"], opts.split)
          try:
            vconf = extensions.apply_variant(loaded["config"], variant, length)
          except NotApplicable as e:
            store.add({**row, "status": f"skipped: {e}"})
            continue
          model = variant_model(loaded["model"], vconf, eval_dtype)
          unsupported = length_unsupported(model, length)
          if unsupported:  # a learned table shorter than the length: a row that says so
            store.add({**row, "status": unsupported})
            continue
          distance = needle.distance_back(loaded["codec"].encode, length, depth)
          fields = needle.evaluate_cell(
              model, loaded["filler"], loaded["codec"].encode, length, depth, opts.trials,
              opts.seed, opts.distractors, done=scored.get(results.row_key(row, TRIAL_FIELDS)),
              on_trial=functools.partial(_keep_trial, trial_log, row, log), first=first)
          if fields is None:
            log(f"{row['run']} {row['variant']} L={length} depth={depth}: trials "
                f"{first}-{opts.trials - 1} scored; its row waits for trials 0-{first - 1} "
                f"(rerun without --first_trial once they are in {trial_log})")
            continue
          row.update(status="ok", distance=distance, **fields)
          store.add(row)
          log(f"{row['run']} {row['variant']} L={length} depth={depth}: "
              f"acc {row['accuracy']:.2f} rank {row['mean_rank']:.2f}")
  return list(store.rows.values())


def scored_trials(path):
  """{cell key (TRIAL_FIELDS): {t: outcome}} of the trials in a trial log."""
  out = {}
  for r in results.read_rows(path):
    out.setdefault(results.row_key(r, TRIAL_FIELDS), {})[r["trial"]] = {
        k: r[k] for k in ("exact", "rank", "correct")}
  return out


def _keep_trial(path, row, log, t, outcome):
  results.append_row(path, {**{k: row[k] for k in TRIAL_FIELDS if k in row}, "trial": t,
                            **outcome})
  log(f"  trial {t + 1}/{row['trials']}: exact {outcome['exact']} rank {outcome['rank']}")


def distance_function(rows, log=print):
  """row -> the needle's distance back in tokens: the row's own ``distance`` (recorded when
  the cell was scored, so the figure needs no run dir), else ``needle.distance_back`` with
  its run's own codec; None for an older row whose run cannot be read here (left out of the
  distance figure, said once)."""
  encoders = {}
  for run_dir in dict.fromkeys(r["run_dir"] for r in rows  # skipped rows are not drawn
                               if r.get("status") == "ok" and "distance" not in r):
    try:
      encoders[run_dir] = Codec(checkpoint.read_config(run_dir)).encode
    except FileNotFoundError as e:
      log(f"needle_by_distance.png leaves out {run_dir}: {e}")

  @functools.lru_cache(maxsize=None)
  def distance(run_dir, length, depth):
    encode = encoders.get(run_dir)
    return None if encode is None else needle.distance_back(encode, length, depth)
  return lambda r: (r["distance"] if "distance" in r
                    else distance(r["run_dir"], r["length"], r["depth"]))


def largest_cells(rows):
  """Each cell's row with the most trials. A cell re-run with more trials keeps its earlier
  row (the row key holds the trial count), whose trials are the first ones of the larger row
  (trial t's example depends only on seed, length, depth and t): reading both would count
  those trials twice and pass two rows of one cell off as two seeds."""
  largest = {}
  for r in rows:
    cell = results.row_key(r, TRIAL_FIELDS)
    if cell not in largest or r.get("trials", 0) > largest[cell].get("trials", 0):
      largest[cell] = r
  return list(largest.values())


def write_report(out, rows, distance_of=None):
  """needle.md (accuracy grid, effective lengths), one heatmap per run x variant and, given
  ``distance_of`` (``distance_function``), accuracy by the needle's distance back; each cell
  read at its largest trial count."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = results.distinct_run_names(largest_cells(rows))
  groups = {}
  for r in rows:
    if r.get("status") == "ok":
      groups.setdefault((r["run"], r["variant"], r["train_len"]), []).append(r)
  lines = ["# Needle retrieval (teacher-forced exact match; mean over trials)", "",
           "Effective length: longest length up to which the accuracy (mean over the depths "
           "evaluated at every length) stays >= 0.85 x the accuracy at the training length, "
           "counted from the training length up (rel; a variant evaluated only past it: against "
           "the model's own, variant none; shorter lengths that miss it are listed apart), or "
           ">= 0.85 counted from the shortest length (abs, RULER's effective context).", ""]
  for (run, variant, train_len), rs in sorted(groups.items()):
    lengths = sorted({r["length"] for r in rs})
    depths = sorted({r["depth"] for r in rs})
    cell = {(r["length"], r["depth"]): r for r in rs}
    grid = np.array([[cell[(n, d)]["accuracy"] if (n, d) in cell else np.nan for n in lengths]
                     for d in depths])
    lines += [f"## {run} {variant} (train_len {train_len}): effective length "
              + _effective_length_text(rs, groups.get((run, "none", train_len), []), train_len,
                                       depths),
              "", "| depth \\ length | " + " | ".join(map(str, lengths)) + " |",
              "|---" * (len(lengths) + 1) + "|"]
    lines += [f"| {d:g} | " + " | ".join(f"{x:.2f}" for x in grid[i]) + " |"
              for i, d in enumerate(depths)]
    ranks = [np.mean([cell[(n, d)]["mean_rank"] for d in depths if (n, d) in cell])
             for n in lengths]
    lines += ["| mean rank | " + " | ".join(f"{x:.2f}" for x in ranks) + " |"]
    lines += [_token_accuracy_line(cell, lengths, depths), ""]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(lengths), 1 + 0.35 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{run} {variant}", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    safe = f"{run}_{variant}".replace("/", "_").replace(":", "_").replace(",", "_")
    fig.savefig(os.path.join(out, f"needle_heatmap_{safe}.png"), dpi=100)
    plt.close(fig)
  lines += _across_seeds_lines(needle.across_seeds(rows))
  lines += _paired_lines(needle.paired_trials(rows))
  lines += _not_scored_lines(rows)
  results.write_atomic(os.path.join(out, "needle.md"), "\n".join(lines) + "\n")
  placed = [r for r in rows if distance_of is not None and distance_of(r) is not None]
  if placed:
    plots.needle_distance_figure(placed, distance_of, os.path.join(out, "needle_by_distance.png"))


def _not_scored_lines(rows):
  """Cells with a row but no score (a variant that does not apply, a length past a learned
  table), so that a length missing from a grid above is never a silent gap."""
  why = {}
  for r in rows:
    if r.get("status", "ok") != "ok":
      why.setdefault((r["run"], r["variant"], r["length"], r["status"]), []).append(r["depth"])
  if not why:
    return []
  return ["## Cells not scored", ""] + [
      f"- {run} {variant} at {length} (depths {', '.join(f'{d:g}' for d in sorted(depths))}): "
      f"{status}" for (run, variant, length, status), depths in sorted(why.items())] + [""]


def _across_seeds_lines(summary):
  """needle.md's seed table: per run group, variant and length, exact match averaged over
  depths, mean +- sd over training seeds [min, max], and the mean rank."""
  if not summary:
    return []
  lines = ["## Across training seeds (accuracy averaged over depths, then mean +- sd over "
           "seeds [min, max]; mean rank +- sd)", "",
           "| group | variant | length | seeds | exact match | mean rank |", "|---" * 6 + "|"]
  for (group, variant), stats in sorted(summary.items()):
    for length, s in stats.items():
      lines.append(f"| {group} | {variant} | {length} | {s['seeds']} | {s['accuracy']:.3f} +- "
                   f"{s['accuracy_sd']:.3f} [{s['accuracy_min']:.2f}, {s['accuracy_max']:.2f}] | "
                   f"{s['rank']:.2f} +- {s['rank_sd']:.2f} |")
  return lines + [""]


def _effective_length_text(rows, none_rows, train_len, depths):
  """'rel X, abs Y', saying over which depths and against which rows where it is not the
  whole grid of the run's own rows."""
  rel = needle.effective_length(rows, train_len, relative=True, reference=none_rows)
  text = f"rel {rel}, abs {needle.effective_length(rows, train_len, relative=False)}"
  by_none = not any(r["length"] == train_len for r in rows)  # effective_length's choice
  over = needle.common_depths(rows)
  short = needle.short_failures(rows, train_len, reference=none_rows)
  notes = ([f"over depths {', '.join(f'{d:g}' for d in over)}"] if over != depths or by_none
           else [])
  notes += [f"rel against none at {train_len}"] if by_none else []
  notes += [f"under the rel bound below L at {', '.join(map(str, short))}"] if short else []
  return text + (f" ({'; '.join(notes)})" if notes else "")


def _paired_lines(pairs):
  """needle.md's paired tables: two variants on the same trials, exact match by trial, per
  cell and summed over each length's depths."""
  if not pairs:
    return []
  counts = "only b / neither, exact McNemar p; key ranked first: a / b)"
  lines = ["## Variants paired by trial (the same examples; exact match: both / only a / " + counts,
           "", *_pair_table_head("depth")]
  lines += [_pair_line(q, f"{q['depth']:g}") for q in pairs]
  pooled = needle.paired_over_depths(pairs)
  if pooled:
    lines += ["", "## Variants paired over a length's depths (the table above summed over the "
              "depths both were scored at; both / only a / " + counts, "",
              *_pair_table_head("depths")]
    lines += [_pair_line(q, ", ".join(f"{d:g}" for d in q["depths"])) for q in pooled]
  return lines + [""]


def _pair_table_head(where):
  return [f"| run | length | {where} | trials | a | b | both | only a | only b | neither | p | "
          "key first a / b |", "|---" * 12 + "|"]


def _p_text(p):
  return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"  # never a bare 0.000


def _pair_line(q, depths):
  return (f"| {q['run']} | {q['length']} | {depths} | {q['trials']} | {q['a']} | {q['b']} | "
          f"{q['both']} | {q['only_a']} | {q['only_b']} | {q['neither']} | {_p_text(q['p'])} | "
          f"{q['first_a']} / {q['first_b']} |")


def _token_accuracy_line(cell, lengths, depths):
  """Teacher-forced accuracy of each answer token (first/second/...), mean over depths:
  shows which digit of the key a model gets wrong. Rows from before the field: '-'."""
  def acc(n):
    per = [cell[(n, d)]["token_accuracy"] for d in depths
           if (n, d) in cell and "token_accuracy" in cell[(n, d)]]
    return "/".join(f"{x:.2f}" for x in np.mean(per, axis=0)) if per else "-"
  return "| per answer token | " + " | ".join(acc(n) for n in lengths) + " |"


def main(argv):
  del argv
  if not FLAGS.runs or not FLAGS.out:
    raise app.UsageError("need --runs and --out")
  rows = run_grid(FLAGS)
  write_report(FLAGS.out, rows, distance_function(rows))


if __name__ == "__main__":  # flag names are single words: no --a-b spelling to normalise
  reexec_with_huge_pages()  # first: glibc reads its tunables at start (training/allocator.py)
  define_flags()
  app.run(main, argv=normalize_argv(sys.argv))
