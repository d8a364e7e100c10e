"""Privacy accounting: epsilon of the Poisson-subsampled Gaussian mechanism, and a callback.

``compute_epsilon`` gives the ``(epsilon, delta)`` guarantee of ``steps`` DP-SGD steps through
the ``dp-accounting`` package; ``EpsilonLogger`` logs it during ``fit``. What the number assumes
is in ``tf_jacbp.privacy``'s docstring.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from tf_jacbp._backend import keras
from tf_jacbp.privacy.arguments import check_positive, check_sampling_rate

ACCOUNTANTS = ("rdp", "pld")
"""``compute_epsilon``'s accountants: Renyi DP, or privacy loss distributions."""

RDP_CONVERSIONS = ("improved", "classic")
"""``compute_epsilon``'s conversions from RDP to ``(epsilon, delta)``."""


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
) -> float:
    """epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    Each step samples each record with probability ``q = sampling_rate`` and adds Gaussian noise
    of standard deviation ``noise_multiplier`` times the sensitivity (``l2_norm_clip``); the
    guarantee is ``(epsilon, delta)``-DP under add/remove-one adjacency. Uses the
    ``dp-accounting`` package (``pip install 'tf_jacbp[privacy]'``).

    Args:
        accountant: ``"rdp"`` (Renyi DP over dp-accounting's default orders) or ``"pld"``
            (privacy loss distributions: tighter, slower).
        rdp_conversion: from RDP to ``(epsilon, delta)``: ``"improved"`` (dp-accounting's,
            Balle et al. 2020 Prop. 12: smaller epsilon, still valid) or ``"classic"``
            (``min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)``, Mironov 2017 Prop. 3: the
            conversion TensorFlow Privacy's tutorials print; MNIST's ``q = 256/60000``,
            ``sigma = 1.12``, 60 epochs, ``delta = 1e-5``: 2.92 classic, 2.52 improved).

    Returns:
        epsilon (``inf`` when ``noise_multiplier`` is 0, 0 for no steps).
    """
    sigma = check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    q = check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    _check_accountant(accountant, rdp_conversion)
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    dp_accounting = _dp_accounting()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    with _quiet_absl():
        return _epsilon(dp_accounting, event, steps, delta, accountant, rdp_conversion)


def _epsilon(dp_accounting, event, steps, delta, accountant, rdp_conversion) -> float:
    accountant_ = _make_accountant(dp_accounting, accountant, rdp_conversion)
    accountant_.compose(event, steps)
    return float(accountant_.get_epsilon(delta))


def _dp_accounting() -> Any:
    """The ``dp_accounting`` module, or an ImportError that says how to install it."""
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError(
            "tf_jacbp.privacy's accounting needs the dp-accounting package: pip install "
            "'tf_jacbp[privacy]' (or pip install dp-accounting)."
        ) from error
    return dp_accounting


def _make_accountant(dp_accounting: Any, accountant: str, rdp_conversion: str) -> Any:
    """A fresh dp-accounting accountant whose ``get_epsilon`` uses the chosen conversion."""
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    if rdp_conversion == "improved":
        return dp_accounting.rdp.RdpAccountant()

    class ClassicRdpAccountant(dp_accounting.rdp.RdpAccountant):
        """RDP with the classic conversion ``min_alpha rdp(alpha) + log(1/delta)/(alpha-1)``
        (Mironov 2017, Prop. 3), which needs the RDP curve itself: orders and rdp."""

        def get_epsilon(self, target_delta: float) -> float:
            orders = np.asarray(self.orders, dtype=float)
            curve = np.asarray(self.rdp, dtype=float)
            return float(np.min(curve + math.log(1 / target_delta) / (orders - 1)))

    return ClassicRdpAccountant()


def _check_delta(delta: Any) -> float:
    delta = check_positive("delta", delta)
    if delta >= 1:
        raise ValueError(f"delta must be in (0, 1), got delta={delta}.")
    return delta


