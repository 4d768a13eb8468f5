"""A pretrained model past its context: SmolLM2-135M (trained at 8192 tokens) on the test
books with the RoPE extension variants, zero-shot, ``factor=auto`` = length / 8192.

  make demo-pretrained     # = the line below (quick preset)
  python eval_extrapolate.py --config=configs/sweep_pretrained.py --out=results/pretrained
  python eval_extrapolate.py --config=configs/sweep_pretrained.py:full --out=results/pretrained_full

Presets: ``quick`` scores three spread segments of 16,384 tokens (``sample=spread``: the
same 49,152 targets at every length; the three segments are the clusters of the standard
error) at 2k, 8k and 16k; ``full`` two segments of 32,768 tokens at 2k to 32k. Evaluation
runs with bf16 matmul inputs where the CPU has bf16 instructions (``dtype=auto``; float32
elsewhere): on 2,048 tokens of Emma the NLL moved by 7e-5 nats and a 16k window took 83 s
instead of 4-6 min. At or below 8192 every ``factor=auto`` variant is the unscaled model
(factor 1): the sweep sees that such a variant computes exactly what ``none`` does
(``evaluation.runner.same_computation``) and reuses that row (``same_as: none``) instead
of recomputing it, so only lengths past the context cost anything per variant.
Cost on the 2-core Xeon with AMX (2026-11-30): quick ~30 min (18 windows of 16k at ~83 s,
the 2k and 8k rows ~4 min); full ~1.6 h (12 windows of 32k, 24 of 16k). On the 2-core
Zen 4 EPYC (avx512_bf16) with the bf16 attention kernel (2026-12-03): a 16k row (4 windows)
5-5.5 min, a 32k row (2 windows) 8.3-9.1 min; results/pretrained_full/README.md.
"""
import ml_collections

PRESETS = {  # lengths, scored tokens per length (a multiple of the longest length)
    "quick": ("2048,8192,16384", 3 * 16384),
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
      max_tokens=max_tokens, sample="spread", batch_size=1, stats_windows=0, dtype="auto"))
