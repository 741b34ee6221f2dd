r"""Differential privacy: per-example clipping, Gaussian noise, ghost norms, accounting.

:func:`per_example_clip` / :func:`add_noise` / :func:`dp_aggregate` are Optax
transforms over per-example gradients; :func:`clipped_grad` computes the sum of
clipped per-example gradients directly from a per-example loss, by ``vmap`` or by
ghost norms on the traced program of any JAX model (flax.linen, flax.nnx, Equinox,
Haiku, plain functions); :func:`ghost_coverage` says which rule each parameter gets;
``gradclip_jax.dp.accounting`` wraps the ``dp-accounting`` package (imported lazily).

.. rubric:: Loss convention

``loss_fn(params, *batch)`` returns a vector of ``B`` *per-example* losses (no mean
or sum over the batch); every leaf of every batch argument has the batch axis first.
The result is ``sum_b min(1, C / n_b) grad(loss_b)``, ``n_b`` the L2 norm of example
``b``'s gradient over all parameters (Abadi et al. 2016), divided by ``normalize_by``
when given: to train on the mean loss pass ``normalize_by=B`` rather than averaging
inside ``loss_fn``. A loss averaged over the tokens of one example is fine.

.. rubric:: Ghost norms on the traced program

``loss_fn`` is traced abstractly (``jax.make_jaxpr``) at the batch size ``B`` and at
``B + 1``; the two programs are walked side by side, and the axis of each
intermediate whose size moved is its *example axis* (an axis that grew by ``k > 1``
holds ``outer x B x inner`` entries, e.g. ``[T*B, H]`` after a time-major reshape).
Every operation that reads a parameter-derived value ``W'`` (the parameter seen
through reshape, transpose, broadcast, convert, slicing, concatenation of several
parameters, ``pjit``/closed calls, ``checkpoint``, ``custom_jvp`` calls) and data is a
*use*. The program is then run once with a zero *probe* added to every use's output;
one backward pass of the summed loss, with the parameters as constants, gives every
use's output gradient ``g`` per example, and the uses' data operands are recorded.
Per use, by primitive (``gradclip_jax.dp._rules``, one module per family):

* ``dot_general`` (Dense, einsum, attention projections, fused LSTM kernels): with
  ``T`` positions per example, data rows ``a_t`` and output-gradient rows ``g_t``,
  the Gram form ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` when it needs fewer FLOPs
  (``T (K + N) <= K N``) or at most twice the FLOPs with ``8 T^2 <= K N``, else the
  direct ``||sum_t a_t g_t^T||^2`` (Goodfellow 2015; Li et al. 2022);
* ``gather`` of rows (embeddings, ``jnp.take``, indexing): segment sums of ``g`` over
  each example's sorted ids, never a dense ``V x d`` per-example matrix;
* ``add`` / ``sub`` / ``mul`` with a broadcast parameter (biases, LayerNorm/RMSNorm
  scales and offsets, learned positions): the per-example reduction of ``g`` (times
  the other operand) over the broadcast positions (Bu et al. 2022);
* ``conv_general_dilated`` with a parameter kernel (1-D/2-D/3-D, strides, dilation,
  feature groups): the per-example kernel gradient from the conv's own VJP applied
  per example (``B x |kernel|`` floats);
* ``scan`` with parameters among its constants (``nn.RNN``, ``nn.scan``, ``lax.scan``):
  looked through (as are ``pjit`` calls and ``checkpoint``, whose recomputation is
  then not kept); the body's uses get their probes as extra scanned inputs and record
  their operands as extra scan outputs, so the steps become positions of one use.
  Parameters scanned over as inputs (``nn.scan`` over layers with ``variable_axes=
  {"params": 0}``, ``lax.scan`` over stacked weights) are one weight per step: for
  ``dot_general`` and elementwise uses the step axis is then a weight axis;
* ``dot_general`` uses of *different* parameters that read the same data operand
  (the same value, with the same dimension numbers on its side; e.g. attention's
  query/key/value projections) are one product with their output gradients
  concatenated, and data operands whose uses have the same output gradients
  (``W_x x_t + W_h h_t`` in one gate) stack along the contracted features: exact for
  the total norm, ``||sum_t a_t [g_1t ... g_Lt]^T||^2 = sum_l ||sum_t a_t g_lt^T||^2``,
  and one product gives all their clipped sums. ``linen.LSTMCell``'s eight kernels
  (``x_t`` and ``h_{t-1}`` times four gates) become one ``[2K, 4N]`` product per
  example; ``ghost_coverage`` adds ``" [fused: N parameters on shared operands]"``;
* the same parameter operand used several times with the same form (a shared layer):
  positions concatenated; a 2-D table read by ``gather`` and by ``dot_general`` (tied
  input/output embeddings, ``h @ E.T``): ``|G_gather|^2 + |G_dot|^2`` plus the exact
  cross term ``2 <G_gather, G_dot>`` on the looked-up rows; other parameters reached by
  uses of different forms, or through non-isometric parameter arithmetic (e.g. a
  weight penalty added to the loss): exact per-example gradients of those parameters
  only, from the uses' per-example ``dW'`` mapped back by the VJP of the
  parameter-only program;
* anything else (``custom_vjp_call``, ``while``, ``cond``, a ``scan`` carrying
  parameters in its carry, an unknown primitive): the per-example gradient of that parameter through *that one
  operation* from its recorded operands and output gradient (the operation's own VJP,
  vmapped over examples; ``B`` masked VJPs for operations whose inner program was
  traced at ``B``), never a per-example re-run of the whole model. ``ghost_coverage``
  names these ``"fallback: <primitive>"``.

The clipped sum needs no second backward pass (book-keeping, Bu et al. 2023): each
use's ``sum_b w_b dW'_b`` is formed from the same records with the clip weights
``w_b``, and one VJP of the parameter-only part of the program maps all of them to
the parameter leaves. No unclipped weight gradient is ever formed. An example whose
loss or norm is NaN/inf gets weight zero and contributes exactly zero (its records
and gradients are masked with ``where``); its norm is reported as computed.

Refused with a ``ValueError`` naming the operation and its source line: an operation
that combines examples (a reduction or normalisation over the batch, e.g. BatchNorm
with batch statistics, or a value with two example axes). ``method="auto"`` uses
vmap when the program cannot be analysed (e.g. ``loss_fn`` cannot be traced at
``B + 1``) or no parameter gets an exact rule.

Memory: with ``microbatch_size=None`` the ghost method splits the batch into
microbatches (the largest divisor ``m`` of ``B``) so that its own extra memory over
a plain step per microbatch - the probe gradients, the largest Gram/direct/
per-example temporary of one rule, and the per-example gradients of parameters on
the per-example path, estimated from the traced shapes - stays within a budget:
``gradclip_jax.dp.GHOST_MEMORY_BUDGET`` bytes when set (read when the step is traced),
else 128 MiB on CPU and 512 MiB on other backends (``_clipped_grad.DEFAULT_BUDGETS``).
On CPU the smaller microbatches were faster as well as lighter (the cache; see the DP
guide's cost section); the accelerator value is not tuned by a measurement. Pass
``microbatch_size`` to choose ``m`` yourself (``microbatch_size=B``: one pass over the
whole batch).
"""

from gradclip_jax.dp._clipped_grad import GHOST_MEMORY_BUDGET
from gradclip_jax.dp._clipped_grad import clipped_grad
from gradclip_jax.dp._clipped_grad import ghost_coverage
from gradclip_jax.dp._per_example import AddNoiseState
from gradclip_jax.dp._per_example import PerExampleClipState
from gradclip_jax.dp._per_example import add_noise
from gradclip_jax.dp._per_example import dp_aggregate
from gradclip_jax.dp._per_example import per_example_clip

__all__ = ["AddNoiseState", "PerExampleClipState", "add_noise", "clipped_grad",
           "dp_aggregate", "ghost_coverage", "per_example_clip"]
