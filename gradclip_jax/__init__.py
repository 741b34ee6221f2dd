"""gradclip_jax: gradient clipping for JAX, every rule an Optax GradientTransformation.

Importing this package pulls in JAX and Optax only; the Flax trainers live in
``gradclip_jax.training`` and are imported only when used.
"""

# First: a JAX or Optax older than the tested floor is an ImportError naming the version
# needed, not an AttributeError in the middle of a trace.
from gradclip_jax import _compat

_compat.check("jax", "jaxlib", "optax")

from gradclip_jax import config  # noqa: E402  (after the version check)
from gradclip_jax import dp
from gradclip_jax import functional
from gradclip_jax._adaptive import AdaGCState
from gradclip_jax._adaptive import AdaptiveGradClipState
from gradclip_jax._adaptive import AutoClipState
from gradclip_jax._adaptive import SkipSpikesState
from gradclip_jax._adaptive import ZClipState
from gradclip_jax._adaptive import adagc
from gradclip_jax._adaptive import adaptive_grad_clip
from gradclip_jax._adaptive import autoclip
from gradclip_jax._adaptive import skip_spikes
from gradclip_jax._adaptive import zclip
from gradclip_jax._clipping import ClipByGlobalNormState
from gradclip_jax._clipping import ClipByNormState
from gradclip_jax._clipping import ClipByValueState
from gradclip_jax._clipping import clip_by_average_norm
from gradclip_jax._clipping import clip_by_global_norm
from gradclip_jax._clipping import clip_by_norm
from gradclip_jax._clipping import clip_by_value
from gradclip_jax.dp import AddNoiseState
from gradclip_jax.dp import PerExampleClipState
from gradclip_jax.dp import add_noise
from gradclip_jax.dp import clipped_grad
from gradclip_jax.dp import dp_aggregate
from gradclip_jax.dp import ghost_coverage
from gradclip_jax.dp import per_example_clip

__version__ = "0.2.0.dev0"  # the one source: pyproject.toml, the docs and the wheel read it

__all__ = [
    # fixed-threshold rules
    "ClipByGlobalNormState", "ClipByNormState", "ClipByValueState",
    "clip_by_average_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_value",
    # adaptive rules
    "AdaGCState", "AdaptiveGradClipState", "AutoClipState", "SkipSpikesState",
    "ZClipState", "adagc", "adaptive_grad_clip", "autoclip", "skip_spikes", "zclip",
    # differential privacy
    "AddNoiseState", "PerExampleClipState", "add_noise", "clipped_grad",
    "dp_aggregate", "ghost_coverage", "per_example_clip",
    # modules
    "config", "dp", "functional",
]
