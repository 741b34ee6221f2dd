"""``conv_general_dilated`` with a parameter kernel: per-example kernel gradients.

Any rank, strides, dilation, feature groups: the kernel gradient of each example is
the convolution's own VJP applied to that example's slice (the fallback's
``"rebind"`` form, :mod:`.fallback`), ``B x |kernel|`` floats, an exact per-layer
rule (:data:`PER_EXAMPLE` only).
"""

from __future__ import annotations

from gradclip_jax.dp import _jaxpr as jx
from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules._base import register
from gradclip_jax.dp._rules.fallback import FallbackData
from gradclip_jax.dp._rules.fallback import PerOperation


@register("conv_general_dilated")
class Conv(PerOperation):
  family = "conv_general_dilated"

  def match(self, use):
    if use.p_pos != (1,) or len(use.in_shapes) != 2 or use.in_info[1].wstack:
      return None
    dims = jx.conv_dims(use.eqn)
    sp = use.in_info[0].spec
    if (dims.batch_group_count != 1 or not isinstance(sp, _trace.Spec)
        or sp.axis != dims.lhs_batch_dim or not use.params_same):
      return None
    return FallbackData(needs=(0,), mode="rebind")
