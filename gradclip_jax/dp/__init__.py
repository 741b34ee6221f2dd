"""Differential privacy: per-example clipping, Gaussian noise, ghost norms, accounting.

``per_example_clip`` / ``add_noise`` / ``dp_aggregate`` are Optax transforms over
per-example gradients; ``clipped_grad`` computes the clipped sum directly from a
per-example loss (by ``vmap`` or by ghost norms for ``flax.linen`` models);
``gradclip_jax.dp.accounting`` wraps the ``dp-accounting`` package (imported lazily).
"""

from gradclip_jax.dp._clipped_grad import clipped_grad
from gradclip_jax.dp._clipped_grad import ghost_coverage
from gradclip_jax.dp._per_example import AddNoiseState
from gradclip_jax.dp._per_example import PerExampleClipState
from gradclip_jax.dp._per_example import add_noise
from gradclip_jax.dp._per_example import dp_aggregate
from gradclip_jax.dp._per_example import per_example_clip

__all__ = ["AddNoiseState", "PerExampleClipState", "add_noise", "clipped_grad",
           "dp_aggregate", "ghost_coverage", "per_example_clip"]
