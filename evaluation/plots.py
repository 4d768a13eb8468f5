"""Figures of a sweep, drawn from results rows only (matplotlib, Agg backend).

One line per run group (its seeds averaged; ``evaluation.aggregate``). The perplexity
figure is small multiples: encoding families in one panel, each RoPE run's variants in
another, every line its own colour-blind-safe colour, a band of +-1 sd over seeds, plain
tick labels. Perplexity axes are log-scaled and clipped at CLIP x the median value at the
training length: a blown-up line leaves the top of the plot (clipped points are drawn as
triangles on the edge) instead of flattening every other line.
"""
import collections
import functools
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import matplotlib.ticker as mticker  # noqa: E402

from evaluation import aggregate  # noqa: E402
from evaluation.results import group_of, ok_rows  # noqa: E402

CLIP = 10.0
STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))
# Colour-blind-safe: Okabe & Ito (2008) without its yellow, then Paul Tol's "muted" set.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#332288", "#117733", "#882255", "#999933", "#44AA99", "#AA4499", "#DDCC77")
NICE = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 10)  # mantissas for plain log-axis ticks


def _lines(rows):
  """{label: {length: seed-mean row}} for the diagnostic figures (one line per run group)."""
  out = collections.OrderedDict()
  for label, by_len in aggregate.lines(rows).items():
    means = {n: aggregate.mean_row(rs) for n, rs in by_len.items()}
    means = {n: r for n, r in means.items() if r is not None}
    if means:
      out[label] = means
  return out


def _style(lines):
  """Colour per run group (variants of one group share it), dash per variant."""
  groups = list(dict.fromkeys(_group(v) for v in lines.values()))
  variants = list(dict.fromkeys(_first(v)["variant"] for v in lines.values()))
  return {label: dict(color=PALETTE[groups.index(_group(by_len)) % len(PALETTE)],
                      linestyle=STYLES[variants.index(_first(by_len)["variant"]) % len(STYLES)])
          for label, by_len in lines.items()}


