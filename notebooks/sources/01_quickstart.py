# %% [markdown]
# # gradclip_jax quickstart
#
# Every clipping rule in `gradclip_jax` is an Optax `GradientTransformation`: put it in front
# of your optimizer with `optax.chain`. This notebook runs each rule on a toy gradient tree,
# reads the pre-clip norm from the optimizer state, and changes the threshold during training
# with `optax.inject_hyperparams`.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax
from gradclip_jax import functional as F

grads = {
    "embed": jnp.array([[3.0, 4.0], [0.0, 0.1]]),
    "dense": {"kernel": jnp.array([[1.0, -2.0], [2.0, 1.0]]), "bias": jnp.array([12.0, 0.0])},
}
params = jax.tree.map(jnp.ones_like, grads)
print("global L2 norm of the gradients:", float(F.global_norm(grads)))

# %% [markdown]
# ## Every rule on the same tree
#
# The fixed rules take a threshold. The adaptive rules work it out from the run itself, so
# one step shows only their start-up behaviour (`adaptive_grad_clip` needs the parameters).

# %%
rules = {
    "clip_by_value(-1, 1)": gradclip_jax.clip_by_value(-1.0, 1.0),
    "clip_by_norm(2) (each leaf)": gradclip_jax.clip_by_norm(2.0),
    "clip_by_norm(2, axes=-1) (each row)": gradclip_jax.clip_by_norm(2.0, axes=-1),
    "clip_by_average_norm(1)": gradclip_jax.clip_by_average_norm(1.0),
    "clip_by_global_norm(5)": gradclip_jax.clip_by_global_norm(5.0),
    "clip_by_global_norm(5, L1)": gradclip_jax.clip_by_global_norm(5.0, norm_type=1),
    "clip_by_global_norm(5, Linf)": gradclip_jax.clip_by_global_norm(5.0, norm_type=jnp.inf),
    "adaptive_grad_clip(0.5)": gradclip_jax.adaptive_grad_clip(0.5),
    "autoclip(10)": gradclip_jax.autoclip(10.0, history_size=100),
    "zclip()": gradclip_jax.zclip(),
    "adagc()": gradclip_jax.adagc(),
}
for name, tx in rules.items():
    out, state = tx.update(grads, tx.init(params), params)
    print(f"{name:38s} norm after: {float(F.global_norm(out)):7.3f}   "
          f"bias -> {np.round(np.asarray(out['dense']['bias']), 3)}")

# %% [markdown]
# ## In a training step, with the norm logged from the state
#
# The state of `clip_by_global_norm` keeps the pre-clip `global_norm`, the `scale` applied
# and counters. `optax.tree_utils.tree_get` finds a field by name anywhere in a chain's
# state.

# %%
def loss_fn(params, x, y):
    pred = x @ params["w"] + params["b"]
    return jnp.mean((pred - y) ** 2)

tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.1))

@jax.jit
def train_step(params, opt_state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

key = jax.random.PRNGKey(0)
x = jax.random.normal(key, (64, 3)) * 5
y = x @ jnp.array([1.0, -2.0, 0.5]) + 3.0
p = {"w": jnp.zeros(3), "b": jnp.zeros(())}
opt_state = tx.init(p)
for step in range(1, 41):
    p, opt_state, loss = train_step(p, opt_state, x, y)
    if step % 8 == 0 or step == 1:
        tree_get = optax.tree_utils.tree_get
        print(f"step {step:3d} loss {float(loss):9.4f}  pre-clip norm "
              f"{float(tree_get(opt_state, 'global_norm')):8.3f}  scale "
              f"{float(tree_get(opt_state, 'scale')):.3f}")
print("steps clipped:", int(optax.tree_utils.tree_get(opt_state, "num_clipped")))

# %% [markdown]
# ## Changing the threshold during training
#
# `optax.inject_hyperparams` moves `max_norm` into the state, where it can be changed
# between steps (or given a schedule) without recompiling.

# %%
tx = optax.inject_hyperparams(gradclip_jax.clip_by_global_norm)(max_norm=1.0)
state = tx.init(grads)
update = jax.jit(tx.update)
for max_norm in (1.0, 4.0, 100.0):
    state.hyperparams["max_norm"] = jnp.asarray(max_norm)
    out, state = update(grads, state)
    print(f"max_norm={max_norm:6.1f}: clipped norm {float(F.global_norm(out)):.3f}")

schedule = optax.linear_schedule(init_value=0.5, end_value=5.0, transition_steps=4)
tx = optax.inject_hyperparams(gradclip_jax.clip_by_global_norm)(max_norm=schedule)
state = tx.init(grads)
for _ in range(5):
    out, state = tx.update(grads, state)
    print(f"scheduled max_norm {float(state.hyperparams['max_norm']):.3f} -> "
          f"norm {float(F.global_norm(out)):.3f}")

# %% [markdown]
# ## Half precision
#
# The norms accumulate in float32 (float64 gradients keep float64), so float16 gradients
# do not overflow. Optax's norm of this tree is `inf`, and its clip then silently sets the
# update to zero.

# %%
g16 = {"w": jnp.full((1000,), 300.0, jnp.float16)}
print("optax.global_norm:", optax.global_norm(g16))
print("gradclip_jax     :", F.global_norm(g16))
clip = gradclip_jax.clip_by_global_norm(1.0)
out, _ = clip.update(g16, clip.init(g16))
print("clipped:", out["w"][:3], out["w"].dtype)
