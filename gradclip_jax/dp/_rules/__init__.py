"""Ghost-norm rules, one module per family, registered by primitive name.

``RULES[primitive_name]`` is the rule tried first for a use of parameters by that
primitive; ``RULES["fallback"]`` takes every use no rule matches. See
:mod:`gradclip_jax.dp` for the rules' formulas and citations.
"""

from gradclip_jax.dp._rules.dot_general import DotGeneral
from gradclip_jax.dp._rules.elementwise import Elementwise
from gradclip_jax.dp._rules.fallback import Conv
from gradclip_jax.dp._rules.fallback import Fallback
from gradclip_jax.dp._rules.gather import Gather

_ELEMENTWISE = Elementwise()

RULES = {
    "dot_general": DotGeneral(),
    "gather": Gather(),
    "add": _ELEMENTWISE,
    "sub": _ELEMENTWISE,
    "mul": _ELEMENTWISE,
    "conv_general_dilated": Conv(),
    "fallback": Fallback(),
}

#: The exact rule families, as ``ghost_coverage`` names them.
EXACT_FAMILIES = ("dot_general", "gather", "elementwise", "conv_general_dilated")

__all__ = ["RULES", "EXACT_FAMILIES"]
