"""Bounded participation: caps enforced at the site, epsilon per unit from the caps, checked
against dp-accounting called directly."""

import itertools
import random

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fleetmind.aggregation.accountant import (
    Budget,
    BudgetExceededError,
    RoundCharge,
    UnitEpsilon,
    epsilon,
    epsilon_of,
    epsilon_per_unit,
)
from fleetmind.aggregation.participation import (
    CapReachedError,
    ParticipationCap,
    ParticipationRecord,
    eligible_units,
    participation_history,
    record_round,
)

DELTA = 1e-5


def direct(method: str, noise_multipliers: list[float], delta: float = DELTA) -> float:
    """epsilon of composing one Gaussian per entry, by dp-accounting's own API."""
    accountant = RdpAccountant() if method == "rdp" else PLDAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


# ---- the accounting ------------------------------------------------------------------


@pytest.mark.parametrize("method, z, k", [("rdp", 0.8, 1), ("rdp", 0.8, 4), ("rdp", 1.3, 16),
                                          ("pld", 0.8, 4)])
def test_identical_rounds_compose_k_times(method, z, k) -> None:
    accountant = RdpAccountant() if method == "rdp" else PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), k)
    expected = accountant.get_epsilon(DELTA)
    charges = [RoundCharge(z)] * (3 * k)
    assert epsilon_per_unit(charges, ParticipationCap(k), DELTA, method) == pytest.approx(
        expected, rel=1e-9)


def test_a_cap_over_1000_rounds_costs_k_rounds_not_1000() -> None:
    k, z = 8, 1.0
    thousand = [RoundCharge(z)] * 1000
    capped = epsilon_per_unit(thousand, ParticipationCap(k), DELTA)
    assert capped == pytest.approx(direct("rdp", [z] * k), rel=1e-9)
    assert capped == pytest.approx(epsilon(z, 1.0, k, DELTA), rel=1e-9)
    uncapped = epsilon_of(thousand, DELTA)
    assert uncapped == pytest.approx(epsilon(z, 1.0, 1000, DELTA), rel=1e-9)
    assert uncapped > 5 * capped
    # and it stops growing: 100 more rounds change nothing
    assert epsilon_per_unit(thousand + [RoundCharge(z)] * 100, ParticipationCap(k),
                            DELTA) == capped


def test_fewer_rounds_than_the_cap_compose_all_of_them() -> None:
    charges = [RoundCharge(1.0), RoundCharge(2.0)]
    assert epsilon_per_unit(charges, ParticipationCap(5), DELTA) == pytest.approx(
        direct("rdp", [1.0, 2.0]), rel=1e-9)
    assert epsilon_per_unit([], ParticipationCap(5), DELTA) == 0.0


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_varying_rounds_charge_the_k_most_expensive(method) -> None:
    # z / uses per participation: 3, 1, 2.5, 0.75 (1.5 used twice), 4, 2
    charges = [RoundCharge(3.0), RoundCharge(1.0), RoundCharge(2.5), RoundCharge(1.5, uses=2),
               RoundCharge(4.0), RoundCharge(2.0)]
    got = epsilon_per_unit(charges, ParticipationCap(3), DELTA, method)
    assert got == pytest.approx(direct(method, [0.75, 1.0, 2.0]), rel=1e-9)
    if method == "rdp":  # ... the worst of every subset a unit could have entered
        worst = max(direct("rdp", [c.noise_multiplier / c.uses for c in subset])
                    for subset in itertools.combinations(charges, 3))
        assert got == pytest.approx(worst, rel=1e-9)


def test_sampled_rounds_are_charged_unsampled_under_a_cap() -> None:
    # The cap counts rounds entered, so sampling amplifies nothing (an upper bound).
    sampled = [RoundCharge(1.0, sampling_rate=0.1)] * 50
    capped = epsilon_per_unit(sampled, ParticipationCap(4), DELTA)
    assert capped == pytest.approx(direct("rdp", [1.0] * 4), rel=1e-9)


# ---- the budget ----------------------------------------------------------------------


