"""Privacy accounting on Google's `dp-accounting`: epsilon(delta) for the rounds run so far,
and a budget that refuses a round that would pass the configured epsilon.

One round is one Gaussian mechanism on the worst-case unit's contribution (L2 <= C, noise
z*C), Poisson-subsampled with the rate at which that unit's site joins a cohort. Every
re-use of a unit counts: a unit whose clipped contribution enters one round's sum k times
(e.g. a session clipped once for its own delta and again inside replayed dreams) has
sensitivity k*C there, i.e. noise multiplier z/k; a unit re-used in later rounds is
charged in each of them, which composing every round already does.

Without a participation cap the budget composes every round the fleet ever ran, so epsilon
grows without bound. With a cap (`ParticipationCap`, fleetmind.aggregation.participation:
each unit enters at most K rounds over the fleet's life, enforced at the sites) a unit's
loss is the composition of at most K rounds' mechanisms, whatever the number of rounds:
`epsilon_per_unit` composes the K most expensive rounds run, and the budget admits a round
only if units could enter K rounds like it and stay within the limit (docs/privacy-budget.md).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fleetmind.aggregation.dp import DPConfig
from fleetmind.aggregation.participation import ParticipationCap

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
        if isinstance(self.noise_multiplier, bool) or not isinstance(
                self.noise_multiplier, numbers.Real) or not (
                math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} must be a finite "
                             "number > 0: without noise there is no finite epsilon; "
                             "configure privacy.noise_multiplier > 0")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate={self.sampling_rate} must be in (0, 1]: the "
                             "probability the unit's site is in the cohort (1.0 if not "
                             "sampled at random)")
        if isinstance(self.uses, bool) or not isinstance(self.uses, numbers.Integral) \
                or self.uses < 1:
            raise ValueError(f"uses={self.uses!r} must be a whole number >= 1: how often one "
                             "unit's clipped contribution enters the round's sum")

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / self.uses)
        if self.sampling_rate < 1:
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)
        return gaussian

    @property
    def participation_noise(self) -> float:
        """The noise multiplier one participation of the worst-case unit faces: z / uses."""
        return self.noise_multiplier / self.uses

    def participation_event(self) -> dp_accounting.DpEvent:
        """The mechanism a unit that *entered* this round went through: the Gaussian with
        z / uses, without amplification by sampling. A participation cap counts rounds a
        unit entered, not rounds it was offered to a random cohort, so the rounds it enters
        are not a random subset of a fixed horizon and sampling amplifies nothing. This is
        exactly how the coordinator charges every round today (sampling_rate 1.0); a charge
        with sampling_rate < 1 is charged as if unsampled under a cap (an upper bound)."""
        return dp_accounting.GaussianDpEvent(self.participation_noise)


def worst_case_charge(noise: DPConfig, min_contributors: int, uses: int = 1) -> RoundCharge:
    """What a round of `noise.expected_cohort` sites can cost at most, to charge before it
    runs: sites that drop take their share of distributed noise with them, and a round
    completes with as few as `min_contributors`, so it is charged as if only they (or the
    whole cohort, if smaller) added noise. The fleet's coordinator and the Flower ServerApp
    both charge this."""
    return RoundCharge(noise.effective_noise_multiplier(
        min(min_contributors, noise.expected_cohort)), 1.0, uses)


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


def most_expensive(charges: list[RoundCharge], cap: ParticipationCap) -> list[RoundCharge]:
    """The rounds the worst-case unit under `cap` could have entered: the cap.max_rounds
    with the least noise per participation (z / uses). Gaussians are totally ordered (a
    Gaussian with more noise is a post-processing of one with less), so these K rounds
    compose to the largest loss of any K of them, under RDP and PLD alike."""
    ranked = sorted(charges, key=lambda charge: charge.participation_noise)
    return ranked[:cap.max_rounds]


def epsilon_per_unit(charges: list[RoundCharge], cap: ParticipationCap, delta: float,
                     method: AccountingMethod = "rdp") -> float:
    """epsilon(delta) of one privacy unit that entered at most `cap.max_rounds` of the rounds
    `charges` describe: the composition of the K most expensive of them (with identical
    rounds, K of them, however many rounds ran; fewer if fewer ran). Each participation is
    the round's Gaussian with z / uses and no sampling (RoundCharge.participation_event),
    under the same add/remove adjacency and the same dp-accounting accountant (`method`)
    as `epsilon_of`. 0.0 before any round."""
    if not isinstance(cap, ParticipationCap):
        raise TypeError(f"cap={cap!r} must be a ParticipationCap, e.g. ParticipationCap(8)")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    entered = most_expensive(charges, cap)
    if not entered:
        return 0.0
    accountant = _accountant(method)
    # Runs of equal noise compose in one call (PLD then self-composes by FFT).
    for _, run in itertools.groupby(entered, key=lambda charge: charge.participation_noise):
        same = list(run)
        accountant.compose(same[0].participation_event(), len(same))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class UnitEpsilon:
    """What the ledger shows of the privacy spent, per unit: epsilon_per_unit at delta, by
    `accountant`, is the most any one unit has lost so far; max_rounds is the cap K (None:
    no cap, every round composed); rounds_composed is how many rounds that epsilon
    composes (min(rounds run, K) with a cap, every round without)."""

    epsilon_per_unit: float
    delta: float
    max_rounds: int | None
    rounds_composed: int
    accountant: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon_per_unit) and self.epsilon_per_unit >= 0):
            raise ValueError(f"epsilon_per_unit={self.epsilon_per_unit} must be finite, >= 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")
        if self.max_rounds is not None:
            ParticipationCap(self.max_rounds)
        if self.rounds_composed < 0 or (self.max_rounds is not None
                                        and self.rounds_composed > self.max_rounds):
            raise ValueError(f"rounds_composed={self.rounds_composed} must be in [0, "
                             f"max_rounds={self.max_rounds}]")
        _accountant(self.accountant)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {"epsilon_per_unit": self.epsilon_per_unit, "delta": self.delta,
                "max_rounds": self.max_rounds, "rounds_composed": self.rounds_composed,
                "accountant": self.accountant}


@dataclass
class Budget:
    """epsilon_limit at delta, spent round by round. `charge` refuses (BudgetExceededError)
    a round that would pass the limit and then records nothing.

    With no `cap` every round is composed (the fleet's epsilon grows with its rounds). With
    a cap K, epsilon is per unit over the fleet's life: epsilon_spent is `epsilon_per_unit`
    (the K most expensive rounds), and a round is refused unless a unit could enter K
    rounds like it, beside the most expensive already run, within the limit: a round the
    budget admits can then run forever. The cap must never be lowered over a fleet's life
    (units may already have entered the higher number of rounds)."""

    epsilon_limit: float
    delta: float
    method: AccountingMethod = "rdp"
    charges: list[RoundCharge] = field(default_factory=list)
    cap: ParticipationCap | None = None

    def __post_init__(self) -> None:
        if not self.epsilon_limit > 0:
            raise ValueError(f"epsilon_limit={self.epsilon_limit} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")
        _accountant(self.method)
        if self.cap is not None and not isinstance(self.cap, ParticipationCap):
            raise TypeError(f"cap={self.cap!r} must be a ParticipationCap or None (no cap)")

    def _epsilon(self, charges: list[RoundCharge]) -> float:
        if not charges:
            return 0.0
        if self.cap is None:
            return epsilon_of(charges, self.delta, self.method)
        return epsilon_per_unit(charges, self.cap, self.delta, self.method)

    @property
    def epsilon_spent(self) -> float:
        """Without a cap, the composition of every round; with one, per unit (the most any
        unit can have lost so far). Never falls as rounds are added."""
        return self._epsilon(self.charges)

    def epsilon_after(self, charge: RoundCharge) -> float:
        """What epsilon_spent would be if `charge` ran next (for the ledger's total)."""
        return self._epsilon([*self.charges, charge])

    def epsilon_forever_after(self, charge: RoundCharge) -> float:
        """With a cap K: epsilon per unit if this round's mechanism ran forever after the
        rounds so far (the K most expensive of them and K copies of `charge`): what a round
        must keep within the limit to be admitted. Without a cap, nothing run forever has a
        finite epsilon: this is `epsilon_after`, the composition of every round."""
        if self.cap is None:
            return self.epsilon_after(charge)
        return self._epsilon([*self.charges, *[charge] * self.cap.max_rounds])

    def refusal(self, charge: RoundCharge) -> str | None:
        """Why `charge` must not run (the budget cannot pay for it), or None if it may."""
        after = self.epsilon_forever_after(charge)
        if after <= self.epsilon_limit:
            return None
        if self.cap is None:
            return (f"round {len(self.charges) + 1} would raise epsilon to {after:.3f} at "
                    f"delta={self.delta:g}, past the budget {self.epsilon_limit:g} (spent so "
                    f"far {self.epsilon_spent:.3f} over {len(self.charges)} rounds): raise "
                    "the noise multiplier, sample fewer sites, or stop training")
        k = self.cap.max_rounds
        return (f"round {len(self.charges) + 1} would let a unit that enters {k} rounds like "
                f"it (noise multiplier {charge.participation_noise:g} per participation) "
                f"reach epsilon {after:.3f} per unit at delta={self.delta:g}, past the "
                f"lifetime budget {self.epsilon_limit:g} (cap {k} rounds per unit; spent so "
                f"far {self.epsilon_spent:.3f} per unit over {len(self.charges)} rounds): "
                "raise the noise multiplier or lower the participation cap")

    def charge(self, charge: RoundCharge) -> float:
        """Record the round and return the new epsilon_spent, or refuse it."""
        refusal = self.refusal(charge)
        if refusal is not None:
            raise BudgetExceededError(refusal)
        after = self.epsilon_after(charge)
        self.charges.append(charge)
        return after

    def unit_epsilon(self) -> UnitEpsilon:
        """The ledger-ready summary of what has been spent (see UnitEpsilon)."""
        rounds = len(self.charges)
        return UnitEpsilon(self.epsilon_spent, self.delta,
                           None if self.cap is None else self.cap.max_rounds,
                           rounds if self.cap is None else min(rounds, self.cap.max_rounds),
                           self.method)
