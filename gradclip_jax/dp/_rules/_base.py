"""The rule protocol: what a ghost-norm rule is, and the registry rules join.

A *rule* covers the uses of parameters by one family of primitives (``dot_general``,
``gather``, ...). The engine (:mod:`gradclip_jax.dp._clipped_grad`) never names a
family: it asks the registry for the rule of each use's primitive and talks to it
through the methods below.

Per use (one equation that reads a parameter value ``W'`` and data):

* ``match(use) -> data | None``: whether the rule applies, and its static data (a
  ``NamedTuple`` with a ``needs`` field: the operand positions the probe pass must
  record).
* ``merge_key(use)``: uses of the same ``W'`` with equal keys are one *group*: their
  positions are concatenated (a layer called several times, or in several branches).
* ``canon(use, recs, gs, views, b)``: the use's arrays in the rule's layout, every
  array with the example axis first (so the engine can cut them into chunks of
  examples); ``concat(canons)`` joins the canons of one group.

Per *unit* (``units(groups)`` turns the rule's groups into units; by default one
unit per group, ``dot_general`` fuses groups on shared operands into one unit):

* ``forms(b) -> {form: Cost}``: the exact forms the unit can take, with their extra
  FLOPs and bytes per example over a plain step. ``NORM``: the per-example squared
  norm from the records (``sq``) and, once the clip weights are known, the clipped
  sum from the records (``weighted``). ``PER_EXAMPLE``: the per-example gradient
  itself (``per_example``), formed for a chunk of examples, its squared norm taken
  and then *reused* for the clipped sum ``sum_b w_b G_b`` (``split`` maps that sum
  to the ``W'`` layouts). Every unit can take ``PER_EXAMPLE`` (the engine also uses
  it for parameters whose per-example gradients must be formed, e.g. a parameter
  read by uses of different forms).
* ``describe(form)``: the text ``ghost_coverage`` shows.

Cross terms: ``register_cross(family_a, family_b)`` registers a function that, for
two units reading one parameter (e.g. a tied embedding read by ``gather`` and by
``dot_general``), returns ``None`` or a callable ``(canon_a, canon_b) -> [B]`` giving
``<G_a, G_b>`` per example, so that ``|G_a + G_b|^2`` is exact without forming it.

A rule joins with ``@register("primitive", ...)`` on its class; the rule for uses
no rule matches is registered with ``@register_fallback``. See the DP guide's
"Adding a rule" section for a worked example.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

NORM = "norm"
PER_EXAMPLE = "per-example"


class Cost(NamedTuple):
  """Extra work of one form per example: FLOPs, and bytes held at once."""
  flops: int
  bytes: int


class Rule:
  """Base class of the rules (see the module docstring for the protocol)."""

  family = ""
  #: The names of the forms, as ``ghost_coverage`` shows them (``{}``: the family
  #: name alone).
  form_names: dict = {}

  def match(self, use) -> Any:
    raise NotImplementedError

  def merge_key(self, use) -> Any:
    return None

  def name(self, use) -> str:
    return self.family

  def canon(self, use, recs, gs, views, b) -> Any:
    raise NotImplementedError

  def concat(self, canons) -> Any:
    if len(canons) != 1:
      raise NotImplementedError
    return canons[0]

  def units(self, groups) -> list:
    return [self.unit(g) for g in groups]

  def unit(self, group) -> "Unit":
    raise NotImplementedError

  def probe_bytes(self, use, b) -> int:
    """Bytes per example that the use's records add to a plain step (0: residuals)."""
    return 0


class Unit:
  """One or more groups of one rule, evaluated together (see the module docstring).

  ``groups[i].uses`` are the uses, ``key(i)`` the ``(uid, j)`` of the ``W'_j`` that
  group ``i``'s first use reads (the engine maps gradients of ``W'`` to the
  parameters with the VJP of the parameter-only program).
  """

  def __init__(self, rule: Rule, groups: list):
    self.rule = rule
    self.groups = groups
    self.form = PER_EXAMPLE

  # -- static
  def forms(self, b: int) -> dict:
    raise NotImplementedError

  def describe(self, form: str) -> str:
    name = self.rule.name(self.groups[0].uses[0])
    label = self.rule.form_names.get(form)
    return f"{name}: {label}" if label else name

  def suffix(self) -> str:
    """Appended to ``ghost_coverage``'s text (e.g. the fused-operands note)."""
    return ""

  # -- arrays (example axis first)
  def canon(self, canons: list) -> Any:
    """The unit's canon from its groups' canons (one group: that canon)."""
    if len(canons) != 1:
      raise NotImplementedError
    return canons[0]

  def sq(self, c) -> Any:
    """``[B]`` float32 squared norm of each example's gradient (``NORM``)."""
    raise NotImplementedError

  def weighted(self, c, w, fin) -> dict:
    """``{(uid, j): sum_b w_b dW'_b}`` in each ``W'`` layout, float32 (``NORM``)."""
    raise NotImplementedError

  def per_example(self, c) -> Any:
    """A pytree of ``[B, ...]`` float32: example ``b``'s gradient (``PER_EXAMPLE``)."""
    raise NotImplementedError

  def split(self, raw) -> dict:
    """``{(uid, j): W'-layout array}`` from one example's (or a sum's) ``per_example``."""
    raise NotImplementedError


class Registry:
  """Rules by primitive name, the fallback, and the cross terms between families."""

  def __init__(self):
    self.by_primitive: dict = {}
    self.fallback: Optional[Rule] = None
    self.crosses: dict = {}

  def match(self, use):
    """(rule, data) for a use: its primitive's rule if it matches, else the fallback."""
    rule = self.by_primitive.get(use.prim)
    data = rule.match(use) if rule is not None else None
    if data is None:
      rule = self.fallback
      data = rule.match(use)
    return rule, data

  def cross(self, unit_a: Unit, unit_b: Unit) -> Optional[Callable]:
    """``(canon_a, canon_b) -> [B]`` cross term of two units, or None."""
    fa, fb = unit_a.rule.family, unit_b.rule.family
    if (fa, fb) in self.crosses:
      return self.crosses[(fa, fb)](unit_a, unit_b)
    if (fb, fa) in self.crosses:
      fn = self.crosses[(fb, fa)](unit_b, unit_a)
      return None if fn is None else (lambda ca, cb: fn(cb, ca))
    return None

  @property
  def families(self) -> tuple:
    exact = {r.family for r in self.by_primitive.values()}
    return tuple(sorted(exact))


REGISTRY = Registry()


def register(*primitives: str, registry: Registry = REGISTRY):
  """Class decorator: an instance of the rule handles uses by these primitives."""

  def deco(cls):
    inst = cls()
    for p in primitives:
      registry.by_primitive[p] = inst
    return cls

  return deco


def register_fallback(cls, registry: Registry = REGISTRY):
  """Class decorator: the rule of every use that no registered rule matches."""
  registry.fallback = cls()
  return cls


def register_cross(family_a: str, family_b: str, registry: Registry = REGISTRY):
  """Function decorator: ``fn(unit_a, unit_b) -> None | (ca, cb) -> [B]``."""

  def deco(fn):
    registry.crosses[(family_a, family_b)] = fn
    return fn

  return deco
