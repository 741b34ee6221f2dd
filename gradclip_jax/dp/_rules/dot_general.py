"""``dot_general`` with a parameter operand: Gram or direct per-example norms.

For ``y = x . W'`` (any dimension numbers, the example axis a free dimension of the
data operand ``x``) every example's weight gradient is ``dW'_b = sum_t a_bt g_bt^T``
per dot-general batch index ``h``, with ``a`` the data rows (contracted features,
``K``) and ``g`` the output gradient rows (``W'``'s free features, ``N``) at each of
the ``T`` positions. Its squared norm is computed without forming ``dW'_b`` when that
is cheaper (Goodfellow 2015; Li et al. 2022, "ghost norm"):

* Gram form ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` when ``T (K + N) <= K N`` (fewer
  FLOPs), or when it costs at most twice the FLOPs and ``8 T^2 <= K N`` (far less
  memory than ``K x N`` per example, e.g. a one-hot matmul over a large vocabulary),
* else the direct ``||sum_t a_t g_t^T||^2``.

The clipped sum is ``sum_b w_b sum_t a_bt g_bt^T`` (book-keeping, Bu et al. 2023).

Uses of *different* parameters that read the same data operand (the same value, with
the same dimension numbers on its side) share their work exactly: for the total
per-example norm ``sum_l ||sum_t a_t g_lt^T||^2 = ||sum_t a_t [g_1t ... g_Lt]^T||^2``,
so they are one dense with the output gradients concatenated (``N`` = the sum of
their widths), and the Gram form shares ``a a^T``. Likewise data operands whose
uses have the same output gradients (``W_x x_t + W_h h_t`` in one gate) concatenate
along ``K``: ``||sum_t [x_t; h_t] g_t^T||^2``. ``linen.LSTMCell``'s eight kernels
(``x_t`` and ``h_{t-1}`` times four gates) become one ``[2K, 4N]`` product per
example. The clipped sums come from one product as well, split per parameter
(:func:`block_sq`, :func:`block_weighted`; the grouping is in ``_clipped_grad``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm


def _use_gram(t, k, n) -> bool:
  """Gram form when it needs fewer FLOPs, or at most twice the FLOPs and 8x less memory."""
  return t * (k + n) <= k * n or (8 * t * t <= k * n and t * (k + n) <= 2 * k * n)


class DotGeneral(cm.Rule):
  family = "dot_general"

  def match(self, use):
    if len(use.p_pos) != 1 or len(use.eqn.invars) != 2 or use.pre:
      return None
    wpos = use.p_pos[0]
    xpos = 1 - wpos
    x_info, w_info = use.in_info[xpos], use.in_info[wpos]
    if not isinstance(x_info.spec, _trace.Spec) or w_info.spec is not None:
      return None
    (lc, rc), (lb, rb) = use.eqn.params["dimension_numbers"]
    xc, wc, xb, wb = (lc, rc, lb, rb) if wpos == 1 else (rc, lc, rb, lb)
    xs = _trace._shape(use.eqn.invars[xpos])  # pylint: disable=protected-access
    ws = _trace._shape(use.eqn.invars[wpos])  # pylint: disable=protected-access
    xfree = [d for d in range(len(xs)) if d not in xc and d not in xb]
    wfree = [d for d in range(len(ws)) if d not in wc and d not in wb]
    ex = x_info.spec.axis
    if ex not in xfree:
      return None
    nb = len(xb)
    if wpos == 1:
      x_out = [nb + i for i in range(len(xfree))]
      w_out = [nb + len(xfree) + i for i in range(len(wfree))]
    else:
      w_out = [nb + i for i in range(len(wfree))]
      x_out = [nb + len(wfree) + i for i in range(len(xfree))]
    out_spec = use.out_info[0].spec
    want = _trace.Spec(x_out[xfree.index(ex)], x_info.spec.inner, x_info.spec.outer)
    if out_spec != want:
      return None
    wlist = list(wb) + list(wc) + wfree
    return {"needs": (xpos,), "xpos": xpos, "wpos": wpos, "xc": list(xc),
            "xb": list(xb), "xfree": xfree, "x_out": x_out, "w_out": w_out, "nb": nb,
            "H": int(np.prod([xs[d] for d in xb], dtype=np.int64)),
            "K": int(np.prod([xs[d] for d in xc], dtype=np.int64)),
            "N": int(np.prod([ws[d] for d in wfree], dtype=np.int64)),
            "wsizes": [ws[d] for d in wlist],
            "wperm": [wlist.index(d) for d in range(len(ws))]}

  def temp_bytes(self, use, b):
    d = use.data
    return block_temp_bytes([d["K"]], [d["N"]], d["H"], positions(use, b))

  def merge_key(self, use):
    d = use.data
    return ("dot_general", id(use.eqn.invars[d["wpos"]]), d["wpos"],
            str(use.eqn.params["dimension_numbers"]), use.scope_id)

  def canon(self, use, recs, gs, b, views=None):
    d = use.data
    ns = len(use.stack)
    wst = use.in_info[d["wpos"]].wstack  # scan levels with a weight per step
    ws_dims = [[i] for i in wst]
    stack = [[i] for i in range(ns) if i not in wst]
    hs = int(np.prod([use.stack[i] for i in wst], dtype=np.int64))
    x = recs[d["xpos"]]
    x2, dm, exd = cm.split(x, use.in_info[d["xpos"]].spec, ns, b)
    perm = ([exd] + cm.flat(ws_dims) + cm.flat([dm[ns + i] for i in d["xb"]])
            + cm.flat(stack + [dm[ns + i] for i in d["xfree"]])
            + cm.flat([dm[ns + i] for i in d["xc"]]))
    a = jnp.transpose(x2, perm).reshape(b, hs * d["H"], -1, d["K"])
    g2, gm, gex = cm.split(gs[0], use.out_info[0].spec, ns, b)
    perm = ([gex] + cm.flat(ws_dims) + cm.flat([gm[ns + i] for i in range(d["nb"])])
            + cm.flat(stack + [gm[ns + i] for i in d["x_out"]])
            + cm.flat([gm[ns + i] for i in d["w_out"]]))
    g = jnp.transpose(g2, perm).reshape(b, hs * d["H"], -1, d["N"])
    return {"a": a, "g": g, "data": d, "ws": tuple(use.stack[i] for i in wst)}

  def concat(self, canons):
    if len(canons) == 1:
      return canons[0]
    return {"a": jnp.concatenate([c["a"] for c in canons], axis=2),
            "g": jnp.concatenate([c["g"] for c in canons], axis=2),
            "data": canons[0]["data"], "ws": canons[0]["ws"]}

  def sq(self, c):
    a, g = cm.f32(c["a"]), cm.f32(c["g"])
    _, _, t, k = a.shape
    n = g.shape[-1]
    if t == 1:
      return jnp.sum(jnp.sum(cm.sq(a), (2, 3)) * jnp.sum(cm.sq(g), (2, 3)), axis=1)
    if _use_gram(t, k, n):
      aa = jnp.einsum("bhtk,bhsk->bhts", a, a, precision=cm.HI)
      gg = jnp.einsum("bhtn,bhsn->bhts", g, g, precision=cm.HI)
      return jnp.sum(aa * gg, axis=(1, 2, 3))
    w = jnp.einsum("bhtk,bhtn->bhkn", a, g, precision=cm.HI)
    return jnp.sum(cm.sq(w), axis=(1, 2, 3))

  def _layout(self, x, d, lead):
    x = x.reshape(lead + tuple(d["wsizes"]))
    off = len(lead)
    return jnp.transpose(x, list(range(off)) + [off + p for p in d["wperm"]])

  def _lead(self, c, b=None):
    return ((b,) if b is not None else ()) + tuple(c["ws"])

  def weighted(self, c, w, fin, wshapes):
    d = c["data"]
    return {d["wpos"]: self._layout(_weighted_sum(c, w, fin), d, self._lead(c))}

  def per_example(self, c, wshapes):
    d = c["data"]
    pe = jnp.einsum("bhtk,bhtn->bhkn", cm.f32(c["a"]), cm.f32(c["g"]), precision=cm.HI)
    return {d["wpos"]: self._layout(pe, d, self._lead(c, pe.shape[0]))}


def _weighted_sum(c, w, fin):
  """``sum_b w_b sum_t a_bt g_bt^T`` over the finite examples: ``[H, K, N]``."""
  return jnp.einsum("bhtk,bhtn->hkn", cm.mask_rows(c["a"], fin),
                    cm.mask_rows(c["g"], fin, w), precision=cm.HI)


# ------------------------------------------------ shared data operands (fused uses)


def row_key(use):
  """Key of the canonical data rows ``a`` of a use: equal keys give equal ``a``."""
  d = use.data
  return (use.scope_id, use.rec_key.get(d["xpos"]), tuple(d["xc"]), tuple(d["xb"]),
          tuple(d["xfree"]), use.in_info[d["xpos"]].spec, tuple(use.stack))


def col_key(use):
  """Key of the canonical output-gradient rows ``g`` (the probe and its layout)."""
  d = use.data
  return (use.probe_key.get(0), d["nb"], tuple(d["x_out"]), tuple(d["w_out"]),
          use.out_info[0].spec, tuple(use.stack))


def fusable(use) -> bool:
  """A use whose rows may be concatenated with other parameters' uses."""
  d = use.data
  return not use.in_info[d["wpos"]].wstack and use.rec_key.get(d["xpos"]) is not None