def test_a_capped_budget_pays_for_identical_rounds_forever() -> None:
    cap = ParticipationCap(4)
    limit = direct("rdp", [2.0] * 4) * 1.001
    budget = Budget(limit, DELTA, cap=cap)
    spent = [budget.charge(RoundCharge(2.0)) for _ in range(300)]
    assert spent == sorted(spent)  # never falls: the ledger's total only grows
    assert spent[-1] == pytest.approx(direct("rdp", [2.0] * 4), rel=1e-9)
    assert spent[2] == pytest.approx(direct("rdp", [2.0] * 3), rel=1e-9)
    summary = budget.unit_epsilon()
    assert summary == UnitEpsilon(spent[-1], DELTA, 4, 4, "rdp")
    assert summary.to_json() == {"epsilon_per_unit": spent[-1], "delta": DELTA,
                                 "max_rounds": 4, "rounds_composed": 4, "accountant": "rdp"}
    # The same fleet without a cap is refused long before 300 rounds.
    uncapped = Budget(limit, DELTA)
    with pytest.raises(BudgetExceededError):
        for _ in range(300):
            uncapped.charge(RoundCharge(2.0))
    assert len(uncapped.charges) < 10


def test_a_round_that_k_times_would_pass_the_budget_is_refused_at_once() -> None:
    cap = ParticipationCap(8)
    one, eight = direct("rdp", [1.0]), direct("rdp", [1.0] * 8)
    budget = Budget((one + eight) / 2, DELTA, cap=cap)  # one round fits, eight do not
    with pytest.raises(BudgetExceededError, match=r"round 1 would let a unit that enters 8 "
                       r"rounds like it .* reach epsilon \d+\.\d+ per unit .*lifetime budget"
                       r".*cap 8 rounds per unit.*raise the noise multiplier or lower the "
                       r"participation cap"):
        budget.charge(RoundCharge(1.0))
    assert budget.charges == [] and budget.epsilon_spent == 0.0
    assert Budget(eight * 1.001, DELTA, cap=cap).charge(RoundCharge(1.0)) == pytest.approx(one)


def test_a_less_noisy_round_is_refused_beside_the_rounds_run() -> None:
    cap = ParticipationCap(4)
    budget = Budget(direct("rdp", [2.0] * 4) * 1.001, DELTA, cap=cap)
    for _ in range(10):
        budget.charge(RoundCharge(2.0))
    refused = RoundCharge(1.9)
    assert budget.epsilon_forever_after(refused) == pytest.approx(direct("rdp", [1.9] * 4))
    assert "round 11 would let a unit" in budget.refusal(refused)
    with pytest.raises(BudgetExceededError):
        budget.charge(refused)
    assert len(budget.charges) == 10
    budget.charge(RoundCharge(5.0))  # a noisier round still fits and changes nothing
    assert budget.epsilon_spent == pytest.approx(direct("rdp", [2.0] * 4), rel=1e-9)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_no_cap_is_the_budget_as_before(method) -> None:
    charges = [RoundCharge(2.0), RoundCharge(1.5, 0.5), RoundCharge(2.0, uses=2)]
    budget = Budget(100.0, DELTA, method, list(charges))
    assert budget.cap is None
    assert budget.epsilon_spent == epsilon_of(charges, DELTA, method)
    nxt = RoundCharge(3.0)
    assert budget.epsilon_after(nxt) == epsilon_of([*charges, nxt], DELTA, method)
    assert budget.epsilon_forever_after(nxt) == budget.epsilon_after(nxt)
    assert budget.unit_epsilon() == UnitEpsilon(budget.epsilon_spent, DELTA, None, 3, method)
    tight = Budget(budget.epsilon_spent, DELTA, method, list(charges))
    assert tight.refusal(nxt).startswith("round 4 would raise epsilon to ")


# ---- enforcement at the site ---------------------------------------------------------


def test_eligible_units_refuses_units_at_the_cap() -> None:
    history = {"u1": (1, 2, 3), "u2": (1, 2), "u3": ()}
    cap = ParticipationCap(3)
    assert eligible_units(["u1", "u2", "u3", "u4", "u2"], history, cap) == ("u2", "u3", "u4")
    # the same round sent again (re-attach after a crash) is not a new participation
    assert eligible_units(["u1"], history, cap, round_id=3) == ("u1",)
    assert eligible_units(["u1"], history, ParticipationCap(4)) == ("u1",)


