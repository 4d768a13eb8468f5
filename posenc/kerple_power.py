"""KERPLE-power (Chi et al. 2022, arXiv 2205.09921, sec. 4, the power variant): each
head h adds

    bias_h(m, n) = -r1_h * |m - n| ^ r2_h,   r1_h > 0,  0 < r2_h <= 2,

to the logit of query m, key n (r2 <= 2 keeps -|m-n|^r2 conditionally positive
definite). Follows ``ParallelKerplePower`` with ``pos_emb = kerple_power_ap_`` style
learnable a and p in the reference code (github chijames/KERPLE,
``megatron/mpu/layers.py``): r1 is its ``bias_a``, initialised U(0, 1), clamped to
>= eps; r2 is its ``bias_p``, initialised U(0, 2), clamped to [eps, 2]; eps = 1e-2.
Note the inits are swapped relative to kerple_log (there the *scale* r1 starts in
U(0, 2)); both follow the reference. Relative, so block bias = slice of full bias.
"""
from posenc.base import register
from posenc.kerple_common import KerpleBase, power_kernel_bias

__all__ = ["KerplePower", "power_kernel_bias"]


@register("kerple_power")
class KerplePower(KerpleBase):
  """-r1 |m - n|^r2 per head; 2 * num_heads parameters."""

  r1_init_scale = 1.0  # reference: self.bias_a = get_parameter(1, 'uniform')
  r2_init_scale = 2.0  # reference: self.bias_p = get_parameter(2, 'uniform')
  r2_max = 2.0  # reference: bias_p.data.clamp(min=eps, max=2)

  def kernel(self, r1, r2, distance):
    return power_kernel_bias(r1, r2, distance)