def block_canon(rows):
  """``rows[r][c]``: canon of the member in row r, column c -> one fused canon.

  Every row shares one ``a`` (its first member's) and every column one ``g``.
  """
  a = [r[0]["a"] for r in rows]
  g = [c["g"] for c in rows[0]]
  return {"a": a[0] if len(a) == 1 else jnp.concatenate(a, axis=-1),
          "g": g[0] if len(g) == 1 else jnp.concatenate(g, axis=-1),
          "ks": [x.shape[-1] for x in a], "ns": [x.shape[-1] for x in g]}


def block_sq(c):
  """[B] squared norm of all members of a fused block (one product)."""
  return DotGeneral().sq(c)


def block_weighted(c, members, w, fin):
  """``members[r][col]`` = (canon, data) -> {(r, col): sum_b w_b dW'_b} in W' layout."""
  s = _weighted_sum(c, w, fin)
  ko = np.cumsum([0] + c["ks"])
  no = np.cumsum([0] + c["ns"])
  rule = DotGeneral()
  out = {}
  for r, row in enumerate(members):
    for col, (canon, d) in enumerate(row):
      piece = s[:, ko[r]:ko[r + 1], no[col]:no[col + 1]]
      out[(r, col)] = rule._layout(piece, d, rule._lead(canon))  # pylint: disable=protected-access
  return out


def positions(use, b) -> int:
  """``T``: the positions per example and dot-general batch index (steps included)."""
  d = use.data
  steps = int(np.prod(use.stack, dtype=np.int64)) if use.stack else 1
  xsize = cm.size_of(use.eqn.invars[d["xpos"]].aval)
  return max(xsize // max(b * d["H"] * d["K"], 1), 1) * steps


def block_temp_bytes(ks, ns, h, t) -> int:
  """Estimated bytes per example of a fused block's temporaries."""
  k, n = sum(ks), sum(ns)
  big = t * t if _use_gram(t, k, n) else k * n
  return 4 * h * big + 4 * h * t * (k + n)
