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
Per use, by primitive (``gradclip_jax.dp._rules``, one module per family, each
registered with ``@register(primitive)``; the protocol is in ``_rules/_base.py``):

* ``dot_general`` (Dense, einsum, attention projections, fused LSTM kernels): with
  ``T`` positions per example, data rows ``a_t`` (``K`` features) and output-gradient
  rows ``g_t`` (``N``), one of two exact forms, chosen per use from the traced shapes:
  the Gram form ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (Goodfellow 2015; Li et al.
  2022), ``T^2 (K + N)`` per example, with the clipped sum ``sum_b w_b a_b^T g_b`` one
  product over the batch afterwards (book-keeping, Bu et al. 2023); or the
  per-example gradient ``G_b = a_b^T g_b`` (``T K N``, the layer's share of a plain
  weight gradient), formed once for a chunk of examples, its norm taken and ``G_b``
  *reused* for ``sum_b w_b G_b`` (mixed ghost clipping, Bu et al. 2022). The engine
  takes the form with fewer FLOPs among those whose memory lets a chunk of
  ``MIN_CHUNK`` examples fit the budget;
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
* ``cond`` whose branch index is the same for every example (a branch chosen by the
  step of a loop, or by a parameter): looked through with all its branches; the
  branches not taken record zeros, so their uses contribute nothing, and one
  parameter read in several branches is one use with their positions concatenated;
* ``dot_general`` uses of *different* parameters that read the same data operand
  (the same value, with the same dimension numbers on its side; e.g. attention's
  query/key/value projections) are one product with their output gradients
  concatenated, and data operands whose uses have the same output gradients
  (``W_x x_t + W_h h_t`` in one gate) stack along the contracted features: exact for
  the total norm, ``||sum_t a_t [g_1t ... g_Lt]^T||^2 = sum_l ||sum_t a_t g_lt^T||^2``,
  and one product gives all their clipped sums. ``linen.LSTMCell``'s eight kernels
  (``x_t`` and ``h_{t-1}`` times four gates) become one ``[2K, 4N]`` product per
  example; ``ghost_coverage`` adds ``" [fused: N parameters on shared operands]"``.
  Outputs split alike and added piece by piece (``split(x W_x)[j] + split(h W_h)[j]``,
  ``OptimizedLSTMCell``) have one output gradient too, and fuse the same way;
* the same parameter operand used several times with the same form (a shared layer):
  positions concatenated; a 2-D table read by ``gather`` and by ``dot_general`` (tied
  input/output embeddings, ``h @ E.T``): ``|G_gather|^2 + |G_dot|^2`` plus the exact
  cross term ``2 <G_gather, G_dot>`` on the looked-up rows (``_rules/tied.py``); other
  parameters reached by uses of different forms, or through non-isometric parameter
  arithmetic (e.g. a weight penalty added to the loss): exact per-example gradients
  of those parameters only, from the uses' per-example ``dW'`` mapped back by the VJP
  of the parameter-only program;
* anything else (``custom_vjp_call``, ``while``, a ``cond`` whose branch depends on
  the example, a ``scan`` carrying parameters in its carry, an unknown primitive): the
  per-example gradient of that parameter through *that one operation* from its
  recorded operands and output gradient (the operation's own VJP, vmapped over
  examples; ``B`` masked VJPs for operations whose inner program was traced at
  ``B``), never a per-example re-run of the whole model. ``ghost_coverage`` names
  these ``"fallback: <primitive>"``.

The clipped sum needs no second backward pass (book-keeping, Bu et al. 2023): each
use's ``sum_b w_b dW'_b`` comes from its records (Gram form) or from the per-example
gradients already formed (per-example form), and one VJP of the parameter-only part
of the program maps all of them to the parameter leaves. An example whose loss or norm
is NaN/inf gets weight zero and contributes exactly zero (its records and gradients
are masked with ``where``); its norm is reported as computed. Padded examples
(``mask=``) contribute zero and report a norm of 0.

Mixed precision: parameters stored in float32 and read in bfloat16/float16 (a
``convert_element_type`` between the parameter and its use, ``preferred_element_type``),
and bfloat16 parameters, get the same rules; norms and sums are accumulated in float32
(float64 for float64 parameters) and returned in each parameter's dtype, and the sum
reaches a float32 parameter without being rounded to the dtype of its use.

Refused with a ``ValueError`` naming the operation and its source line: an operation
that combines examples (a reduction or normalisation over the batch, e.g. BatchNorm
with batch statistics, or a value with two example axes). ``method="auto"`` uses
vmap when the program cannot be analysed (e.g. ``loss_fn`` cannot be traced at
``B + 1``) or no parameter gets an exact rule.

Memory: with ``microbatch_size=None`` the model runs on the whole batch unless its
probe gradients (the output gradients of every use, stacked over the steps of scans)
would exceed the budget, in which case it runs on the largest divisor ``m`` of ``B``
that fits; the norms are then computed for chunks of examples whose per-example
temporaries (the per-example gradients kept for reuse, the largest Gram matrices,
the per-example gradients of parameters on the per-example path) fit the budget. The
budget is ``gradclip_jax.dp.GHOST_MEMORY_BUDGET`` bytes when set (read when the step
is traced), else ``_clipped_grad.DEFAULT_BUDGETS`` for the backend. Pass
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