def test_record_round_counts_and_refuses_before_anything_is_sent() -> None:
    cap = ParticipationCap(2)
    history = {"u1": (4,), "u2": (3, 4)}
    record = record_round(["u3", "u1"], history, cap, 5, "user")
    assert record.counts == (("u1", 2), ("u3", 1))
    with pytest.raises(CapReachedError, match=r"1 user unit\(s\) already entered 2 rounds.*"
                       r"'u2'.*leave them out of round 5"):
        record_round(["u1", "u2"], history, cap, 5, "user")
    assert record_round(["u2"], history, cap, 4, "user").counts == (("u2", 2),)


def test_records_rebuild_the_history_and_catch_understated_counts() -> None:
    cap = ParticipationCap(3)
    records, history = [], {}
    for round_id, units in [(1, ["a", "b"]), (2, ["a"]), (2, ["a"]), (4, ["b", "a"])]:
        record = record_round(units, history, cap, round_id, "session")
        record = ParticipationRecord.from_json(record.to_json())  # as the outbox stores it
        records.append(record)
        history = participation_history(records)
    assert history == {"a": (1, 2, 4), "b": (1, 4)}
    assert eligible_units(["a", "b"], history, cap) == ("b",)
    forged = ParticipationRecord(5, "session", 3, (("a", 1),))  # "a" says it is new
    with pytest.raises(ValueError, match=r"unit 'a' is recorded in round 5 as its "
                                         r"participation 1, but the records before show 4"):
        participation_history([*records, forged])


def test_a_fleet_enforcing_caps_stays_within_its_accounting() -> None:
    """Sites admit only eligible users; over 60 rounds no user passes K, and the worst
    user's epsilon, composed directly from the rounds it entered, is the budget's per-unit
    epsilon."""
    rng = random.Random(0)
    cap, z = ParticipationCap(5), 1.2
    budget = Budget(50.0, DELTA, cap=cap)
    history: dict[str, tuple[int, ...]] = {}
    records = []
    for round_id in range(1, 61):
        candidates = [f"user{rng.randrange(20)}" for _ in range(8)]
        entering = eligible_units(candidates, history, cap)
        records.append(record_round(entering, history, cap, round_id, "user"))
        history = participation_history(records)
        budget.charge(RoundCharge(z))
    assert max(len(rounds) for rounds in history.values()) == cap.max_rounds
    assert budget.epsilon_spent == pytest.approx(direct("rdp", [z] * 5), rel=1e-9)


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.5, 4.0, "8", True, None])
def test_a_bad_cap_is_refused_with_the_value_and_the_fix(value) -> None:
    with pytest.raises(ValueError, match=rf"max_rounds={value!r} must be a whole number >= 1"
                                         r".*ParticipationCap\(8\)"):
        ParticipationCap(value)


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_noise_is_refused_with_the_value_and_the_fix(value) -> None:
    with pytest.raises(ValueError, match=rf"noise_multiplier={value!r} must be a finite "
                                         r"number > 0.*privacy\.noise_multiplier > 0"):
        RoundCharge(value)


def test_other_bad_input_is_refused() -> None:
    with pytest.raises(TypeError, match=r"cap=4 must be a ParticipationCap"):
        epsilon_per_unit([RoundCharge(1.0)], 4, DELTA)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cap=4 must be a ParticipationCap or None"):
        Budget(1.0, DELTA, cap=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"delta=0 must be in \(0, 1\)"):
        epsilon_per_unit([RoundCharge(1.0)], ParticipationCap(2), 0)
    with pytest.raises(ValueError, match=r"count=3: .* 1 to max_rounds=2"):
        ParticipationRecord(1, "user", 2, (("u1", 3),))
    with pytest.raises(ValueError, match=r"privacy_unit='person'"):
        ParticipationRecord(1, "person", 2, ())
    with pytest.raises(ValueError, match=r"lists a unit twice"):
        ParticipationRecord(1, "user", 2, (("u1", 1), ("u1", 2)))
    with pytest.raises(ValueError, match=r"not a unit id"):
        eligible_units([""], {}, ParticipationCap(2))
    with pytest.raises(ValueError, match=r"round_id=-1 must be a whole number >= 0"):
        record_round(["u1"], {}, ParticipationCap(2), -1, "user")
