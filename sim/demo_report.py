"""What the demo shows: a table per round (`round_table`) and the plot of its results
(`plot`): recovery (in-process, and on the answers the sites' endpoints served when they
ran), forgetting and canary exposure per round, and knowledge arriving over the rounds:
recovery on the facts said so far and on the round's new ones, and how much of round 1's
facts' best recovery is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def round_table(measured: dict[str, Any]) -> Any:
    from rich.table import Table

    epsilon = (f"epsilon {measured['epsilon']:.2f}" if measured["epsilon"] < 1e6
               else "no DP noise")
    version = ("FedIT arm" if measured["version"] is None
               else f"version {measured['version']}")
    table = Table(title=f"after round {measured['round']} ({version}, {epsilon}, "
                        f"{measured['seconds']:.0f} s)")
    columns: tuple[tuple[str, str, str], ...] = (
        ("site", "site", "{}"), ("own", "own_accuracy", "{:.2f}"),
        ("transfer", "transfer_accuracy", "{:.2f}"),
        ("upper bound", "incontext_upper_bound", "{:.2f}"),
        ("recovery", "recovery", "{:.2f}"))
    if "recovery_known" in measured:  # facts said so far, and those that arrived this round
        columns += (("recovery: facts so far", "recovery_known", "{:.2f}"),
                    ("recovery: new facts", "recovery_new", "{:.2f}"))
    columns += (("forgetting (pts)", "forgetting_points", "{:+.1f}"),
                ("canary exposure (bits)", "canary_exposure_bits", "{:+.2f}"))
    if "repeated_canary_exposure_bits" in measured:
        columns += (("repeated canaries (bits)", "repeated_canary_exposure_bits", "{:+.2f}"),)
    if "served_transfer_accuracy" in measured:  # the answers the sites' endpoints served
        columns += (("served transfer", "served_transfer_accuracy", "{:.2f}"),
                    ("served recovery", "served_recovery", "{:.2f}"))
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title == "site" else "right")
    rows = [*measured["sites"], {**measured, "site": "fleet"}]
    if "fedit" in measured:
        rows.append({**measured["fedit"], "site": "FedIT arm",
                     "incontext_upper_bound": measured["incontext_upper_bound"]})
    for row in rows:  # the FedIT arm is measured in-process only: no served columns
        table.add_row(*(fmt.format(row[key]) if row.get(key) is not None else "—"
                        for _, key, fmt in columns))
    if "facts_known" in measured:
        kept = measured.get("retention_round1")
        table.caption = (f"facts said so far {measured['facts_known']}, "
                         f"{measured['facts_new']} of them new this round; round 1's facts "
                         + ("keep —" if kept is None else f"keep {kept:.2f}")
                         + " of their best recovery")
    return table


def plot(results: dict[str, Any], out: Path) -> Path:
    """Transfer recovery and forgetting per round, with the fleet, with the FedIT arm when it
    ran, and without the fleet (a site alone never sees other sites' facts, so it keeps the
    base model's transfer); the fleet's canary exposure per round, once-said and repeated
    canaries apart; and, where results.json has them, knowledge over the rounds: recovery
    on the facts said so far and on each round's new ones, and round 1's facts kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    x = [r["round"] for r in rounds]
    alone = rounds[0]["recovery"]
    continual = all("recovery_known" in r for r in rounds)
    figure, axes = plt.subplots(1, 4 if continual else 3, figsize=(20 if continual else 15, 4))
    left, right, privacy = axes[:3]
    if continual:
        _knowledge(axes[3], rounds, x)
    fleet = "with the fleet" + (" (FedIT merge)" if results["config"]["merge"] == "fedit" else "")
    left.plot(x, [r["recovery"] for r in rounds], marker="o", label=fleet)
    if all("served_recovery" in r for r in rounds):
        left.plot(x, [r["served_recovery"] for r in rounds], marker="^", linestyle="-.",
                  label=fleet + ", answers served")
    if "fedit" in rounds[0]:
        left.plot(x, [r["fedit"]["recovery"] for r in rounds], marker="s",
                  label="FedIT (A and B averaged)")
    left.plot(x, [alone] * len(x), linestyle="--", label="without the fleet")
    left.axhline(0.8, color="grey", linewidth=0.8, linestyle=":", label="target 0.80")
    left.set(xlabel="round", ylabel="transfer recovery", ylim=(0, 1.05),
             title="facts first seen at other sites")
    left.legend()
    right.plot(x, [r["forgetting_points"] for r in rounds], marker="o", label=fleet)
    if "fedit" in rounds[0]:
        right.plot(x, [r["fedit"]["forgetting_points"] for r in rounds], marker="s",
                   label="FedIT (A and B averaged)")
        # FedIT's tens of points beside the fleet's one or two: linear up to 5, log beyond.
        right.set_yscale("symlog", linthresh=5)
        right.set_yticks([-2, 0, 2, 10, 100], labels=["-2", "0", "2", "10", "100"])
    right.plot(x, [0.0] * len(x), linestyle="--", label="without the fleet")
    right.axhline(2.0, color="grey", linewidth=0.8, linestyle=":", label="limit 2 points")
    right.set(xlabel="round", ylabel="forgetting (points)", title="base in-context skill")
    for key, label in (("canary_exposure_bits", "canaries said once"),
                       ("repeated_canary_exposure_bits", "canaries one user repeats")):
        if all(key in r for r in rounds):
            privacy.plot(x, [r[key] for r in rounds], marker="o", label=label)
    if results["config"]["dp"]:
        privacy.axhline(1.0, color="grey", linewidth=0.8, linestyle=":",
                        label="limit with DP, 1 bit")
    privacy.set(xlabel="round", ylabel="exposure (bits over the base model)",
                title="other sites' canaries")
    for axis in (left, right, privacy):
        axis.set_xticks(x)
    right.legend()
    privacy.legend()
    figure.suptitle(f"fleetmind demo: {len(results['sites'])} sites, DP "
                    f"{'on' if results['config']['dp'] else 'off'}")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _knowledge(axis: Any, rounds: list[dict[str, Any]], x: list[int]) -> None:
    """Knowledge arriving, spreading and staying: the fleet's recovery on the facts said so
    far, on the round's new facts and on round 1's, and round 1's facts' recovery now over
    their best (None, before a round has facts or before round 2, is left out)."""
    for key, label, style in (("recovery_known", "facts said so far", "o-"),
                              ("recovery_new", "facts new this round", "s-"),
                              ("recovery_round1", "round 1's facts", "D--"),
                              ("retention_round1", "round 1's facts kept (now / best)", "^:")):
        points = [(at, r[key]) for at, r in zip(x, rounds, strict=True)
                  if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label)
    axis.axhline(0.8, color="grey", linewidth=0.8, linestyle=":", label="target 0.80")
    facts = ", ".join(f"{r['facts_new']}" for r in rounds[1:] if "facts_new" in r)
    axis.set(xlabel="round", ylabel="recovery; kept = now / best", ylim=(0, 1.05), xticks=x,
             title=f"knowledge over rounds (new facts per round: {facts})")
    axis.legend()
