"""DP-SGD settings of the trainers (``--dp``): flags, the noise multiplier, accounting glue.

* :func:`add_dp_arguments` / :func:`dp_flags_from_args` -- the flags and their checks.
* :class:`DPFlags` (as given) and :class:`DPSettings` (resolved for a run: the noise
  multiplier derived from ``--target-epsilon``, the epsilon spent after ``n`` steps).
* :func:`dp_transform` (noise and ``1/B``), :func:`dp_clipped_grad` (clipped per-example
  gradients, ``gradclip_jax.clipped_grad``) and :func:`dp_example_stats`.
* :func:`check_dp_resume` -- refuses resuming with other DP settings.

The batches are Poisson-sampled (:class:`gradclip_jax.training.sampling.PoissonSampler`):
the mechanism that :func:`gradclip_jax.dp.accounting.poisson_gaussian_event` describes
and the RDP accountant accounts, with no approximation.

DP-SGD: Abadi et al. (2016), "Deep Learning with Differential Privacy", CCS; the RDP
accountant: Mironov (2017), "Renyi Differential Privacy", CSF; Mironov, Talwar & Zhang
(2019), "Renyi Differential Privacy of the Sampled Gaussian Mechanism".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax
from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.metrics import Record

__all__ = ["DP_METHODS", "DEFAULT_DELTA", "add_dp_arguments", "dp_flags_from_args",
           "DPFlags", "DPSettings", "DPRecord", "dp_noise_seed", "dp_transform",
           "dp_clipped_grad", "dp_example_stats", "check_dp_resume"]

#: ``--dp-method``: how ``gradclip_jax.clipped_grad`` gets the per-example norms.
DP_METHODS = ("auto", "ghost", "vmap")
#: ``--delta`` when not given.
DEFAULT_DELTA = 1e-5
_DP_FLAGS = {"noise_multiplier": "--noise-multiplier", "target_epsilon": "--target-epsilon",
             "delta": "--delta", "dp_max_norm": "--dp-max-norm", "dp_method": "--dp-method"}


@contextlib.contextmanager
def _quiet_absl():
  """dp-accounting logs a warning per RDP order it drops (large sampling rates): hide them."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def add_dp_arguments(parser: argparse.ArgumentParser, *, unit: str,
                     default_method: str = "auto") -> None:
  """Adds the DP-SGD flags (``--dp --noise-multiplier --target-epsilon --delta ...``).

  ``unit`` names the privacy unit in the help text (e.g. "one review").
  """
  g = parser.add_argument_group(
      "differential privacy (DP-SGD)",
      f"Privacy unit: {unit}. Each example's gradient is clipped to L2 norm "
      "--dp-max-norm (this replaces --clip), Gaussian noise of stddev "
      "noise_multiplier * dp_max_norm is added to the sum, and the sum is divided by "
      "the expected batch size. Batches are Poisson-sampled: every step, each example "
      "joins the batch independently with probability q = batch_size / training "
      "examples (an epoch is training examples // batch_size steps), padded to a fixed "
      "capacity with masked rows; epsilon is accounted for exactly that (RDP "
      "accountant, Poisson-subsampled Gaussian, add/remove-one neighbours).")
  g.add_argument("--dp", action="store_true", help="train with DP-SGD")
  g.add_argument("--noise-multiplier", type=float, default=None, metavar="SIGMA",
                 help="noise stddev / dp_max_norm; derived from --target-epsilon when "
                 "omitted")
  g.add_argument("--target-epsilon", type=float, default=None, metavar="EPS",
                 help="epsilon to spend over the planned run (epochs x steps per epoch, "
                 "--max-steps ignored); sets the noise multiplier, or checks a given one")
  g.add_argument("--delta", type=float, default=None,
                 help=f"delta of the (epsilon, delta) guarantee (default {DEFAULT_DELTA})")
  g.add_argument("--dp-max-norm", type=float, default=None, metavar="C",
                 help="per-example clipping norm (default: the config's max_grad_norm)")
  g.add_argument("--dp-method", choices=DP_METHODS, default=None,
                 help=f"per-example norms: ghost norms, vmap reference, or auto "
                 f"(default {default_method})")
  parser.set_defaults(_dp_default_method=default_method)


