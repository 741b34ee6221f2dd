"""gradclip_jax: gradient clipping for JAX, every rule an Optax GradientTransformation.

Importing this package pulls in JAX and Optax only; the Flax trainers live in
``gradclip_jax.training`` and are imported only when used.
"""

from gradclip_jax import functional
from gradclip_jax._clipping import ClipByGlobalNormState
from gradclip_jax._clipping import ClipByNormState
from gradclip_jax._clipping import ClipByValueState
from gradclip_jax._clipping import clip_by_average_norm
from gradclip_jax._clipping import clip_by_global_norm
from gradclip_jax._clipping import clip_by_norm
from gradclip_jax._clipping import clip_by_value

__version__ = "0.1.0"

__all__ = [
    "ClipByGlobalNormState", "ClipByNormState", "ClipByValueState",
    "clip_by_average_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_value",
    "functional",
]
