"""The published extrapolation phenomena, checked against a demo study's rows.

Each check states the literature's claim, the quantity computed from the rows (seed mean
+- sd of perplexity ratios, each seed divided by its own value at the training length L,
as in ``evaluation.aggregate``), a fixed criterion written before the demo was run, and
whether the rows meet it. The criteria are deliberately plain (ratios and orderings), so a
reader can re-judge them from the table; nothing here is tuned to a published answer.

  python -m evaluation.phenomena results/demo      # prints the markdown table

Sources: Press et al. 2022 (ALiBi), fig. 1 / table 1: sinusoidal and rotary degrade within
a few hundred tokens past L, T5 bias slowly, ALiBi flat; Kazemnejad et al. 2023 (NoPE):
NoPE between; Chi et al. 2022 (KERPLE): flat like ALiBi; Chen et al. 2023 (PI) fig. 1 /
table 1: zero-shot interpolation is poor, a short fine-tune makes it the best; bloc97
2023 / Peng et al. 2023 (NTK-aware, dynamic NTK, YaRN): better zero-shot than PI.
"""
import sys

from evaluation import aggregate
from evaluation.results import ok_rows, read_rows

DEGRADE = 1.10  # "degrades": ppl at the length >= 1.10 x its value at L
FLAT = 1.02  # "flat": ppl at the longest length <= 1.02 x its value at L


def _lines(rows):
  """{label: {length: [rows]}} of ok rows, and each line's training length."""
  return aggregate.lines(ok_rows(rows))


def ratio(lines, label, length):
  """Cell (mean +- sd over seeds) of ppl(length) / ppl(L) for ``label``, or None."""
  by_len = lines.get(label)
  if not by_len or length not in by_len:
    return None
  return aggregate.cell(by_len[length], aggregate.train_len_refs(by_len))


def ppl(lines, label, length):
  by_len = lines.get(label)
  return aggregate.cell(by_len[length]) if by_len and length in by_len else None


def _clearly_below(a, b):
  """a's mean below b's by more than 2 standard errors of the difference over seeds."""
  if a is None or b is None:
    return False
  se = (a.sd ** 2 / a.seeds + b.sd ** 2 / b.seeds) ** 0.5
  return b.mean - a.mean > 2 * se


def _fmt(c, unit="x"):
  if c is None:
    return "n/a"
  digits = 3 if unit == "x" else 2
  return f"{c.mean:.{digits}f} +- {c.sd:.{digits}f}{unit}"


def _verdict(ok, partial=False):
  return "yes" if ok else ("partly" if partial else "no")


