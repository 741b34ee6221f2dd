"""Ghost-norm rules, one module per family, registered by primitive name.

:mod:`._base` defines the protocol (``Rule``, ``Unit``, the forms and their costs)
and the registry; each module registers its rule with ``@register(primitive, ...)``
(the fallback with ``@register_fallback``, cross terms between families with
``@register_cross``). Importing this package registers them all. See
:mod:`gradclip_jax.dp` for the formulas and the DP guide for adding a rule.
"""

from gradclip_jax.dp._rules import conv  # noqa: F401  (registers its rule)
from gradclip_jax.dp._rules import dot_general  # noqa: F401
from gradclip_jax.dp._rules import elementwise  # noqa: F401
from gradclip_jax.dp._rules import fallback  # noqa: F401
from gradclip_jax.dp._rules import gather  # noqa: F401
from gradclip_jax.dp._rules import tied  # noqa: F401
from gradclip_jax.dp._rules._common import Canon
from gradclip_jax.dp._rules._base import NORM
from gradclip_jax.dp._rules._base import PER_EXAMPLE
from gradclip_jax.dp._rules._base import REGISTRY
from gradclip_jax.dp._rules._base import Cost
from gradclip_jax.dp._rules._base import Rule
from gradclip_jax.dp._rules._base import Unit
from gradclip_jax.dp._rules._base import register
from gradclip_jax.dp._rules._base import register_cross
from gradclip_jax.dp._rules._base import register_fallback

__all__ = ["REGISTRY", "Canon", "NORM", "PER_EXAMPLE", "Cost", "Rule", "Unit", "register",
           "register_cross", "register_fallback"]