def panel_styles(labels):
  """{label: matplotlib style}: one palette colour per line, solid; past the palette's 14
  colours they repeat with the next dash style (the full study's families panel has 15)."""
  return {label: dict(color=PALETTE[i % len(PALETTE)],
                      linestyle=STYLES[(i // len(PALETTE)) % len(STYLES)])
          for i, label in enumerate(labels)}


def _first(by_len):
  v = next(iter(by_len.values()))
  return v[0] if isinstance(v, list) else v


def _group(by_len):
  return group_of(_first(by_len))


def _log2_axis(ax, lengths, train_lens):
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.minorticks_off()
  for t in sorted(train_lens):
    ax.axvline(t, color="gray", linestyle="--", linewidth=1)
  ax.set_xlabel("evaluation length (tokens); dashed: training length")


def _plain_log_y(ax, lo, hi):
  """Log y axis labelled 5, 10, 20 ... (no '4 x 10^1'): nice ticks inside [lo, hi]."""
  ax.set_yscale("log")
  ax.set_ylim(lo, hi)
  ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
           for m in NICE if lo <= m * 10.0 ** e <= hi]
  while len(ticks) > 9:
    ticks = ticks[::2]
  ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
  ax.yaxis.set_major_formatter(mticker.FixedFormatter([f"{t:g}" for t in ticks]))
  ax.yaxis.set_minor_locator(mticker.NullLocator())


def _band_line(ax, xs, cells, top, label, style):
  """Seed mean (clipped at ``top``; clipped points drawn as triangles) and its +-1 sd band."""
  mean = np.array([c.mean for c in cells])
  sd = np.array([c.sd for c in cells])
  seeds = max(c.seeds for c in cells)
  tag = f" ({seeds} seeds)" if seeds > 1 else ""
  ax.plot(xs, np.minimum(mean, top), marker="o", markersize=3, label=label + tag, **style)
  if seeds > 1:
    ax.fill_between(xs, np.minimum(mean - sd, top), np.minimum(mean + sd, top),
                    color=style["color"], alpha=0.18, linewidth=0)
  over = mean > top
  if over.any():
    ax.plot(np.asarray(xs)[over], np.full(over.sum(), top), "^", color=style["color"])
  return list(mean - sd) + list(mean + sd)


def _fit_at_train_len(lines, tolerance=0.10):
  """{label: ' [+X% at L]'} for lines whose mean perplexity at their own training length is
  more than ``tolerance`` above the best line's: their curves do not compare like with like."""
  at_l = {}
  for label, by_len in lines.items():
    train_len = _first(by_len)["train_len"]
    c = aggregate.cell(by_len.get(train_len, []))
    if c is not None:
      at_l[label] = c.mean
  best = min(at_l.values(), default=None)
  return {label: f" [not equally fit: +{100 * (v / best - 1):.0f}% at L]"
          for label, v in at_l.items() if v > best * (1 + tolerance)}


def _ppl_panel(ax, lines, styles, relative):
  """Mean perplexity (or ratio to each seed's own train_len value) with seed bands."""
  series = []
  for label, by_len in lines.items():
    refs = aggregate.train_len_refs(by_len) if relative else None
    pts = [(n, aggregate.cell(by_len[n], refs)) for n in sorted(by_len)]
    pts = [(n, c) for n, c in pts if c is not None]
    if pts:
      series.append((label, pts))
  if not series:  # e.g. relative, with no evaluated length at or below train_len
    ax.text(0.5, 0.5, "no length at or below train_len" if relative else "no rows",
            ha="center", va="center", transform=ax.transAxes)
    return
  ref_vals = [min(c.mean for _, c in pts) for _, pts in series]
  top = CLIP if relative else CLIP * float(np.median(ref_vals))
  fit = _fit_at_train_len(lines) if not relative else {}
  values = []
  for label, pts in series:
    values += _band_line(ax, [n for n, _ in pts], [c for _, c in pts], top,
                         label + fit.get(label, ""), styles[label])
  values = [v for v in values if np.isfinite(v) and v > 0]
  _plain_log_y(ax, 0.95 * min(values), min(max(values) * 1.05, top * 1.1))
  ax.set_ylabel("ppl / same seed's ppl at train_len" if relative else "perplexity per token")


def _panels(rows):
  """[(title, rows)]: the encoding families (no variant), then each group with variants."""
  done = ok_rows(rows)
  with_variants = list(dict.fromkeys(group_of(r) for r in done if r["variant"] != "none"))
  tuned = lambda r, g: group_of(r).startswith(g + "-")  # rope-pi512: a fine-tune of rope
  panels = [("encoding families", [r for r in done if r["variant"] == "none" and not any(
      tuned(r, g) for g in with_variants)])]
  for g in with_variants:
    panels.append((f"{g}: extension variants (zero-shot) and fine-tunes",
                   [r for r in done if group_of(r) == g or tuned(r, g)]))
  return [(t, rs) for t, rs in panels if rs]


def ppl_figure(rows, path):
  """Small multiples: columns = panels (families; each run group's variants), rows =
  absolute and relative perplexity; colour-blind-safe colours, bands = +-1 sd over seeds."""
  panels = _panels(rows)
  lengths = sorted({r["length"] for r in ok_rows(rows)})
  fig, axes = plt.subplots(2, len(panels), figsize=(7.2 * len(panels), 9.5), squeeze=False)
  for col, (title, panel_rows) in enumerate(panels):
    lines = aggregate.lines(panel_rows)
    styles = panel_styles(lines)
    for row_i, relative in enumerate((False, True)):
      ax = axes[row_i][col]
      _ppl_panel(ax, lines, styles, relative)
      _log2_axis(ax, lengths, {r["train_len"] for r in panel_rows})
      ax.set_title(title + (": relative to train_len" if relative else ""))
      ax.grid(True, which="major", alpha=0.3)
    axes[0][col].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        title="line: seed mean\nband: +-1 sd over seeds", title_fontsize=8)
  _save(fig, path)


def per_position_figure(rows, path, key="position_nll", ylabel="mean loss (nats)"):
  """Mean ``key`` (loss, or output entropy) per log2 bucket of in-window position, at up to
  3 lengths (incl. the longest); dashed: the training length."""
  lines, lengths = _lines(rows), sorted({r["length"] for r in ok_rows(rows)})
  styles = _style(lines)
  picks = sorted({lengths[i] for i in np.linspace(0, len(lengths) - 1, min(3, len(lengths))
                                                 ).round().astype(int)})
  fig, axes = plt.subplots(1, len(picks), figsize=(6 * len(picks), 5), squeeze=False)
  for ax, length in zip(axes[0], picks):
    for label, by_len in lines.items():
      r = by_len.get(length)
      if r is None:
        continue
      pts = [((lo + 1) * hi) ** 0.5 for lo, hi in r["position_buckets"]]
      if not r.get(key):
        continue
      ok = [v is not None for v in r[key]]
      ax.plot(np.asarray(pts)[ok], np.asarray(r[key], float)[ok], marker=".",
              label=label, **styles[label])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in window (log2 buckets)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"length {length}")
    for t in {r["train_len"] for r in ok_rows(rows)}:
      ax.axvline(t, color="gray", linestyle="--", linewidth=1)
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def attention_figure(rows, path):
  """Per-layer mean attention entropy and attended distance vs length."""
  lines = {k: v for k, v in _lines(rows).items()
           if any("attn_entropy" in r for r in v.values())}
  styles = _style(lines)
  layers = max(len(r["attn_entropy"]) for v in lines.values() for r in v.values()
               if "attn_entropy" in r)
  lengths = sorted({n for v in lines.values() for n in v})
  fig, axes = plt.subplots(2, layers, figsize=(5 * layers + 2, 8), squeeze=False)
  for row_i, key in enumerate(("attn_entropy", "attn_distance")):
    for layer in range(layers):
      ax = axes[row_i][layer]
      for label, by_len in lines.items():
        xs = [n for n in sorted(by_len) if len(by_len[n].get(key) or []) > layer]
        ax.plot(xs, [by_len[n][key][layer] for n in xs], marker="o", markersize=3,
                label=label, **styles[label])
      _log2_axis(ax, lengths, {r["train_len"] for r in ok_rows(rows)})
      if key == "attn_distance":
        ax.set_yscale("log", base=2)
      ax.set_title(f"layer {layer}: " + ("entropy (nats)" if row_i == 0 else
                                          "mean attended distance (tokens)"))
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def accuracy_figure(rows, path):
  """Synthetic runs: answer accuracy vs length; passkey accuracy vs distance (longest length)."""
  lines = {k: v for k, v in _lines(rows).items() if any("answer_acc" in r for r in v.values())}
  styles = _style(lines)
  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  for label, by_len in lines.items():
    xs = [n for n in sorted(by_len) if "answer_acc" in by_len[n]]
    axes[0].plot(xs, [by_len[n]["answer_acc"] for n in xs], marker="o", label=label,
                 **styles[label])
    with_pk = [n for n in xs if "passkey_acc" in by_len[n]]
    if with_pk:
      r = by_len[max(with_pk)]
      mids = [((lo * hi) ** 0.5) for lo, hi in r["passkey_distance_buckets"]]
      axes[1].plot(mids, r["passkey_acc"], marker="o", label=f"{label} (L={r['length']})",
                   **styles[label])
  _log2_axis(axes[0], sorted({n for v in lines.values() for n in v}),
             {r["train_len"] for v in lines.values() for r in v.values()})
  axes[0].set_ylabel("answer-token accuracy")
  axes[1].set_xscale("log", base=2)
  axes[1].set_xlabel("key-query distance (tokens, log2 buckets)")
  axes[1].set_ylabel("passkey retrieval accuracy")
  for ax in axes:
    ax.set_ylim(-0.02, 1.02)
  axes[0].legend(fontsize=7)
  if axes[1].lines:
    axes[1].legend(fontsize=7)
  _save(fig, path)