def checks(rows):
  """[(phenomenon, measured, criterion, verdict)] for the families present in ``rows``."""
  lines = _lines(rows)
  if not lines:
    return []
  train_len = min(r["train_len"] for rs in next(iter(lines.values())).values() for r in rs)
  lengths = sorted({n for by_len in lines.values() for n in by_len})
  far, l2, l4 = max(lengths), 2 * train_len, 4 * train_len
  out = []

  absolute = [f for f in ("sinusoidal", "learned") if f in lines]
  if absolute:
    cells = {f: ratio(lines, f, l2) for f in absolute}
    measured = "; ".join(f"{f} {_fmt(c)} at {l2}" for f, c in cells.items())
    hits = [c is not None and c.mean >= DEGRADE for c in cells.values()]
    out.append(("sinusoidal and learned absolute degrade right past L", measured,
                f"ratio at 2L >= {DEGRADE}", _verdict(all(hits), any(hits))))
  if "rope" in lines:
    c2, c4 = ratio(lines, "rope", l2), ratio(lines, "rope", l4)
    out.append(("rotary (RoPE) degrades past L", f"{_fmt(c2)} at {l2}, {_fmt(c4)} at {l4}",
                f"ratio at 4L >= {DEGRADE}", _verdict(c4 is not None and c4.mean >= DEGRADE)))
  if "t5_bias" in lines and "rope" in lines:
    near, far_ok = (_clearly_below(ratio(lines, "t5_bias", n), ratio(lines, "rope", n))
                    for n in (l4, far))
    out.append(("T5 bias degrades slowly (slower than rotary)",
                f"t5_bias {_fmt(ratio(lines, 't5_bias', l4))} vs rope "
                f"{_fmt(ratio(lines, 'rope', l4))} at {l4}; t5_bias "
                f"{_fmt(ratio(lines, 't5_bias', far))} vs rope {_fmt(ratio(lines, 'rope', far))} "
                f"at {far}", "ratio below rope's by > 2 SE (over seeds) at 4L and at the "
                "longest length", _verdict(near and far_ok, near or far_ok)))
  flat = [f for f in ("alibi", "kerple_log", "kerple_power") if f in lines]
  if flat:
    cells = {f: ratio(lines, f, far) for f in flat}
    hits = [c is not None and c.mean <= FLAT for c in cells.values()]
    out.append(("ALiBi and KERPLE stay flat or improve",
                "; ".join(f"{f} {_fmt(c)} at {far}" for f, c in cells.items()),
                f"ratio at the longest length <= {FLAT}", _verdict(all(hits), any(hits))))
  if "nope" in lines:
    nope = ratio(lines, "nope", far)
    ends = {f: ratio(lines, f, far) for f in ("alibi", "rope", "sinusoidal") if f in lines}
    lo = min((c.mean for f, c in ends.items() if f == "alibi" and c), default=None)
    hi = min((c.mean for f, c in ends.items() if f != "alibi" and c), default=None)
    ok = nope is not None and lo is not None and hi is not None and lo < nope.mean < hi
    out.append(("NoPE in between (degrades less than rotary / sinusoidal, more than ALiBi)",
                f"nope {_fmt(nope)} at {far}; " + "; ".join(f"{f} {_fmt(c)}"
                                                          for f, c in ends.items()),
                "alibi < nope < min(rope, sinusoidal) at the longest length", _verdict(ok)))
  out += _rope_variant_checks(lines, l4)
  return out


def _rope_variant_checks(lines, length):
  zero_shot = {v: ppl(lines, f"rope +{v}", length) for v in ("ntk", "dynamic", "yarn")}
  zero_shot = {v: c for v, c in zero_shot.items() if c is not None}
  pi = ppl(lines, "rope +linear", length)
  out = []
  if pi is not None and zero_shot:
    ok = all(pi.mean > c.mean for c in zero_shot.values())
    out.append(("zero-shot PI worse than NTK / dynamic NTK / YaRN",
                f"at {length}: PI {_fmt(pi, '')}; " + "; ".join(
                    f"{v} {_fmt(c, '')}" for v, c in zero_shot.items()),
                "PI's ppl above each of them at 4L", _verdict(ok)))
  tuned = [label for label in lines if label.startswith("rope-pi")]
  if tuned and zero_shot:
    ft = ppl(lines, tuned[0], length)
    every = dict(zero_shot, none=ppl(lines, "rope", length))
    if pi is not None:
      every["linear"] = pi
    best = min((c.mean for c in every.values() if c), default=None)
    ok = ft is not None and best is not None and ft.mean < best
    out.append(("PI after a short fine-tune at the longer length beats every zero-shot variant",
                f"at {length}: {tuned[0]} {_fmt(ft, '')}; best zero-shot "
                f"{best:.2f}" if best else "n/a", "fine-tuned ppl below the best zero-shot",
                _verdict(ok)))
  return out


def markdown(rows):
  lines = ["| phenomenon (literature) | measured here (mean +- sd over seeds) | criterion | "
           "reproduced |", "|---|---|---|---|"]
  lines += [f"| {p} | {m} | {c} | {v} |" for p, m, c, v in checks(rows)]
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise SystemExit("usage: python -m evaluation.phenomena RESULTS_DIR")
  print(markdown(read_rows(f"{argv[1]}/results.jsonl")))


if __name__ == "__main__":
  main(sys.argv)
