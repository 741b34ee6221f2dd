"""``gather`` of rows of a parameter (embedding lookups, ``jnp.take``, indexing).

For ``y_t = E[id_t]`` the example's gradient has rows ``dE_b[v] = sum_{t: id_t = v}
g_bt``, so ``||dE_b||^2 = sum_v ||sum_{t: id_t = v} g_bt||^2``: the output gradients
are sorted by token id and summed per run of equal ids (segment sums), per example.
No ``V x d`` per-example matrix is formed. The clipped sum is one scatter-add of the
weighted output gradients. Out-of-range ids follow the gather's mode (dropped for
``fill``, clamped for ``clip``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm


class Gather(cm.Rule):
  family = "gather"

  def match(self, use):
    if (use.p_pos != (0,) or len(use.eqn.invars) != 2 or use.pre
        or use.in_info[0].wstack):
      return None
    prm = use.eqn.params
    dn = prm["dimension_numbers"]
    ws = _trace._shape(use.eqn.invars[0])  # pylint: disable=protected-access
    ids = _trace._shape(use.eqn.invars[1])  # pylint: disable=protected-access
    spec = use.in_info[1].spec
    smap = tuple(int(d) for d in dn.start_index_map)
    collapsed = tuple(int(d) for d in dn.collapsed_slice_dims)
    # Whole rows of W (dim 0 indexed, every other dim taken in full); jnp.take and
    # x[ids] give collapsed=(0,), map=(0,); a vmapped dynamic_slice (Equinox's
    # Embedding) gives collapsed=(), map=(0, 1, ...) with zero start indices.
    if (not isinstance(spec, _trace.Spec) or use.in_info[0].spec is not None
        or len(ws) < 1 or not ids or 0 not in smap or ids[-1] != len(smap)
        or spec.axis == len(ids) - 1 or collapsed not in ((), (0,))
        or tuple(dn.operand_batching_dims) or tuple(dn.start_indices_batching_dims)
        or tuple(prm["slice_sizes"]) != (1,) + tuple(ws[1:])
        or len(dn.offset_dims) != len(ws) - len(collapsed)):
      return None
    out_nd = len(_trace._shape(use.eqn.outvars[0]))  # pylint: disable=protected-access
    batch_out = [d for d in range(out_nd) if d not in dn.offset_dims]
    want = _trace.Spec(batch_out[spec.axis], spec.inner, spec.outer)
    if use.out_info[0].spec != want:
      return None
    mode = str(prm.get("mode", "")).upper()
    return {"needs": (1,), "batch_out": batch_out, "offset": list(dn.offset_dims),
            "V": ws[0], "D": int(np.prod(ws[1:], dtype=np.int64)), "wshape": ws,
            "fill": "FILL" in mode, "row": smap.index(0), "n_idx": len(smap)}

  def temp_bytes(self, use, b):
    steps = int(np.prod(use.stack, dtype=np.int64)) if use.stack else 1
    return 8 * cm.size_of(use.eqn.outvars[0].aval) * steps // b

  def merge_key(self, use):
    return ("gather", id(use.eqn.invars[0]), use.scope_id)

  def canon(self, use, recs, gs, b, views=None):
    d = use.data
    ns = len(use.stack)
    idx = recs[1]
    ids = idx[..., d["row"]]
    others_zero = None
    if d["n_idx"] > 1 and d["fill"]:  # a non-zero start on a full dim drops the row
      rest = [i for i in range(d["n_idx"]) if i != d["row"]]
      others_zero = jnp.all(idx[..., rest] == 0, axis=-1)
      ids = jnp.where(others_zero, ids, -1)
    i2, dm, exd = cm.split(ids, use.in_info[1].spec, ns, b)
    perm = [exd] + cm.flat([[i] for i in range(ns)]
                           + [dm[ns + i] for i in range(ids.ndim - ns)])
    ids = jnp.transpose(i2, perm).reshape(b, -1)
    g2, gm, gex = cm.split(gs[0], use.out_info[0].spec, ns, b)
    perm = ([gex] + cm.flat([[i] for i in range(ns)] + [gm[ns + i] for i in d["batch_out"]])
            + cm.flat([gm[ns + i] for i in d["offset"]]))
    g = cm.f32(jnp.transpose(g2, perm).reshape(b, ids.shape[1], d["D"]))
    if d["fill"]:
      ok = (ids >= 0) & (ids < d["V"])
      g = jnp.where(ok[..., None], g, 0.0)
    ids = jnp.clip(ids, 0, d["V"] - 1)
    return {"ids": ids, "g": g, "data": d}

  def concat(self, canons):
    if len(canons) == 1:
      return canons[0]
    return {"ids": jnp.concatenate([c["ids"] for c in canons], 1),
            "g": jnp.concatenate([c["g"] for c in canons], 1), "data": canons[0]["data"]}

  def sq(self, c):
    ids, g = c["ids"], c["g"]
    bsz, t = ids.shape
    order = jnp.argsort(ids, axis=1)
    ids_s = jnp.take_along_axis(ids, order, axis=1)
    g_s = jnp.take_along_axis(g, order[..., None], axis=1)
    new = jnp.concatenate([jnp.ones((bsz, 1), bool), ids_s[:, 1:] != ids_s[:, :-1]], 1)
    seg = jnp.cumsum(new, axis=1) - 1 + (jnp.arange(bsz) * t)[:, None]
    sums = jax.ops.segment_sum(g_s.reshape(bsz * t, -1), seg.reshape(-1),
                               num_segments=bsz * t, indices_are_sorted=True)
    return cm.per_example_sq(sums.reshape(bsz, -1))

  def weighted(self, c, w, fin, wshapes):
    d = c["data"]
    rows = cm.mask_rows(c["g"], fin, w).reshape(-1, d["D"])
    out = jnp.zeros((d["V"], d["D"]), jnp.float32).at[c["ids"].reshape(-1)].add(rows)
    return {0: out.reshape(d["wshape"])}

  def per_example(self, c, wshapes):
    d = c["data"]
    bsz, t = c["ids"].shape
    rows = jnp.broadcast_to(jnp.arange(bsz)[:, None], (bsz, t))
    out = jnp.zeros((bsz, d["V"], d["D"]), jnp.float32).at[rows, c["ids"]].add(c["g"])
    return {0: out.reshape((bsz,) + tuple(d["wshape"]))}