def needle_distance_figure(rows, distance_of, path, columns=4):
  """Needle accuracy against how far back the needle sits (``distance_of(row)``: tokens from
  its start to the answer), one panel per run group, a line per variant x length, each its
  own colour; dashed: the training length. A depth is another distance at every length, so
  this is where lengths and variants compare like with like. Bars: one run's 95 % Wilson
  interval, or +-1 sd over a group's seeds. A line breaks where depths of the grid were
  skipped. Returns {(group, variant, length): (distances, accuracies)}, what was drawn,
  nearest needle first, NaN where a line breaks."""
  cells = {}
  for r in rows:
    if r.get("status") == "ok":
      key = (group_of(r), r["variant"], r["length"])
      cells.setdefault(key, {}).setdefault(r["depth"], []).append(r)
  groups = sorted({g for g, _, _ in cells})
  step = min(np.diff(sorted({d for c in cells.values() for d in c})), default=1.0)
  ncol, nrow = min(columns, len(groups)), -(-len(groups) // columns)
  fig, axes = plt.subplots(nrow, ncol, figsize=(7.0 * ncol, 3.9 * nrow), squeeze=False)
  drawn = {}
  for ax, group in zip(axes.flat, groups):
    keys = sorted((k for k in cells if k[0] == group), key=lambda k: (k[1] != "none", k[1:]))
    styles = panel_styles(keys)
    for key in keys:
      by_depth = cells[key]
      depths = sorted(by_depth, reverse=True)
      xs = [distance_of(by_depth[d][0]) for d in depths]
      ys = [float(np.mean([r["accuracy"] for r in by_depth[d]])) for d in depths]
      err = np.array([_accuracy_bar(by_depth[d], y) for d, y in zip(depths, ys)]).T
      # the line breaks where depths were skipped: no accuracy is drawn where none was measured
      gap = np.r_[False, -np.diff(depths) > 1.5 * step]
      x, y, below, above = _break_at(gap, xs, ys, *err)
      ax.errorbar(x, y, yerr=[below, above], marker="o", markersize=3, capsize=1.5,
                  linewidth=1.2, elinewidth=0.7, label=f"{key[1]} L={key[2]}", **styles[key])
      drawn[key] = (list(x), list(y))
    _log2_axis(ax, _powers_of_two([x for k in keys for x in drawn[k][0] if x == x]),
               {r["train_len"] for k in keys for rs in cells[k].values() for r in rs})
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(group, fontsize=9)
    ax.set_xlabel("needle distance back (tokens); dashed: training length")
    ax.set_ylabel("exact match")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  _save(fig, path)
  return drawn


def _break_at(gap, *series):
  """Each series with a NaN before every point where ``gap`` is true: matplotlib breaks a
  line at a NaN."""
  at = np.flatnonzero(gap)
  return [np.insert(np.asarray(v, float), at, np.nan) for v in series]


def _powers_of_two(xs):
  """At most 8 powers of two spanning xs: ticks of a log2 axis (16, 256, 4096)."""
  ticks = [2 ** e for e in range(int(np.log2(max(min(xs), 1))), int(np.log2(max(xs))) + 2)]
  return ticks[::-(-len(ticks) // 8)]


def _accuracy_bar(rows, mean):
  """(below, above) the mean: the 95 % Wilson interval of one row, +-1 sd over seeds."""
  if len(rows) == 1:
    lo, hi = rows[0]["ci"]
    return (mean - lo, hi - mean)
  sd = float(np.std([r["accuracy"] for r in rows], ddof=1))
  return (min(sd, mean), min(sd, 1 - mean))


def _save(fig, path):
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def write_figures(out, rows):
  """Every figure that has data; returns the paths written."""
  done = ok_rows(rows)
  todo = [("ppl_vs_length.png", ppl_figure, bool(done)),
          ("per_position_loss.png", per_position_figure, bool(done)),
          ("output_entropy.png", functools.partial(
              per_position_figure, key="position_entropy",
              ylabel="entropy of the predicted next token (nats)"),
           any(r.get("position_entropy") for r in done)),
          ("attention_entropy.png", attention_figure, any("attn_entropy" in r for r in done)),
          ("accuracy_vs_length.png", accuracy_figure, any("answer_acc" in r for r in done))]
  paths = []
  for name, fn, has_data in todo:
    if has_data:
      fn(rows, os.path.join(out, name))
      paths.append(os.path.join(out, name))
  return paths
