# %% [markdown]
# # Porting TensorFlow clipping code
#
# `gradclip_jax.functional` has TensorFlow's `tf.clip_by_*` semantics over pytrees, and the
# transforms put the same rules into an Optax optimizer. TensorFlow need not be installed:
# each cell shows the TensorFlow line as a comment, then computes the expected value with
# TensorFlow's documented formula in NumPy and checks it against gradclip_jax.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax
from gradclip_jax import functional as F

t = jnp.array([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]])
b = jnp.array([0.5, -0.5])

# %% [markdown]
# ## `tf.clip_by_value`

# %%
# TF:  tf.clip_by_value(t, clip_value_min=-2.5, clip_value_max=2.5)
ours = F.clip_by_value(t, -2.5, 2.5)
expected = np.clip(np.asarray(t), -2.5, 2.5)
print(ours); assert np.array_equal(np.asarray(ours), expected)

# %% [markdown]
# ## `tf.clip_by_norm`: $t \cdot c / \max(\lVert t \rVert_2, c)$, with `axes`

# %%
# TF:  tf.clip_by_norm(t, clip_norm=5.0)
ours = F.clip_by_norm(t, 5.0)
expected = np.asarray(t) * 5.0 / max(np.linalg.norm(np.asarray(t)), 5.0)
print(ours); np.testing.assert_allclose(ours, expected, rtol=1e-6)

# TF:  tf.clip_by_norm(t, clip_norm=5.0, axes=[1])    # each row separately
ours = F.clip_by_norm(t, 5.0, axes=[1])
rows = np.linalg.norm(np.asarray(t), axis=1, keepdims=True)
expected = np.asarray(t) * 5.0 / np.maximum(rows, 5.0)
print(ours); np.testing.assert_allclose(ours, expected, rtol=1e-6)

# %% [markdown]
# ## `tf.clip_by_average_norm` (TF 1): clip when $\lVert t \rVert_2 / n > c$

# %%
# TF1: tf.clip_by_average_norm(t, clip_norm=0.5)
ours = F.clip_by_average_norm(t, 0.5)
n = np.asarray(t).size
expected = np.asarray(t) * 0.5 * min(1 / 0.5, n / np.linalg.norm(np.asarray(t)))
print(ours); np.testing.assert_allclose(ours, expected, rtol=1e-6)

# %% [markdown]
# ## `tf.linalg.global_norm` and `tf.clip_by_global_norm(t_list, clip_norm, use_norm)`
#
# A list works as `t_list`, and `None` entries pass through as they do in TensorFlow.
# `use_norm` supplies a norm computed elsewhere.

# %%
t_list = [t, None, b]
# TF:  tf.linalg.global_norm(t_list)
norm = F.global_norm(t_list)
expected_norm = np.sqrt(np.sum(np.asarray(t) ** 2) + np.sum(np.asarray(b) ** 2))
print("global norm:", float(norm), "expected:", expected_norm)

# TF:  clipped, norm = tf.clip_by_global_norm(t_list, clip_norm=2.0)
clipped, norm = F.clip_by_global_norm(t_list, 2.0)
np.testing.assert_allclose(clipped[0], np.asarray(t) * 2.0 / max(expected_norm, 2.0), rtol=1e-6)
print(clipped[1] is None, clipped[2])

# TF:  clipped, _ = tf.clip_by_global_norm(t_list, clip_norm=2.0, use_norm=20.0)
clipped, norm = F.clip_by_global_norm(t_list, 2.0, use_norm=20.0)
np.testing.assert_allclose(clipped[2], np.asarray(b) * 2.0 / 20.0, rtol=1e-6)
print("with use_norm=20:", clipped[2], "norm returned:", float(norm))

# %% [markdown]
# ## `compute_gradients` / `apply_gradients` becomes `grad` / `update` / `apply_updates`
#
# The TensorFlow 1 pattern
#
# ```python
# opt = tf.train.GradientDescentOptimizer(0.1)
# grads_and_vars = opt.compute_gradients(loss)
# grads, variables = zip(*grads_and_vars)
# grads, _ = tf.clip_by_global_norm(grads, 5.0)
# train_op = opt.apply_gradients(zip(grads, variables))
# ```
#
# has two JAX equivalents. One keeps the clip in the training step, as the TF code does. The
# other moves it into the optimizer. They give the same parameters:

# %%
def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

x = jnp.arange(12.0).reshape(4, 3); y = jnp.array([1.0, 2.0, 3.0, 4.0])
params = {"w": jnp.zeros(3), "b": jnp.zeros(())}

# (a) like TF: clip in the step, then a plain optimizer
opt = optax.sgd(0.1)
g = jax.grad(loss)(params, x, y)                      # compute_gradients
g, norm = F.clip_by_global_norm(g, 5.0)               # tf.clip_by_global_norm
u, _ = opt.update(g, opt.init(params), params)
params_a = optax.apply_updates(params, u)            # apply_gradients

# (b) the clip as part of the optimizer
opt = optax.chain(gradclip_jax.clip_by_global_norm(5.0), optax.sgd(0.1))
u, state = opt.update(jax.grad(loss)(params, x, y), opt.init(params), params)
params_b = optax.apply_updates(params, u)

print("pre-clip norm:", float(norm), "  w after one step:", params_a["w"])
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params_a, params_b)
print("identical:", True)

# %% [markdown]
# ## Where the numbers differ from TensorFlow, on purpose
#
# * Zero gradients with `clip_norm=0`: TensorFlow computes $0 \cdot 0 / \max(0, 0)$, which
#   is NaN. gradclip_jax returns zeros.
# * float16: TensorFlow sums the squares in float16 and overflows above about 255 per entry.
#   gradclip_jax accumulates in float32 (float64 for float64 tensors, as TensorFlow).

# %%
z = [jnp.zeros(3)]
print("zeros, clip_norm=0:", F.clip_by_global_norm(z, 0.0)[0][0])
h = [jnp.full((100,), 300.0, jnp.float16)]
print("float16 entries of 300, norm:", float(F.global_norm(h)), "(exact: 3000.0)")
