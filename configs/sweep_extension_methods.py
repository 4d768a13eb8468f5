"""Issue 12's comparison on the books: the demo's RoPE run group (3 seeds, train_len 128,
configs/sweep_demo.py, trained by ``python demo.py``) from 128 to 4096 tokens (32x), every
training-free extension method next to the 2023 RoPE-scaling variants, zero-shot.

  python demo.py --only=rope        # trains runs/demo/rope-s{0,1,2} if missing
  python eval_extrapolate.py --config=configs/sweep_extension_methods.py

Spread sampling (the same 65,536 target bytes at every length, 16 segments of 4096 as the
units of the standard error). Defaults of every method scale with train_len
(extensions/*.py: ``factor=auto`` = length / train_len). The training-time methods (PoSE,
DroPE, p-RoPE as a training option) need fine-tunes of their own: results/
context_extension_2024 has them for one seed.

``:pretrained`` runs the training-free methods on SmolLM2-135M at 16k (2x its 8k context),
on the three 16k segments of ``configs/sweep_pretrained.py`` (same targets, so its none and
yarn rows pair with these; bf16 matmuls where the CPU has them):

  python eval_extrapolate.py --config=configs/sweep_extension_methods.py:pretrained
"""
import ml_collections

VARIANTS = ("none,linear,ntk,dynamic,yarn,llama3,ntk_by_parts,resonance,resonance+yarn,"
            "logn,rerope,self_extend,dual_chunk,string,lm_infinite,streaming_llm")


PRETRAINED_VARIANTS = ("none,yarn,ntk_by_parts,self_extend,dual_chunk,rerope,string,"
                       "lm_infinite,streaming_llm")


def get_config(arg=None):
  if arg not in (None, "", "pretrained"):
    raise ValueError(f"unknown sweep_extension_methods preset {arg!r}; valid choices: "
                     "(none), pretrained")
  if arg == "pretrained":
    from configs import sweep_pretrained  # same segments, dtype and batch as its quick preset
    c = sweep_pretrained.get_config("quick")
    c.update(lengths="16384", variants=PRETRAINED_VARIANTS,
             out="results/extension_methods_pretrained")
    return c
  return ml_collections.ConfigDict(dict(
      runs="runs/demo/rope-s*", lengths="128,256,512,1024,2048,4096", variants=VARIANTS,
      mode="nonoverlapping", stride=0, split="test", max_tokens=65536, sample="spread",
      batch_size=0, stats_windows=0, out="results/extension_methods"))