def _check_accountant(accountant: str, rdp_conversion: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if rdp_conversion not in RDP_CONVERSIONS:
        raise ValueError(
            f"rdp_conversion must be one of {RDP_CONVERSIONS}, got {rdp_conversion!r}."
        )


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got steps={steps!r}.")
    return int(steps)


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
) -> float:
    """The smallest ``sigma`` (to dp-accounting's bisection tolerance) for which ``steps`` steps of
    the Poisson-subsampled Gaussian mechanism at ``q = sampling_rate`` are
    ``(target_epsilon, delta)``-DP: ``compute_epsilon(sigma, q, steps, delta, ...) <=
    target_epsilon`` always holds for the returned ``sigma``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (bisection on ``sigma``; the bracket's upper
    end, on the side that meets the target, is returned). Example: ``target_epsilon=3``,
    ``delta=1e-5``, ``q = 2048/60000``, 1200 steps: 1.948 with the improved RDP conversion
    (dp-accounting's default), 2.183 with the classic one (TensorFlow Privacy's).

    Args:
        target_epsilon: ``> 0``.
        delta: in ``(0, 1)``.
        sampling_rate: ``q`` in ``(0, 1]``.
        steps: ``> 0`` training steps.
        accountant, rdp_conversion: as for ``compute_epsilon``.
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    q = check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    if steps == 0:
        raise ValueError("steps must be positive: no steps spend no privacy, for any sigma.")
    _check_accountant(accountant, rdp_conversion)
    dp_accounting = _dp_accounting()

    def event(sigma: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )

    with _quiet_absl():
        sigma = float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _make_accountant(dp_accounting, accountant, rdp_conversion),
                event,
                target,
                delta,
                tol=1e-6,
            )
        )
        # The bisection keeps the end that meets the target; never return one that does not.
        while compute_epsilon(sigma, q, steps, delta, accountant, rdp_conversion) > target:
            sigma *= 1 + 1e-6
    return sigma


class _quiet_absl:
    """dp-accounting warns (absl) for each low RDP order whose series does not converge at large
    q and excludes that order, which only loosens the bound; keep those warnings out of fit."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(max(self.level, logging.ERROR))

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def epsilon_of_ledger(
    ledger: list[tuple[float | None, float, int]],
    delta: float,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
) -> float:
    """epsilon of a whole training: the composition, over the ledger's rows ``(q, sigma,
    steps)``, of ``steps`` Poisson-subsampled Gaussian mechanisms at rate ``q`` and noise
    ``sigma`` (``DPModel.privacy_ledger``; one row gives ``compute_epsilon``'s number).

    A row with steps at an unknown rate (``q`` None) raises: give the rate to ``make_private``
    (``sampling_rate=``) or to ``EpsilonLogger``.
    """
    delta = _check_delta(delta)
    _check_accountant(accountant, rdp_conversion)
    rows = [(q, float(s), _check_steps(n)) for q, s, n in ledger if n > 0]
    if any(q is None for q, _, _ in rows):
        raise ValueError(
            "The privacy ledger has steps at an unknown sampling rate: pass sampling_rate to "
            "make_private (or DPModel), or use an EpsilonLogger(sampling_rate, delta) from the "
            "first fit on."
        )
    if not rows:
        return 0.0
    if len(rows) == 1:
        q, sigma, steps = rows[0]
        return compute_epsilon(sigma, q, steps, delta, accountant, rdp_conversion)
    if any(sigma == 0 for _, sigma, _ in rows):
        return math.inf
    dp_accounting = _dp_accounting()
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                check_sampling_rate(q), dp_accounting.GaussianDpEvent(sigma)
            ),
            steps,
        )
        for q, sigma, steps in rows
    ]
    accountant_ = _make_accountant(dp_accounting, accountant, rdp_conversion)
    with _quiet_absl():
        accountant_.compose(dp_accounting.ComposedDpEvent(events))
        return float(accountant_.get_epsilon(delta))


