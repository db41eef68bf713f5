"""Privacy accounting on Google's `dp-accounting`: epsilon(delta) for the rounds run so far,
and a budget that refuses a round that would pass the configured epsilon.

One round is one Gaussian mechanism on the worst-case unit's contribution (L2 <= C, noise
z*C), Poisson-subsampled with the rate at which that unit's site joins a cohort. Every
re-use of a unit counts: a unit whose clipped contribution enters one round's sum k times
(e.g. a session clipped once for its own delta and again inside replayed dreams) has
sensitivity k*C there, i.e. noise multiplier z/k; a unit re-used in later rounds is
charged in each of them, which composing every round already does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

AccountingMethod = Literal["rdp", "pld"]


class BudgetExceededError(RuntimeError):
    """The round would spend more privacy than the budget allows; it must not run."""


@dataclass(frozen=True)
class RoundCharge:
    """The privacy cost of one round. noise_multiplier: z actually carried by the sum (see
    DPConfig.effective_noise_multiplier). sampling_rate: probability the worst-case unit's
    site was in the cohort (1.0 if not sampled at random). uses: times that unit's clipped
    contribution entered this round's sum."""

    noise_multiplier: float
    sampling_rate: float = 1.0
    uses: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be > 0: "
                             "without noise there is no finite epsilon")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate={self.sampling_rate} must be in (0, 1]")
        if self.uses < 1:
            raise ValueError(f"uses={self.uses} must be >= 1")

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / self.uses)
        if self.sampling_rate < 1:
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)
        return gaussian


def _accountant(method: AccountingMethod) -> dp_accounting.PrivacyAccountant:
    if method == "rdp":
        return RdpAccountant()
    if method == "pld":
        return PLDAccountant()
    raise ValueError(f"method={method!r} must be 'rdp' or 'pld'")


def epsilon_of(charges: list[RoundCharge], delta: float,
               method: AccountingMethod = "rdp") -> float:
    """epsilon(delta) of running all `charges` (composition over rounds)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    accountant = _accountant(method)
    # Runs of identical rounds compose in one call: PLD then self-composes by FFT.
    for charge, run in itertools.groupby(charges):
        accountant.compose(charge.event(), sum(1 for _ in run))
    return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            uses: int = 1, method: AccountingMethod = "rdp") -> float:
    """epsilon(delta) after `rounds` identical rounds."""
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
    charge = RoundCharge(noise_multiplier, sampling_rate, uses)
    accountant = _accountant(method)
    accountant.compose(charge.event(), rounds)
    return float(accountant.get_epsilon(delta))


@dataclass
class Budget:
    """epsilon_limit at delta, spent round by round. `charge` refuses (BudgetExceededError)
    a round that would pass the limit and then records nothing."""

    epsilon_limit: float
    delta: float
    method: AccountingMethod = "rdp"
    charges: list[RoundCharge] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.epsilon_limit > 0:
            raise ValueError(f"epsilon_limit={self.epsilon_limit} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")
        _accountant(self.method)

    @property
    def epsilon_spent(self) -> float:
        return epsilon_of(self.charges, self.delta, self.method) if self.charges else 0.0

    def epsilon_after(self, charge: RoundCharge) -> float:
        """What epsilon would be if `charge` ran next."""
        return epsilon_of([*self.charges, charge], self.delta, self.method)

    def charge(self, charge: RoundCharge) -> float:
        """Record the round and return the new total epsilon, or refuse it."""
        after = self.epsilon_after(charge)
        if after > self.epsilon_limit:
            raise BudgetExceededError(
                f"round {len(self.charges) + 1} would raise epsilon to {after:.3f} at "
                f"delta={self.delta:g}, past the budget {self.epsilon_limit:g} (spent so far "
                f"{self.epsilon_spent:.3f} over {len(self.charges)} rounds): raise the noise "
                "multiplier, sample fewer sites, or stop training")
        self.charges.append(charge)
        return after
