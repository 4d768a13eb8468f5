"""summary.md and the figures, from results rows alone (so ``--replot`` needs nothing else)."""
import collections
import os

import numpy as np

from evaluation import aggregate, plots
from evaluation.metrics import paired_difference
from evaluation.results import line_label, ok_rows, write_atomic

_HOW_TO_READ = (
    "Cells: mean +- sample sd over the seeds (training runs) of each run group. "
    "`max eval SE`: the largest standard error of a row's mean NLL (nats, shown in % since "
    "SE(log ppl) = SE(nll): 1 % means ppl +- ~1 %), computed over independent units: "
    "evaluation segments spread over the split (`se_unit` = segment) or windows; each "
    "row of results.jsonl carries its `nll_se` and the 95 % interval `ppl_ci95`.")


def _cell(rs, refs=None):
  """'7.68 +- 0.05' (mean +- sd over seeds), 'n/a*' (unsupported), '' (no row)."""
  c = aggregate.cell(rs, refs)
  if c is None:
    return "n/a*" if any(r["status"].startswith("unsupported") for r in rs) else ""
  if refs is None and "excess_nll" in rs[0]:
    acc = f", acc {np.mean([r['answer_acc'] for r in rs]):.2f}" if "answer_acc" in rs[0] else ""
    return f"{np.mean([r['excess_nll'] for r in rs]):.3f}{acc}"
  fmt = "{:.3f}" if refs is not None else "{:.2f}"
  text = fmt.format(c.mean) + (" +- " + fmt.format(c.sd) if c.seeds > 1 else "")
  return text + ("x" if refs is not None else "")


def _table(rows, lengths, relative):
  head = ("| run + variant | train_len | seeds | " + " | ".join(str(n) for n in lengths)
          + " | max eval SE |")
  out = [head, "|" + "---|" * (len(lengths) + 4)]
  for label, by_len in aggregate.lines(rows).items():
    statuses = [r["status"] for rs in by_len.values() for r in rs]
    if all(not s.startswith(("ok", "unsupported")) for s in statuses):
      continue
    first = next(iter(by_len.values()))[0]
    refs = aggregate.train_len_refs(by_len) if relative else None
    cells = [_cell(by_len.get(n, []), refs) for n in lengths]
    seeds = len({r["run_dir"] for rs in by_len.values() for r in rs})
    ses = [c.se for c in (aggregate.cell(rs) for rs in by_len.values()) if c is not None]
    se = f"{100 * max(ses):.1f} %" if ses and not np.isnan(max(ses)) else ""
    out.append(f"| {label} | {first['train_len']} | {seeds} | " + " | ".join(cells)
               + f" | {se} |")
  return out


def _paired_table(rows, lengths):
  """Each variant minus its run's "none" row, mean NLL difference +- its paired SE (the
  same segments are the units, so text difficulty cancels); only rows with segment sums."""
  done = {(r["run_dir"], r["variant"], r["length"]): r for r in ok_rows(rows)
          if r.get("segment_nll_sums") is not None}
  out, label = [], {k[:2]: line_label(r) for k, r in done.items()}
  for run_dir, variant in sorted(k for k in label if k[1] != "none"):
    cells = []
    for n in lengths:
      row, ref = done.get((run_dir, variant, n)), done.get((run_dir, "none", n))
      if row is None or ref is None:
        cells.append("")
      elif row.get("same_as") == "none":
        cells.append("= none")
      else:
        diff, se = paired_difference(row, ref)
        cells.append(f"{diff:+.3f} +- {se:.3f}")
    if any(c not in ("", "= none") for c in cells):
      out.append(f"| {label[run_dir, variant]} | " + " | ".join(cells) + " |")
  if not out:
    return []
  return (["Mean NLL minus the same run's `none` (nats per token), +- the paired standard "
           "error over the segments both scored (text difficulty cancels; `= none`: the "
           "variant computes exactly what none does at that length, row reused):", "",
           "| run + variant | " + " | ".join(str(n) for n in lengths) + " |",
           "|" + "---|" * (len(lengths) + 1)] + out + [""])


def _uncertainty_notes(rows):
  """Where the evaluation standard error reaches 1 % of the perplexity."""
  done = ok_rows(rows)
  missing = [r for r in done if r.get("nll_se") is None]
  notes = [f"{len(missing)} of {len(done)} rows have no standard error (fewer than 2 "
           "independent units: raise max_tokens or use sample=spread)."] if missing else []
  big = [r for r in done if (r.get("nll_se") or 0.0) >= 0.01]
  if not big:
    return notes or ["Every (run, length) has an evaluation standard error below 1 % of "
                     "its perplexity."]
  worst = sorted(big, key=lambda r: -r["nll_se"])
  items = ", ".join(f"{line_label(r)} (seed {r.get('seed')}) L={r['length']}: "
                    f"{100 * r['nll_se']:.1f} %" for r in worst[:12])
  more = f" and {len(worst) - 12} more" if len(worst) > 12 else ""
  return notes + [f"Evaluation standard error >= 1 % of the perplexity in {len(big)} of "
                  f"{len(done)} rows: {items}{more}."]


def summary_markdown(rows):
  """Tables (rows: run+variant, columns: lengths) per (mode, split, max_tokens), notes."""
  text = ["# Extrapolation results", ""]
  groups = collections.OrderedDict()
  for r in rows:
    groups.setdefault((r["mode"], r["split"], r["max_tokens"]), []).append(r)
  for (mode, split, max_tokens), group in groups.items():
    lengths = sorted({r["length"] for r in group})
    synthetic = any("excess_nll" in r for r in group)
    what = "excess loss over the optimum (nats), answer accuracy" if synthetic else "perplexity"
    text += [f"## {mode}, split {split}, max_tokens {max_tokens or 'all'}: {what}", ""]
    text += _table(group, lengths, relative=False) + [""]
    text += ["Perplexity relative to each seed's own value at its training length (or the "
             "longest evaluated length below it), then mean +- sd over seeds:", ""]
    text += _table(group, lengths, relative=True) + [""]
    text += _paired_table(group, lengths)
  text += [_HOW_TO_READ, ""] + _uncertainty_notes(rows) + [""]
  unsupported = sorted({(line_label(r), r["status"]) for r in rows
                        if r["status"].startswith("unsupported")})
  if unsupported:
    text += ["\\* unsupported lengths (rows kept, marked):", ""]
    text += [f"- {label}: {status.split(': ', 1)[1]}" for label, status in unsupported[:20]] + [""]
  skipped = sorted({(r["run"], r["variant"], r["status"]) for r in rows
                    if r["status"].startswith("skipped")})
  if skipped:
    text += ["Skipped (variant does not apply):", ""]
    text += [f"- {run} + {v}: {s.split(': ', 1)[1]}" for run, v, s in skipped] + [""]
  done = ok_rows(rows)
  computed = [r for r in done if not r.get("same_as")]
  total = sum(r.get("seconds") or 0.0 for r in rows)
  compile_s = sum(r.get("compile_s") or 0.0 for r in computed)
  reused = f"; {len(done) - len(computed)} reused an identical row" if len(computed) < len(done) else ""
  text += [f"{len(computed)} rows evaluated in {total:.0f} s "
           f"(compile {compile_s:.0f} s, run {sum(r.get('run_s') or 0.0 for r in computed):.0f} s)"
           f"{reused}.", ""]
  return "\n".join(text)


def write_all(out, rows):
  """summary.md + every figure that has data; returns the paths written."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "summary.md")
  write_atomic(path, summary_markdown(rows))
  return [path] + plots.write_figures(out, rows)
