# %% [markdown]
# # Why clip gradients?
#
# Two small experiments. The first is gradient descent on $y = x^2$ with a learning rate at
# the edge of stability. The second is a recurrent network whose gradient norm grows
# exponentially with sequence length: the exploding gradients of Bengio et al. (1994) and
# Pascanu et al. (2013), for which global-norm clipping was proposed.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import gradclip_jax
from gradclip_jax import functional as F

QUICK = os.environ.get("GRADCLIP_QUICK") == "1"  # the tests shrink the work

# %% [markdown]
# ## 1. Gradient descent on $y = x^2$
#
# The gradient is $2x$. With learning rate 1 the update is $x \leftarrow x - 2x = -x$, so
# from $x_0 = 5$ the iterate jumps between $5$ and $-5$ forever. With rate 1.05 it
# diverges. Clipping the gradient to norm $c$ bounds every step by $\text{lr} \cdot c$: far
# from the minimum the iterate walks in at a fixed pace. Near it, where $|2x| < c$, the
# clip is inactive, and the remaining oscillation has amplitude at most $c/2$ (the step size
# is still too large; clipping bounds it, it does not tune it).

# %%
def descend(lr, clip=None, x0=5.0, steps=30):
    tx = optax.sgd(lr) if clip is None else optax.chain(gradclip_jax.clip_by_global_norm(clip), optax.sgd(lr))
    x, state, xs = jnp.asarray(x0), None, [x0]
    state = tx.init(x)
    for _ in range(steps):
        g = jax.grad(lambda x: x ** 2)(x)
        u, state = tx.update(g, state, x)
        x = optax.apply_updates(x, u)
        xs.append(float(x))
    return np.array(xs)

runs = {"lr 1.0, no clip": descend(1.0), "lr 1.0, clip 1": descend(1.0, 1.0),
        "lr 1.05, no clip": descend(1.05), "lr 1.05, clip 1": descend(1.05, 1.0)}
for name, xs in runs.items():
    print(f"{name:18s} x_0..x_6 = {np.round(xs[:7], 3)}  |x_30| = {abs(xs[-1]):.3g}")

fig, ax = plt.subplots(figsize=(8, 3.5))
for name, xs in runs.items():
    ax.plot(xs, marker=".", label=name)
ax.set_ylim(-12, 12); ax.set_xlabel("step"); ax.set_ylabel("x"); ax.legend(fontsize=8)
ax.set_title("gradient descent on y = x^2 from x = 5")
plt.show()

# %% [markdown]
# ## 2. A recurrent network whose gradient explodes
#
# A vanilla tanh RNN, $h_t = \tanh(W h_{t-1} + U x_t)$, with a recurrent matrix of spectral
# radius above 1. The loss reads only the last state, so its gradient with respect to $W$
# runs back through $T$ Jacobians $\mathrm{diag}(1 - h_t^2) W$. In the saturating regime their
# product can grow exponentially in $T$ (Pascanu et al., 2013, sec. 2).

# %%
H, D = 32, 4

def init_params(key, radius):
    k1, k2, k3 = jax.random.split(key, 3)
    w = jax.random.normal(k1, (H, H)) / np.sqrt(H)
    w = w * radius / np.max(np.abs(np.linalg.eigvals(np.asarray(w))))
    return {"w": w, "u": jax.random.normal(k2, (D, H)) * 0.5, "v": jax.random.normal(k3, (H,)) * 0.1}

def rnn_loss(params, xs, target):
    def cell(h, x):
        h = jnp.tanh(h @ params["w"] + x @ params["u"])
        return h, None
    h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], H)), xs)
    return jnp.mean((h @ params["v"] - target) ** 2)

key = jax.random.PRNGKey(0)
lengths = [5, 10, 20, 40, 80] if QUICK else [5, 10, 20, 40, 80, 160, 320]
norms = {}
for radius in (0.9, 1.5, 3.0):
    params = init_params(key, radius)
    row = []
    for T in lengths:
        xs = jax.random.normal(jax.random.PRNGKey(T), (T, 16, D)) * 0.1
        g = jax.grad(rnn_loss)(params, xs, jnp.ones(16))
        row.append(float(F.global_norm(g)))
    norms[radius] = row
    print(f"spectral radius {radius}: grad norm by T = {np.round(row, 3)}")

fig, ax = plt.subplots(figsize=(6, 3.5))
for radius, row in norms.items():
    ax.semilogy(lengths, row, marker="o", label=f"spectral radius {radius}")
ax.set_xscale("log"); ax.set_xlabel("sequence length T"); ax.set_ylabel("||dL/dθ||")
ax.legend(); ax.set_title("gradient norm of a tanh RNN"); plt.show()

# %% [markdown]
# ### Training it, with and without clipping
#
# The task: from the last state, predict $\tanh$ of the summed first input channel over
# $T = 50$ steps. The target variance is about 0.29, so a loss below that means the network
# learned something. Every run starts from the same initialisation (spectral radius 1.2)
# and uses SGD with momentum 0.9 at learning rate 0.1. Without clipping, the rare huge
# gradients throw the parameters away and the loss goes to NaN. Clipping by value bounds
# each entry but changes the gradient's direction, and it stalls near the variance.
# Global-norm clipping keeps the direction, and the same optimizer trains.

# %%
T, B = 50, 64
steps = 150 if QUICK else 600

def batch(key):
    xs = jax.random.normal(key, (T, B, D)) * 0.3
    return xs, jnp.tanh(jnp.sum(xs[:, :, 0], axis=0) / 3)

def train(tx):
    params = init_params(jax.random.PRNGKey(1), 1.2)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        xs, y = batch(key)
        loss, g = jax.value_and_grad(rnn_loss)(params, xs, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss, F.global_norm(g)

    losses, gnorms = [], []
    for i in range(steps):
        params, state, loss, gn = step(params, state, jax.random.PRNGKey(i))
        losses.append(float(loss)); gnorms.append(float(gn))
    return np.array(losses), np.array(gnorms)

def sgd():
    return optax.sgd(0.1, momentum=0.9)

curves = {
    "no clipping": train(sgd()),
    "clip_by_value(0.1)": train(optax.chain(gradclip_jax.clip_by_value(-0.1, 0.1), sgd())),
    "clip_by_global_norm(0.3)": train(optax.chain(gradclip_jax.clip_by_global_norm(0.3), sgd())),
}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, (losses, gnorms) in curves.items():
    finite = np.isfinite(losses)
    print(f"{name:24s} final loss (mean of last 50): {np.nanmean(losses[-50:]):.4f}  "
          f"non-finite steps: {int((~finite).sum())}  max grad norm: {np.nanmax(gnorms):.3g}")
    axes[0].semilogy(np.where(finite, losses, np.nan), label=name, lw=1)
    axes[1].semilogy(gnorms, label=name, lw=0.8)
axes[0].set_title("training loss"); axes[0].set_xlabel("step"); axes[0].legend(fontsize=8)
axes[1].set_title("gradient norm (before clipping)"); axes[1].set_xlabel("step")
plt.tight_layout(); plt.show()