@dataclasses.dataclass(frozen=True)
class DPFlags:
  """The DP-SGD flags as given (``None``: not given); see :func:`dp_flags_from_args`."""

  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  delta: float = DEFAULT_DELTA
  max_norm: float | None = None
  method: str = "auto"

  def __post_init__(self):
    if self.noise_multiplier is None and self.target_epsilon is None:
      raise UsageError("--dp needs --noise-multiplier SIGMA or --target-epsilon EPS (or "
                      "both: then SIGMA must spend at most EPS)")
    if self.noise_multiplier is not None and not (
        self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
      raise UsageError(f"--noise-multiplier must be positive and finite, got "
                      f"{self.noise_multiplier}")
    if self.target_epsilon is not None and not (
        self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
      raise UsageError(f"--target-epsilon must be positive and finite, got "
                      f"{self.target_epsilon}")
    if not 0.0 < self.delta < 1.0:
      raise UsageError(f"--delta must be in (0, 1), got {self.delta}")
    if self.max_norm is not None and not (self.max_norm > 0 and math.isfinite(self.max_norm)):
      raise UsageError(f"--dp-max-norm must be positive and finite, got {self.max_norm}")
    if self.method not in DP_METHODS:
      raise UsageError(f"--dp-method must be one of {DP_METHODS}, got {self.method!r}")

  def resolve(self, *, batch_size: int, dataset_size: int, planned_steps: int,
              default_max_norm: float) -> DPSettings:
    """The settings of a run: the noise multiplier derived or checked against the target.

    ``batch_size`` is the (expected) batch size ``B``, ``dataset_size`` the number ``N``
    of privacy units in the training set (sampling rate ``q = B / N``), and
    ``planned_steps`` the steps of the whole planned run (epochs x steps per epoch).
    """
    from gradclip_jax.dp import accounting  # pylint: disable=import-outside-toplevel

    if not 0 < batch_size <= dataset_size:
      raise UsageError(f"--dp: batch size {batch_size} must be in [1, {dataset_size}] "
                      "(the number of training examples)")
    max_norm = float(default_max_norm if self.max_norm is None else self.max_norm)
    if not (max_norm > 0 and math.isfinite(max_norm)):
      raise UsageError(f"--dp needs a positive finite --dp-max-norm, got {max_norm}")
    q = batch_size / dataset_size
    sigma = self.noise_multiplier
    if self.target_epsilon is not None:
      with _quiet_absl():
        needed = accounting.noise_multiplier_for_epsilon(self.target_epsilon, self.delta, q,
                                                         planned_steps)
        eps = None if sigma is None else accounting.epsilon_spent(sigma, q, planned_steps,
                                                                  self.delta)
      if sigma is None:
        sigma = needed
      else:
        if eps > self.target_epsilon * (1 + 1e-9):
          raise UsageError(
              f"--noise-multiplier {sigma} and --target-epsilon {self.target_epsilon} "
              f"contradict each other: over the planned {planned_steps} steps (sampling "
              f"rate {q:.4g}, delta {self.delta:g}) it spends epsilon {eps:.3f}; "
              f"--target-epsilon {self.target_epsilon} needs a noise multiplier of at "
              f"least {needed:.4f}. Give only one of the two flags")
    if self.delta >= 1.0 / dataset_size:
      warnings.warn(f"--delta {self.delta:g} is not below 1/N = {1 / dataset_size:.3g} "
                    f"({dataset_size} training examples): a weak guarantee", stacklevel=2)
    return DPSettings(noise_multiplier=float(sigma), max_norm=max_norm, delta=self.delta,
                      batch_size=int(batch_size), dataset_size=int(dataset_size),
                      planned_steps=int(planned_steps), method=self.method,
                      target_epsilon=self.target_epsilon)


@dataclasses.dataclass(frozen=True)
class DPSettings:
  """The DP-SGD settings of one run (see :meth:`DPFlags.resolve`)."""

  noise_multiplier: float
  max_norm: float
  delta: float
  batch_size: int
  dataset_size: int
  planned_steps: int
  method: str = "auto"
  target_epsilon: float | None = None

  @property
  def sample_rate(self) -> float:
    return self.batch_size / self.dataset_size

  def event(self, steps: int):
    """The ``dp_accounting`` event of ``steps`` steps of this run: ``steps`` Poisson-sampled
    Gaussian steps at rate ``B / N`` (:func:`~gradclip_jax.dp.accounting.poisson_gaussian_event`)."""
    from gradclip_jax.dp import accounting  # pylint: disable=import-outside-toplevel

    return accounting.poisson_gaussian_event(self.noise_multiplier, self.sample_rate,
                                             int(steps))

  def epsilon(self, steps: int) -> float:
    """Epsilon spent after ``steps`` steps (RDP accountant, Poisson sampling)."""
    from gradclip_jax.dp import accounting  # pylint: disable=import-outside-toplevel

    with _quiet_absl():
      return accounting.epsilon_spent(self.noise_multiplier, self.sample_rate, int(steps),
                                      self.delta)

  def record(self, steps: int, sampling: Mapping[str, Any]) -> DPRecord:
    """The DP fields of a metrics.jsonl line after ``steps`` steps; ``sampling``: the
    sampler's fields of the epoch (``PoissonSampler.record``)."""
    return DPRecord(epsilon=self.epsilon(steps), noise_multiplier=self.noise_multiplier,
                    dp_max_norm=self.max_norm, delta=self.delta, **sampling)

  def accountant(self, steps: int) -> dict[str, Any]:
    """What results.json records about the accounting of ``steps`` steps."""
    import dp_accounting  # pylint: disable=import-outside-toplevel
    from importlib import metadata  # pylint: disable=import-outside-toplevel

    return {"accountant": "dp_accounting.rdp.RdpAccountant",
            "dp_accounting_version": metadata.version("dp-accounting"),
            "neighboring_relation": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE.name,
            "event": _event_json(self.event(steps)), "delta": self.delta,
            "epsilon": self.epsilon(steps)}

  def results(self, steps: int, sampler) -> dict[str, Any]:
    """The ``dp`` entry of results.json after ``steps`` steps: these settings, the
    epsilon spent, the sampler (``PoissonSampler.describe``) and the accountant."""
    return {**dataclasses.asdict(self), "epsilon": self.epsilon(steps),
            "dp_sampling": sampler.kind, "sampler": sampler.describe(),
            "accountant": self.accountant(steps)}

  def as_meta(self) -> dict[str, Any]:
    """What a checkpoint stores to refuse resuming with other DP settings."""
    return {"noise_multiplier": self.noise_multiplier, "max_norm": self.max_norm,
            "delta": self.delta, "batch_size": self.batch_size,
            "dataset_size": self.dataset_size}

  def describe(self) -> str:
    return (f"DP-SGD: noise multiplier {self.noise_multiplier:.4f}, per-example clip "
            f"{self.max_norm:g}, Poisson sampling at rate {self.batch_size}/"
            f"{self.dataset_size} = {self.sample_rate:.4g}, delta {self.delta:g}, "
            f"{self.method} norms; epsilon {self.epsilon(self.planned_steps):.3f} after the "
            f"planned {self.planned_steps} steps")


@dataclasses.dataclass(frozen=True)
class DPRecord(Record):
  """The DP-SGD fields of an epoch's metrics record: the epsilon spent so far (at
  ``delta``) and the epoch's realized Poisson batch sizes."""

  epsilon: float
  noise_multiplier: float
  dp_max_norm: float
  delta: float
  dp_sampling: str
  batch_size_min: int | None
  batch_size_max: int | None
  batch_size_mean: float | None


def _event_json(event) -> dict[str, Any]:
  """A ``dp_accounting`` event as nested JSON (its ``to_named_tuple`` form)."""
  def convert(x):
    if hasattr(x, "_asdict"):
      return {k: convert(v) for k, v in x._asdict().items() if k != "module_name"}
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    return x
  return convert(event.to_named_tuple())


def dp_flags_from_args(args: argparse.Namespace, *,
                       default_clip: str = "global_norm") -> DPFlags | None:
  """Checks the DP flags of ``args``; ``None`` without ``--dp``.

  With ``--dp`` the per-example clip (``--dp-max-norm``) replaces the batch-level rule:
  ``--clip`` may only be left out or be ``none``, and ``--clip-value`` must be left out.
  The DP flags without ``--dp`` are an error too.
  """
  given = [flag for attr, flag in _DP_FLAGS.items() if getattr(args, attr, None) is not None]
  if not getattr(args, "dp", False):
    if given:
      raise UsageError(f"{', '.join(given)} only apply with --dp")
    return None
  explicit = getattr(args, "_explicit", set())
  if "clip" in explicit and args.clip != "none":
    raise UsageError(f"--dp clips every example's gradient to --dp-max-norm (the DP-SGD "
                    f"sensitivity bound) in place of --clip; drop --clip {args.clip}")
  if getattr(args, "clip_value", None) is not None:
    raise UsageError("--clip-value does not apply with --dp; set the per-example clipping "
                    "norm with --dp-max-norm")
  return DPFlags(noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
                 delta=DEFAULT_DELTA if args.delta is None else args.delta,
                 max_norm=args.dp_max_norm,
                 method=args.dp_method or getattr(args, "_dp_default_method", "auto"))


def dp_noise_seed(seed: int) -> int:
  """The seed of the DP noise of a run with ``--seed seed`` (distinct from its other keys)."""
  return int(np.random.SeedSequence([int(seed), 0x44505347]).generate_state(1)[0]) >> 1


def dp_transform(dp: DPSettings, seed: int) -> optax.GradientTransformation:
  """Noise then ``1/B``: ``chain(add_noise(sigma, C, seed), scale(1 / B))``.

  Takes the *sum* of clipped per-example gradients (:func:`dp_clipped_grad`); put it in
  front of the optimizer, where the clipping rule goes otherwise. The noise key lives in
  the optimizer state (split every step from :func:`dp_noise_seed`), so a checkpointed
  run resumes with the noise of an uninterrupted one.
  """
  return optax.chain(
      gradclip_jax.add_noise(dp.noise_multiplier, dp.max_norm, seed=dp_noise_seed(seed)),
      optax.scale(1.0 / dp.batch_size))


def dp_clipped_grad(per_example_loss: Callable[..., Any], dp: DPSettings) -> Callable:
  """``clipped_grad(per_example_loss, max_norm=C, method, has_aux=True, return_norms=True)``.

  ``per_example_loss(params, *batch)`` returns ``(losses [B], aux)``. The result takes
  ``(params, *batch, mask=m)`` (``m`` bool ``[B]``, False for a row that only pads the
  batch: it contributes exactly zero and its norm is 0) and returns
  ``(clipped sum, norms [B], aux)``.
  """
  return gradclip_jax.clipped_grad(per_example_loss, max_norm=dp.max_norm, method=dp.method,
                                   has_aux=True, return_norms=True)


def dp_example_stats(norms: jax.Array, weights: jax.Array, max_norm: float
                     ) -> dict[str, jax.Array]:
  """Sum and max of the per-example norms and the number clipped, real examples only.

  ``weights`` is 0 for an example that only fills a batch; such an example (and one whose
  norm is not finite, which ``clipped_grad`` drops) is left out. Use inside ``jit``.
  """
  real = (weights > 0) & jnp.isfinite(norms)
  n = jnp.where(real, norms, 0.0)
  return {"norm_sum": jnp.sum(n), "norm_max": jnp.max(n, initial=0.0),
          "num_clipped": jnp.sum(real & (norms > max_norm)).astype(jnp.float32)}


def check_dp_resume(saved: Mapping | None, dp: DPSettings | None) -> None:
  """Refuses to resume a checkpoint written with other DP settings (or without DP)."""
  now = None if dp is None else dp.as_meta()
  saved = None if saved is None else dict(saved)
  if saved != now:
    raise UsageError(f"--resume: the checkpoint was written with DP settings {saved}, this "
                    f"run has {now}; resume with the same --dp flags and config")
