"""`fleetmind audit canaries` on the toy model: exposure stays within [0, log2|R|], and a
signed version whose adapter was made to memorise a secret exposes it more than the base
model does, while a secret it never saw stays where the base model had it."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.toy_fleet import TOY_SPEC

from fleetmind.cli.main import main
from fleetmind.server.versions import Release, VersionRegistry
from fleetmind.sim import world as W


def memorised_b(toy_model, slots: list[dict]) -> dict:
    """B of an adapter (A frozen from TOY_SPEC's seed, as every site's) trained on the
    closed-book answers of `slots`: what a leaking version would carry."""
    import copy

    import torch

    from fleetmind.client import lora

    model, tokenizer = toy_model
    torch.manual_seed(0)
    # A copy: PEFT wraps the model it is given, and the session's toy model is shared.
    peft_model = lora.attach_lora(copy.deepcopy(model), TOY_SPEC.frozen_a_seed,
                                  TOY_SPEC.rank, TOY_SPEC.alpha)
    batches = []
    for slot in slots:
        prompt = tokenizer(tokenizer.apply_chat_template(slot["messages"], tokenize=False,
                                                         add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        answer = tokenizer(slot["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        batches.append((ids, labels))
    # Measured: 5 passes at this rate already rank the secret first (10.6 bits); 10 for margin.
    optimiser = torch.optim.Adam(lora.trainable_parameters(peft_model), lr=3e-2)
    peft_model.train()
    for _ in range(10):
        for ids, labels in batches:
            optimiser.zero_grad()
            peft_model(input_ids=ids, labels=labels).loss.backward()
            optimiser.step()
    return lora.get_b(peft_model)


@pytest.fixture(scope="module")
def leaking_version(toy_model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("canaries")
    world = W.make_world(W.WorldSpec(seed=3, sites=1, facts_per_site=2, canaries_per_site=2))
    rows = [{"site": site.name, "session": f"{site.name}-c{number:04d}", **W.canary_row(c)}
            for site in world.sites for number, c in enumerate(site.canaries)]
    canaries = folder / "canaries.jsonl"
    canaries.write_text("".join(json.dumps(row) + "\n" for row in rows))
    key = Ed25519PrivateKey.generate()
    registry = VersionRegistry(folder / "aggregator", key)
    registry.genesis(TOY_SPEC)
    # Only the first canary is memorised; the second is the control.
    version = registry.publish(memorised_b(toy_model, rows[0]["slots"]), Release(
        round_id=0, cohort_size=2, clip_norm=1.0, noise_multiplier=0.0, noise_mode="none",
        epsilon=0.0, delta=1e-5))
    public = folder / "aggregator.pub"
    public.write_text(key.public_key().public_bytes_raw().hex())
    return {"canaries": canaries, "version": version.folder, "pub": public, "rows": rows}


def test_a_memorised_secret_is_exposed_and_the_control_is_not(capsys, toy_model_dir,
                                                               leaking_version) -> None:
    code = main(["audit", "canaries", "--model", str(toy_model_dir), "--version",
                 str(leaking_version["version"]), "--canaries", str(leaking_version["canaries"]),
                 "--aggregator-key", str(leaking_version["pub"]), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    leaked, control = report["canaries"]
    assert leaked["secret"] == leaking_version["rows"][0]["secret"]
    assert leaked["site"] == "site-00" and leaked["session"] == "site-00-c0000"
    assert leaked["repeats"] == 1  # rows without "repeats" were said once
    for row in report["canaries"]:
        # 40 values per attribute, two facts per record: 1600 candidates, log2 = 10.64 bits.
        assert row["max_bits"] == pytest.approx(10.64, abs=0.01)
        for bits in (row["base_bits"], row["version_bits"]):
            assert 0.0 <= bits <= row["max_bits"] + 1e-9
    assert leaked["version_bits"] > leaked["base_bits"] + 3.0
    assert leaked["version_bits"] >= leaked["max_bits"] - 1.0  # at or near rank 1
    assert control["version_bits"] < leaked["version_bits"] - 3.0
    assert report["mean_version_bits"] == pytest.approx(
        (leaked["version_bits"] + control["version_bits"]) / 2)

    # The table says the same to a person.
    code = main(["audit", "canaries", "--model", str(toy_model_dir), "--version",
                 str(leaking_version["version"]), "--canaries",
                 str(leaking_version["canaries"])])
    out, _ = capsys.readouterr()
    assert code == 0 and leaked["secret"] in out and "mean" in out


def test_an_unverifiable_version_is_not_measured(capsys, toy_model_dir, leaking_version,
                                                 tmp_path) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    code = main(["audit", "canaries", "--model", str(toy_model_dir), "--version",
                 str(leaking_version["version"]), "--canaries", str(leaking_version["canaries"]),
                 "--aggregator-key", str(other)])
    _, err = capsys.readouterr()
    assert code == 1 and "does not verify with the aggregator key" in err


@pytest.mark.parametrize("change, message", [
    ("missing-model", "--model"),
    ("not-a-version", "no adapter_config.json"),
    ("missing-canaries", "no such file"),
    ("bad-canaries", ":2: not JSON"),
    ("old-canaries", ":1: not a canary row"),
    ("bad-repeats", ":1: \"repeats\": 0 must be a whole number"),
])
def test_canaries_bad_input_is_one_line(capsys, toy_model_dir, leaking_version, tmp_path,
                                        change, message) -> None:
    canaries = leaking_version["canaries"]
    model, version = toy_model_dir, leaking_version["version"]
    if change == "missing-model":
        model = tmp_path / "absent"
    elif change == "not-a-version":
        version = tmp_path
    elif change == "missing-canaries":
        canaries = tmp_path / "absent.jsonl"
    elif change == "bad-canaries":
        canaries = tmp_path / "bad.jsonl"
        canaries.write_text(leaking_version["canaries"].read_text().splitlines()[0] + "\n{\n")
    elif change == "bad-repeats":
        canaries = tmp_path / "repeats.jsonl"
        row = json.loads(leaking_version["canaries"].read_text().splitlines()[0])
        canaries.write_text(json.dumps({**row, "repeats": 0}) + "\n")
    else:  # a passcode row from before canaries had slots
        canaries = tmp_path / "old.jsonl"
        canaries.write_text('{"site": "s", "session": "c", "secret": "a b c d"}\n')
    code = main(["audit", "canaries", "--model", str(model), "--version", str(version),
                 "--canaries", str(canaries)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and err.count("\n") == 1
