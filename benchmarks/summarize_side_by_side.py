#!/usr/bin/env python3
"""The table of a ``side_by_side.sh`` log: tokens/s per repeat, lenx / peer.

    python benchmarks/summarize_side_by_side.py results.txt

For each row (train A / D / R, eval16k) and each lenx dtype: the peer's and lenx's tokens/s
in repeat order, the ratio of the means (the figure benchmarks/README.md quotes), the range
of per-repeat ratios (repeat r of lenx over repeat r of the peer: run back to back, so the
box's drift hits both alike) and the peak RSS ranges. The log's first line (the CPU and
its flags) is printed first: a ratio means nothing without it.
"""
import collections
import json
import sys


def parse(lines):
  """{(who, row, dtype): [result dicts in order]} and the CPU line."""
  runs, cpu = collections.defaultdict(list), None
  for line in lines:
    name, _, rest = line.partition(" ")
    if not rest.startswith("{"):
      continue
    record = json.loads(rest)
    if name == "cpu":
      cpu = record
    elif name.startswith("peer_"):
      runs[("peer", name[len("peer_"):], "")].append(record)
    elif name.startswith("lenx_"):
      row, _, dtype = name[len("lenx_"):].rpartition("_")
      runs[("lenx", row, dtype)].append(record)
  return runs, cpu


def _mean(xs):
  return sum(xs) / len(xs)


def _span(xs, fmt="{:.0f}"):
  lo, hi = min(xs), max(xs)
  return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def table(runs):
  """Markdown rows: row | dtype | peer tokens/s | lenx tokens/s | ratio | per repeat | RSS."""
  out = ["| row | lenx dtype | peer tokens/s | lenx tokens/s | lenx / peer (per repeat) "
         "| peak RSS MiB peer / lenx |", "|---|---|---|---|---|---|"]
  for (who, row, dtype), lenx in sorted(runs.items()):
    peer = runs.get(("peer", row, ""))
    if who != "lenx" or not peer:
      continue
    p, x = [r["tokens_per_s"] for r in peer], [r["tokens_per_s"] for r in lenx]
    pairs = [b / a for a, b in zip(p, x)]
    rss = (_span([r["peak_rss_mib"] for r in peer]), _span([r["peak_rss_mib"] for r in lenx]))
    out.append(f"| {row} | {dtype} | {' / '.join(f'{v:.0f}' for v in p)} | "
               f"{' / '.join(f'{v:.0f}' for v in x)} | **{_mean(x) / _mean(p):.2f}x** "
               f"({_span(pairs, '{:.2f}')}) | {rss[0]} / {rss[1]} |")
  return "\n".join(out)


def main(argv):
  if len(argv) != 2:
    sys.exit("usage: summarize_side_by_side.py LOG")
  with open(argv[1], encoding="utf-8") as f:
    runs, cpu = parse(f)
  if cpu:
    print("cpu:", json.dumps(cpu))
  print(table(runs))


if __name__ == "__main__":
  main(sys.argv)