class EpsilonLogger(keras.callbacks.Callback):
    """Adds ``epsilon`` (spent by the whole training so far) to the logs at each epoch's end.

    Args:
        sampling_rate: ``q``, the probability that a step includes a sample: the rate given to
            ``poisson_batches``, or ``B / N`` for shuffled batches of ``B`` out of ``N`` (see the
            module docstring for what the number then means). None: the ``DPModel``'s own
            ``sampling_rate``.
        delta: the ``delta`` of ``(epsilon, delta)``, e.g. ``1e-5`` or below ``1 / N``.
        noise_multiplier: only for a model that is not a ``DPModel`` (steps then counted while
            this callback is attached); a ``DPModel``'s own sigma and ledger are used.
        accountant, rdp_conversion: as for ``compute_epsilon``.

    On a ``DPModel`` the steps and sigma come from its privacy ledger, which is saved and
    restored with the model (``save``, ``save_weights``, ``BackupAndRestore``): after
    ``load_model`` epsilon is for the whole training, not the resumed part alone. The logger
    gives the model its sampling rate (a new rate starts a new ledger segment). ``epsilon``
    reaches ``History`` and the progress bar; list this callback before a TensorBoard callback
    for it to log the value too. ``history`` keeps ``(epoch, steps, epsilon)``.
    """

    def __init__(
        self,
        sampling_rate: float | None,
        delta: float,
        noise_multiplier: float | None = None,
        accountant: str = "rdp",
        rdp_conversion: str = "improved",
    ):
        super().__init__()
        self.sampling_rate = None if sampling_rate is None else check_sampling_rate(sampling_rate)
        self.delta = _check_delta(delta)
        self.noise_multiplier = noise_multiplier
        if accountant not in ACCOUNTANTS or rdp_conversion not in RDP_CONVERSIONS:
            raise ValueError(
                f"EpsilonLogger: accountant must be one of {ACCOUNTANTS} and rdp_conversion one "
                f"of {RDP_CONVERSIONS}, got {accountant!r} and {rdp_conversion!r}."
            )
        self.accountant = accountant
        self.rdp_conversion = rdp_conversion
        self.steps = 0
        self.history: list[tuple[int, int, float]] = []

    def _ledgered(self) -> bool:
        return hasattr(self.model, "privacy_ledger")

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._ledgered():
            if self.noise_multiplier is not None and (
                self.noise_multiplier != self.model.noise_multiplier
            ):
                raise ValueError(
                    f"EpsilonLogger: noise_multiplier={self.noise_multiplier} differs from the "
                    f"DPModel's {self.model.noise_multiplier}; leave it out (the model's ledger "
                    "knows the sigma of every step)."
                )
            if self.sampling_rate is not None:
                self.model.sampling_rate = self.sampling_rate
            return
        if self.sampling_rate is None:
            raise ValueError(
                "EpsilonLogger: sampling_rate=None needs a DPModel (which knows its rate); pass "
                "the sampling rate q = B / N."
            )
        self._fit_start = int(self.model.optimizer.iterations)
        self._steps_before = self.steps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._ledgered():
            self.steps = self.model.privacy_steps
            epsilon = self.model.privacy_spent(self.delta, self.accountant, self.rdp_conversion)
        else:
            # The optimizer's own count of updates: batch callbacks come once per several steps
            # under steps_per_execution, and their indices may run past the last step.
            done = int(self.model.optimizer.iterations) - self._fit_start
            self.steps = self._steps_before + done
            if self.noise_multiplier is None:
                raise ValueError(
                    "EpsilonLogger: the model is not a DPModel; pass noise_multiplier=... (and "
                    "train with DP-SGD: a model trained without it has no privacy guarantee)."
                )
            epsilon = compute_epsilon(
                self.noise_multiplier,
                self.sampling_rate,
                self.steps,
                self.delta,
                self.accountant,
                self.rdp_conversion,
            )
        self.history.append((epoch, self.steps, epsilon))
        if logs is not None:
            logs["epsilon"] = epsilon
