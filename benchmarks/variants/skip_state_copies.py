"""Why skip_spikes pays copies: selecting Adam's state between old and new, minimally.

Compiles plain adam steps on one 4096x1024 leaf (parameters and state donated) and
counts the ``copy`` instructions XLA inserts at entry. Selecting only the updates
(B) needs none. Every variant that selects the state between old and new on a run-time
flag copies ``mu``, ``nu`` and ``count``: A and C, F with a barrier over
``(update, old state)``, and G with a barrier over ``(update, old state, new state)``.
The parameter update and the bias correction recompute the new moments and count from
the old buffers, in other fusions than the in-place write of the selected state.
On XLA:CPU, jax 0.10.2, 2026-11-26.

What ``skip_spikes`` does now is O: each moment's select also depends on one entry
of the matching (materialised) update, through a never-true bit count that XLA cannot
fold, so the in-place write is ordered after the update and nothing is copied but the
scalar count. ``lax.cond`` over the inner update (H) kept the 3 copies.

    python benchmarks/variants/skip_state_copies.py
"""
import jax, jax.numpy as jnp, optax
from jax import lax
shape = (4096, 1024)
p = {"w": jnp.ones(shape)}; g = {"w": jnp.ones(shape)}
tx = optax.adam(1e-3)
s = tx.init(p)
def variants():
  def A(p, s, g, pred):   # select state only
    u, ns = tx.update(g, s, p)
    ns = jax.tree.map(lambda o, n: jnp.where(pred, o, n), s, ns)
    return optax.apply_updates(p, u), ns
  def B(p, s, g, pred):   # select updates only
    u, ns = tx.update(g, s, p)
    u = jax.tree.map(lambda x: jnp.where(pred, 0., x), u)
    return optax.apply_updates(p, u), ns
  def C(p, s, g, pred):   # both
    u, ns = tx.update(g, s, p)
    u = jax.tree.map(lambda x: jnp.where(pred, 0., x), u)
    ns = jax.tree.map(lambda o, n: jnp.where(pred, o, n), s, ns)
    return optax.apply_updates(p, u), ns
  def F(p, s, g, pred):   # the update materialised before the state is overwritten
    u, ns = tx.update(g, s, p)
    u = jax.tree.map(lambda x: jnp.where(pred, 0., x), u)
    u, s_b = lax.optimization_barrier((u, s))
    ns = jax.tree.map(lambda o, n: jnp.where(pred, o, n), s_b, ns)
    return optax.apply_updates(p, u), ns
  def G(p, s, g, pred):   # the same, barrier on the new state too
    u, ns = tx.update(g, s, p)
    u = jax.tree.map(lambda x: jnp.where(pred, 0., x), u)
    u, s_b, ns = lax.optimization_barrier((u, s, ns))
    ns = jax.tree.map(lambda o, n: jnp.where(pred, o, n), s_b, ns)
    return optax.apply_updates(p, u), ns
  def H(p, s, g, pred):   # lax.cond over the inner update
    u, ns = lax.cond(pred, lambda g, s: (jax.tree.map(jnp.zeros_like, g), s),
                     lambda g, s: tx.update(g, s, p), g, s)
    return optax.apply_updates(p, u), ns
  def O(p, s, g, pred):   # each select ordered after its update leaf (skip_spikes)
    u, ns = tx.update(g, s, p)
    u = jax.tree.map(lambda x: jnp.where(pred, 0., x), u)
    word = lax.bitcast_convert_type(u["w"].reshape(-1)[0], jnp.uint32)
    after = pred | (lax.population_count(word) > 32)
    ns = jax.tree.map(lambda o, n: jnp.where(after if o.ndim else pred, o, n), s, ns)
    return optax.apply_updates(p, u), ns
  return dict(A=A, B=B, C=C, F=F, G=G, H=H, O=O)
for name, f in variants().items():
  c = jax.jit(f, donate_argnums=(0, 1)).lower(p, s, g, jnp.bool_(False)).compile()
  txt = c.as_text(); entry = txt[txt.index("ENTRY"):]
  print(name, "copies", entry.count(" copy("), [l.strip()[:60] for l in entry.splitlines() if " copy(" in l][:4])
