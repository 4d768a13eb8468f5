"""Figures of a sweep, drawn from results rows only (matplotlib, Agg backend).

Lines: colour = run, line style = variant, so a run's variants read as a family.
Perplexity axes are log-scaled and clipped at CLIP x the median value at the
training length: a blown-up line leaves the top of the plot (clipped points are
drawn as triangles on the edge) instead of flattening every other line.
"""
import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.results import at_train_len, line_label, ok_rows  # noqa: E402

CLIP = 10.0
STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _lines(rows):
  """{label: {length: row}}; the setting (mode, split, max_tokens) is named if several."""
  settings = {(r["mode"], r["split"], r["max_tokens"]) for r in ok_rows(rows)}
  out = collections.OrderedDict()
  for r in ok_rows(rows):
    label = line_label(r)
    if len(settings) > 1:
      label += f" [{r['mode']}, {r['split']}, {r['max_tokens']}]"
    out.setdefault(label, {})[r["length"]] = r
  return out


def _style(lines):
  runs = list(dict.fromkeys(next(iter(v.values()))["run"] for v in lines.values()))
  variants = list(dict.fromkeys(next(iter(v.values()))["variant"] for v in lines.values()))
  cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  out = {}
  for label, by_len in lines.items():
    r = next(iter(by_len.values()))
    out[label] = dict(color=cmap(runs.index(r["run"]) % cmap.N),
                      linestyle=STYLES[variants.index(r["variant"]) % len(STYLES)])
  return out


def _log2_axis(ax, lengths, train_lens):
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  for t in sorted(train_lens):
    ax.axvline(t, color="gray", linestyle="--", linewidth=1)
  ax.set_xlabel("evaluation length (tokens); dashed: training length")


def _clipped(ax, xs, ys, top, **style):
  ys = np.asarray(ys, float)
  ax.plot(xs, np.minimum(ys, top), marker="o", markersize=3, **style)
  over = ys > top
  if over.any():
    ax.plot(np.asarray(xs)[over], np.full(over.sum(), top), "^", color=style["color"])


def _ppl_panel(ax, lines, styles, relative):
  values, refs = [], []
  for by_len in lines.values():
    r0 = next(iter(by_len.values()))
    ref = at_train_len(by_len, r0["train_len"])
    refs.append(ref["ppl"] if ref else min(r["ppl"] for r in by_len.values()))
  top = CLIP if relative else CLIP * float(np.median(refs))
  for (label, by_len), ref in zip(lines.items(), refs):
    xs = sorted(by_len)
    ys = [by_len[n]["ppl"] / (ref if relative else 1.0) for n in xs]
    values += ys
    _clipped(ax, xs, ys, top, label=label, **styles[label])
  ax.set_yscale("log")
  ax.set_ylim(0.9 * min(values), min(max(values) * 1.1, top * 1.1))
  ax.set_ylabel("ppl / ppl at train_len" if relative else "perplexity")
  ax.set_title(("relative to each line's own value at train_len" if relative
                else "perplexity") + f" (clipped at {top:.3g})")


def ppl_figure(rows, path):
  lines = _lines(rows)
  styles = _style(lines)
  lengths = sorted({r["length"] for r in ok_rows(rows)})
  fig, axes = plt.subplots(1, 2, figsize=(15, 6))
  for ax, relative in zip(axes, (False, True)):
    _ppl_panel(ax, lines, styles, relative)
    _log2_axis(ax, lengths, {r["train_len"] for r in ok_rows(rows)})
  axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def per_position_figure(rows, path):
  """Mean loss per log2 bucket of in-window position, at up to 3 lengths (incl. the longest)."""
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
      ok = [v is not None for v in r["position_nll"]]
      ax.plot(np.asarray(pts)[ok], np.asarray(r["position_nll"], float)[ok], marker=".",
              label=label, **styles[label])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in window (log2 buckets)")
    ax.set_ylabel("mean loss (nats)")
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
          ("attention_entropy.png", attention_figure, any("attn_entropy" in r for r in done)),
          ("accuracy_vs_length.png", accuracy_figure, any("answer_acc" in r for r in done))]
  paths = []
  for name, fn, has_data in todo:
    if has_data:
      fn(rows, os.path.join(out, name))
      paths.append(os.path.join(out, name))
  return paths
