"""A pretrained model past its context: SmolLM2-135M (trained at 8192 tokens) on the test
books with the RoPE extension variants, zero-shot, ``factor=auto`` = length / 8192.

  make demo-pretrained     # = the line below (quick preset)
  python eval_extrapolate.py --config=configs/sweep_pretrained.py --out=results/pretrained
  python eval_extrapolate.py --config=configs/sweep_pretrained.py:full --out=results/pretrained_full

Presets: ``quick`` scores one spread segment of 16,384 tokens (``sample=spread``: the same
targets at every length) at 2k, 8k and 16k; ``full`` two segments of 32,768 tokens (a
standard error from two clusters) at 2k to 32k. At or below 8192 every ``factor=auto``
variant is the unscaled model (factor 1), so only lengths past the context separate them.
Cost on a 2-core CPU (float32, ~50 GFLOP/s): a 16k window ~14 TFLOP (~5 min), 32k ~46 TFLOP.
Measured under load (results/pretrained/README.md): 4-6 min per 16k row, 2-4 min per 8k
row, so the quick preset's 18 rows take about an hour, over the 30 minutes aimed for; the
variant rows at 2k and 8k equal ``none`` and may be skipped with --variants/--lengths.
"""
import ml_collections

PRESETS = {  # lengths, scored tokens per length (a multiple of the longest length)
    "quick": ("2048,8192,16384", 16384),
    "full": ("2048,4096,8192,16384,32768", 65536),
}


def get_config(arg=None):
  kind = arg or "quick"
  if kind not in PRESETS:
    raise ValueError(f"unknown sweep_pretrained preset {kind!r}; valid choices: "
                     f"{', '.join(PRESETS)}")
  lengths, max_tokens = PRESETS[kind]
  return ml_collections.ConfigDict(dict(
      runs="pretrained:smollm2-135m", lengths=lengths,
      variants="none,linear,ntk,dynamic,yarn,llama3", mode="nonoverlapping", split="test",
      max_tokens=max_tokens, sample="spread", batch_size=1, stats_windows=0))
