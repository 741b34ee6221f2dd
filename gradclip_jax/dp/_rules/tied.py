"""The cross term of a table read by ``gather`` and by ``dot_general`` (tied embeddings).

A 2-D table ``E [V, D]`` looked up by ``gather`` (input embedding) and multiplied by
``dot_general`` (``h @ E.T``, the output projection of a language model with tied
embeddings) has per-example gradient ``G_b = G_gather,b + G_dot,b``, and

    ||G_b||^2 = ||G_gather,b||^2 + ||G_dot,b||^2 + 2 <G_gather,b, G_dot,b>,

the first two from each rule's norm form and the cross term on the looked-up rows
only: ``G_gather,b`` is non-zero on the rows ``id_p`` of the example's tokens, so
``<G_gather,b, G_dot,b> = sum_p <g1_p, G_dot,b[id_p]>`` with ``G_dot,b[v] = sum_t
a_t[v] g_t`` (or ``sum_t g_t[v] a_t``), never the ``V x D`` per-example matrix.
"""

from __future__ import annotations

import jax.numpy as jnp

from gradclip_jax.dp import _jaxpr as jx
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules._base import register_cross


@register_cross("gather", "dot_general")
def tied_table(gather_unit, dot_unit):
  """The cross term for a gather unit and a dot unit on one 2-D table, or None."""
  if len(gather_unit.groups) != 1 or len(dot_unit.groups) != 1:
    return None
  ug, ud = gather_unit.groups[0].uses[0], dot_unit.groups[0].uses[0]
  dd = ud.data
  gi, di = ug.in_info[0], ud.in_info[dd.wpos]
  if (gi.perm != (0, 1) or di.perm is None or len(di.perm) != 2 or dd.H != 1
      or gi.wstack or di.wstack or gi.origin != di.origin or len(gi.origin) != 1):
    return None
  row = di.perm.index(0)  # the W' dim holding the table's rows
  (lc, rc), _ = jx.dot_dimension_numbers(ud.eqn)
  wc = list(rc if dd.wpos == 1 else lc)
  if wc == [row]:
    rows_are_free = False
  elif wc == [1 - row]:
    rows_are_free = True
  else:
    return None

  def cross(cg, cd):
    ids, g1 = cg.ex.ids, cg.ex.g                              # [B, P], [B, P, D]
    a, g = cm.f32(cd.ex.a[:, 0]), cm.f32(cd.ex.g[:, 0])       # [B, T, K], [B, T, N]
    if rows_are_free:  # dW'_b[v] = sum_t g_t[v] a_t: a_t are D-vectors
      m = jnp.einsum("bpd,btd->bpt", g1, a, precision=cm.HI)
      sel = jnp.take_along_axis(g, ids[:, None, :], axis=2)   # [B, T, P]
    else:              # dW'_b[v] = sum_t a_t[v] g_t: g_t are D-vectors
      m = jnp.einsum("bpd,btd->bpt", g1, g, precision=cm.HI)
      sel = jnp.take_along_axis(a, ids[:, None, :], axis=2)
    return jnp.einsum("bpt,btp->b", m, sel, precision=cm.HI)

  return cross
