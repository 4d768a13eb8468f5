"""KERPLE-log (Chi et al. 2022, arXiv 2205.09921, sec. 4, the logarithmic variant):
each head h adds

    bias_h(m, n) = -r1_h * log(1 + r2_h * |m - n|),   r1_h, r2_h > 0,

to the logit of query m, key n. Follows ``ParallelKerpleLog`` in the reference code
(github chijames/KERPLE, ``megatron/mpu/layers.py``): r1 is its ``bias_p``, initialised
U(0, 2) (``torch.rand * 2``); r2 is its ``bias_a``, initialised U(0, 1); both clamped to
>= eps = 1e-2 before use (here a straight-through clamp, see ``kerple_common``).
The bias depends only on |m - n|, so any block of (query, key) positions is computed on
its own and equals the matching slice of the full bias.
"""
from posenc.base import register
from posenc.kerple_common import KerpleBase, log_kernel_bias

__all__ = ["KerpleLog", "log_kernel_bias"]


@register("kerple_log")
class KerpleLog(KerpleBase):
  """-r1 log(1 + r2 |m - n|) per head; 2 * num_heads parameters."""

  r1_init_scale = 2.0  # reference: self.bias_p = get_parameter(2, 'uniform')
  r2_init_scale = 1.0  # reference: self.bias_a = get_parameter(1, 'uniform')
  r2_max = None

  def kernel(self, r1, r2, distance):
    return log_kernel_bias(r1, r2, distance)
