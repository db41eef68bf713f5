"""The demo through the sites' endpoints: each site serves its version at its own `client
serve` endpoint on a loopback port the OS picked, the simulated users chat with it through
the official openai client, the endpoint captures their sessions into the site's store
(which the round consolidates), and accuracy is measured on the answers served."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleetmind.client.serve.capture import conversation_session_id
from fleetmind.client.serve.runner import BackgroundServer
from fleetmind.client.serve.settings import ServeConfig
from fleetmind.client.store import SessionStore
from fleetmind.sim import world as W
from fleetmind.sim.demo import RESULTS, DemoConfig, add_demo_command, converse, run_demo, schedule

SERVED = ("served_own_accuracy", "served_transfer_accuracy", "served_recovery")


def test_converse_stores_what_the_endpoint_said_as_one_session_per_user(
        tmp_path: Path, toy_model_dir: Path) -> None:
    world = W.make_world(W.WorldSpec(seed=3, sites=3, facts_per_site=2, users_per_fact=3,
                                     canaries_per_site=0, repeated_canaries_per_site=0))
    sessions = world.sites[0].sessions[:3]
    settings = ServeConfig(model_dir=toy_model_dir, data_dir=tmp_path / "site",
                           listen="127.0.0.1:0", device="cpu", max_tokens=48)
    with BackgroundServer(settings) as server:
        held = converse(server.url, sessions)
        server.app.state.capture.join()
    with SessionStore(tmp_path / "site") as store:
        stored = {s.id: s.to_dict() for s in store}
    assert len(stored) == len(sessions)  # each conversation one session, not one a request
    for world_session, went in zip(sessions, held, strict=True):
        said = [m for m in world_session["messages"] if m["role"] == "user"]
        assert [m for m in went["messages"] if m["role"] == "user"] == said
        assert [m["role"] for m in went["messages"]] == ["user", "assistant"] * len(said)
        session = stored[conversation_session_id(world_session["user"], world_session["id"])]
        assert session["user"] == world_session["user"]
        # What the served model said, turn for turn, as the user saw it.
        assert [{"role": m["role"], "content": m["content"]} for m in session["messages"]] \
            == went["messages"]


def test_the_demo_runs_through_the_endpoints(tmp_path: Path) -> None:
    cfg = DemoConfig(sites=3, rounds=1, facts_per_site=2, users_per_fact=8, canaries_per_site=1,
                     repeated_canaries_per_site=1, canary_repeats=2, steps=12, dp=False,
                     merge="exact", out=tmp_path / "demo")
    assert cfg.endpoints  # the default
    run_demo(cfg)
    results = json.loads((cfg.out / RESULTS).read_text())
    assert results["config"]["endpoints"] is True
    world = W.make_world(cfg.world_spec())
    facts = len(world.facts())
    for measured in results["rounds"]:
        # Every site's users asked about every fact (their own and the others') through
        # their own endpoint, before the first round and after it.
        assert measured["served_questions"] == cfg.sites * facts
        for key in SERVED:
            assert 0.0 <= measured[key] <= 1.0, key
        for site in measured["sites"]:
            assert site["served_questions"] == facts
            assert site["served_recovery"] == (site["served_transfer_accuracy"]
                                               / site["incontext_upper_bound"])
        assert measured["served_transfer_accuracy"] == sum(
            s["served_transfer_accuracy"] for s in measured["sites"]) / cfg.sites
    after = results["rounds"][1]
    # Each site learned facts it never saw, and its endpoint serves them.
    assert after["served_transfer_accuracy"] > results["rounds"][0]["served_transfer_accuracy"]

    (first,) = zip(*schedule(world, cfg.rounds), strict=True)  # round 1's sessions per site
    for site, sessions in zip(world.sites, first, strict=True):
        with SessionStore(cfg.out / site.name) as store:
            stored = list(store)
            consumed = len(stored) - len(store.unconsumed())
        # Captured by the endpoint (ids derived from the conversation header, keyed to the
        # user), not ingested from the world's transcripts (whose ids are the world's own),
        # and consolidated by the round.
        assert {s.id for s in stored} == {conversation_session_id(s["user"], s["id"])
                                          for s in sessions}
        assert {s.user for s in stored} == {s["user"] for s in sessions}
        assert consumed == len(sessions)
        assert after["captured"][site.name]["sessions"] == len(sessions)
        assert after["captured"][site.name]["consolidations"] == 1


def test_endpoints_are_the_default_and_can_be_turned_off() -> None:
    parser = argparse.ArgumentParser()
    add_demo_command(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo"]).endpoints is True
    assert parser.parse_args(["demo", "--no-endpoints"]).endpoints is False
    # The FedIT arm alone runs no site, so nothing serves.
    assert DemoConfig(merge="fedit").endpoints is False
    assert DemoConfig(endpoints=False).fleet().serve is False


def test_without_the_openai_client_the_demo_says_how_to_run(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    import importlib.util

    from fleetmind.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "openai" else real(name, *rest))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install openai" in err and "--no-endpoints" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "demo").exists()
