"""summary.md and the figures, from results rows alone (so ``--replot`` needs nothing else)."""
import collections
import os

from evaluation import plots
from evaluation.results import at_train_len, line_label, ok_rows, write_atomic


def _cell(row, rel=None):
  if row is None:
    return ""
  if row["status"].startswith("unsupported"):
    return "n/a*"
  if row["status"] != "ok":
    return ""
  if rel is not None:
    return f"{row['ppl'] / rel:.2f}x" if rel else ""
  if "excess_nll" in row:
    acc = f", acc {row['answer_acc']:.2f}" if "answer_acc" in row else ""
    return f"{row['excess_nll']:.3f}{acc}"
  return f"{row['ppl']:.2f}"


def _table(rows, lengths, relative):
  head = "| run + variant | train_len | " + " | ".join(str(n) for n in lengths) + " |"
  out = [head, "|" + "---|" * (len(lengths) + 2)]
  groups = collections.OrderedDict()
  for r in rows:
    groups.setdefault(line_label(r), {})[r["length"]] = r
  for label, by_len in groups.items():
    if all(not r["status"].startswith(("ok", "unsupported")) for r in by_len.values()):
      continue
    train_len = next(iter(by_len.values()))["train_len"]
    base = None
    if relative:
      ref = at_train_len({n: r for n, r in by_len.items() if r["status"] == "ok"}, train_len)
      base = ref["ppl"] if ref else 0.0
    cells = [_cell(by_len.get(n), base) for n in lengths]
    out.append(f"| {label} | {train_len} | " + " | ".join(cells) + " |")
  return out


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
    text += ["Perplexity relative to the same run+variant at its training length "
             "(or the longest evaluated length below it):", ""]
    text += _table(group, lengths, relative=True) + [""]
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
  total = sum(r.get("seconds") or 0.0 for r in rows)
  compile_s = sum(r.get("compile_s") or 0.0 for r in done)
  text += [f"{len(done)} rows evaluated in {total:.0f} s "
           f"(compile {compile_s:.0f} s, run {sum(r.get('run_s') or 0.0 for r in done):.0f} s).", ""]
  return "\n".join(text)


def write_all(out, rows):
  """summary.md + every figure that has data; returns the paths written."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "summary.md")
  write_atomic(path, summary_markdown(rows))
  return [path] + plots.write_figures(out, rows)
