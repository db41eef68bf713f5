import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fleetmind.aggregation.accountant import (
    Budget,
    BudgetExceededError,
    RoundCharge,
    epsilon,
    epsilon_of,
)


def direct(method: str, event: dp_accounting.DpEvent, count: int, delta: float) -> float:
    accountant = RdpAccountant() if method == "rdp" else PLDAccountant()
    accountant.compose(event, count)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("method, z, q, rounds", [
    ("rdp", 1.1, 1.0, 10), ("rdp", 0.8, 0.05, 200), ("rdp", 2.0, 0.3, 50), ("pld", 2.0, 0.3, 50)])
def test_agrees_with_dp_accounting_called_directly(method, z, q, rounds) -> None:
    gaussian = dp_accounting.GaussianDpEvent(z)
    event = gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    expected = direct(method, event, rounds, 1e-6)
    assert epsilon(z, q, rounds, 1e-6, method=method) == pytest.approx(expected, rel=1e-9)
    charges = [RoundCharge(z, q)] * rounds
    assert epsilon_of(charges, 1e-6, method) == pytest.approx(expected, rel=1e-9)


def test_rdp_and_pld_roughly_agree() -> None:
    rdp = epsilon(1.0, 0.1, 100, 1e-5, method="rdp")
    pld = epsilon(1.0, 0.1, 100, 1e-5, method="pld")
    assert pld <= rdp <= 1.5 * pld  # PLD is the tighter of the two


def test_every_reuse_counts() -> None:
    # A unit in a round's sum twice has twice the sensitivity: z/2.
    twice = epsilon(2.0, 1.0, 5, 1e-5, uses=2)
    assert twice == pytest.approx(epsilon(1.0, 1.0, 5, 1e-5), rel=1e-9)
    assert twice > epsilon(2.0, 1.0, 5, 1e-5)
    # more rounds, more epsilon
    assert epsilon(2.0, 1.0, 10, 1e-5) > epsilon(2.0, 1.0, 5, 1e-5)


def test_mixed_rounds_compose() -> None:
    charges = [RoundCharge(2.0), RoundCharge(2.0), RoundCharge(1.0, 0.5, uses=2)]
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0), 2)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(0.5)))
    assert epsilon_of(charges, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_budget_refuses_the_round_that_would_pass_it() -> None:
    budget = Budget(epsilon_limit=3.0, delta=1e-5)
    assert budget.epsilon_spent == 0.0
    first = budget.charge(RoundCharge(2.0))
    assert 0 < first <= 3.0
    with pytest.raises(BudgetExceededError,
                       match=r"round 2 would raise epsilon to 3\.\d+ .* budget 3"):
        budget.charge(RoundCharge(2.0))
    assert len(budget.charges) == 1  # the refused round was not recorded
    assert budget.epsilon_spent == pytest.approx(first)
    budget.charge(RoundCharge(20.0))  # a much noisier round still fits


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 0.0}, {"noise_multiplier": 1.0,
                                    "sampling_rate": 0.0}, {"noise_multiplier": 1.0, "uses": 0}])
def test_bad_charges_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        RoundCharge(**kwargs)


def test_bad_budget_refused() -> None:
    with pytest.raises(ValueError):
        Budget(epsilon_limit=1.0, delta=0.0)
    with pytest.raises(ValueError):
        Budget(epsilon_limit=1.0, delta=1e-5, method="moments")


def test_numpy_scalars_are_numbers() -> None:
    import numpy as np

    charge = RoundCharge(np.float64(2.0), uses=np.int64(2))
    assert epsilon_of([charge], 1e-5) == pytest.approx(epsilon(1.0, 1.0, 1, 1e-5), rel=1e-9)
