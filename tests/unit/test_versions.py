"""The signed version registry: genesis from the seed, publish, verify, and every way a
version folder can be wrong is refused; the adapter loads in PEFT as it is."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file

from fleetmind.aggregation.frozen_a import frozen_a
from fleetmind.server import versions
from fleetmind.server.versions import (
    AdapterSpec,
    Manifest,
    Release,
    TargetModule,
    VersionError,
    VersionRegistry,
)

BASE_HASH = "ab" * 32
MODULES = tuple(module for layer in range(2) for module in (
    TargetModule(f"model.layers.{layer}.mlp.gate_proj", 16, 24),
    TargetModule(f"model.layers.{layer}.mlp.down_proj", 24, 16)))
SPEC = AdapterSpec("toy-llama", BASE_HASH, MODULES, frozen_a_seed=1234, rank=4, alpha=16.0)
RELEASE = Release(round_id=1, cohort_size=3, clip_norm=1.0, noise_multiplier=0.8,
                  noise_mode="distributed", epsilon=0.5, delta=1e-5)


@pytest.fixture
def registry(tmp_path: Path, key) -> VersionRegistry:
    registry = VersionRegistry(tmp_path, key)
    registry.genesis(SPEC)
    return registry


def new_b(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m.name: rng.normal(size=(m.out_features, 4)).astype(np.float32) for m in MODULES}


def test_genesis_is_a_peft_adapter_with_a_from_the_seed_and_b_zero(registry) -> None:
    genesis = registry.latest()
    assert genesis.number == 0 and genesis.manifest.parent is None
    assert sorted(p.name for p in genesis.folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "manifest.sig"]
    tensors = load_file(genesis.folder / "adapter_model.safetensors")
    for module in MODULES:
        a = tensors[f"base_model.model.{module.name}.lora_A.weight"]
        b = tensors[f"base_model.model.{module.name}.lora_B.weight"]
        np.testing.assert_array_equal(a, frozen_a(1234, module.name, 4, module.in_features))
        assert b.shape == (module.out_features, 4) and not b.any()
    config = json.loads((genesis.folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["target_modules"] == sorted(m.name for m in MODULES)
    manifest = json.loads((genesis.folder / "manifest.json").read_text())
    assert manifest["base_model_sha256"] == BASE_HASH and manifest["frozen_a_seed"] == 1234
    assert manifest["epsilon"] == 0.0 and manifest["round_id"] is None


def test_genesis_is_idempotent_and_refuses_another_spec(registry, tmp_path, key) -> None:
    again = VersionRegistry(tmp_path, key)
    assert again.genesis(SPEC).manifest == registry.get(0).manifest
    other = AdapterSpec("toy-llama", BASE_HASH, MODULES, frozen_a_seed=99, rank=4)
    with pytest.raises(VersionError, match="different genesis"):
        again.genesis(other)


def test_genesis_config_bytes_are_unchanged_without_fan_in_fan_out(registry) -> None:
    """The adapter config of a Linear model's genesis is byte for byte what it always was,
    so an existing data dir's genesis still matches its spec."""
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "toy-llama",
        "r": 4, "lora_alpha": 16.0, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(m.name for m in MODULES), "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False}
    raw = (registry.get(0).folder / "adapter_config.json").read_bytes()
    assert raw == json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()


def test_fan_in_fan_out_reaches_the_adapter_config(tmp_path, key) -> None:
    conv1d = AdapterSpec("toy-gpt2", BASE_HASH, MODULES, frozen_a_seed=1234, rank=4,
                         fan_in_fan_out=True)
    genesis = VersionRegistry(tmp_path, key).genesis(conv1d)
    config = json.loads((genesis.folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        AdapterSpec("m", BASE_HASH, MODULES, frozen_a_seed=0, fan_in_fan_out="yes")  # type: ignore[arg-type]


def test_publish_keeps_a_carries_b_and_records_the_round(registry, key) -> None:
    b = new_b()
    published = registry.publish(b, RELEASE)
    assert published.number == 1 and registry.latest().number == 1
    manifest = versions.verify(published.folder, key.public_key())
    assert (manifest.parent, manifest.round_id, manifest.cohort_size) == (0, 1, 3)
    assert (manifest.clip_norm, manifest.noise_multiplier, manifest.epsilon,
            manifest.delta) == (1.0, 0.8, 0.5, 1e-5)
    a, got_b = published.tensors()
    a0, _ = registry.get(0).tensors()
    for module in MODULES:
        np.testing.assert_array_equal(a[module.name], a0[module.name])
        np.testing.assert_array_equal(got_b[module.name], b[module.name])
    # The configuration is the parent's, byte for byte.
    assert (published.folder / "adapter_config.json").read_bytes() == \
        (registry.get(0).folder / "adapter_config.json").read_bytes()


def test_a_retried_round_returns_its_version_and_a_stale_one_is_refused(registry) -> None:
    first = registry.publish(new_b(), RELEASE)
    assert registry.publish(new_b(), RELEASE) == first
    with pytest.raises(VersionError, match="not newer"):
        registry.publish(new_b(1), RELEASE)
    assert registry.numbers() == [0, 1]


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop(MODULES[0].name), "missing"),
    (lambda b: b.update(extra=np.zeros((2, 4), np.float32)), "unknown"),
    (lambda b: b.update({MODULES[0].name: np.zeros((3, 4), np.float32)}), "shape"),
    (lambda b: b[MODULES[1].name].__setitem__((0, 0), np.nan), "NaN"),
])
def test_publish_refuses_a_b_that_does_not_fit(registry, change, message) -> None:
    b = new_b()
    change(b)
    with pytest.raises(VersionError, match=message):
        registry.publish(b, RELEASE)
    assert registry.numbers() == [0]


def test_publish_before_genesis_is_refused(tmp_path, key) -> None:
    with pytest.raises(VersionError, match="genesis"):
        VersionRegistry(tmp_path, key).publish(new_b(), RELEASE)


def _edit_manifest(folder: Path, **changes) -> bytes:
    fields = json.loads((folder / "manifest.json").read_bytes())
    fields.update(changes)
    raw = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    (folder / "manifest.json").write_bytes(raw)
    return raw


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, message", [
    (lambda f, k: (f / "manifest.sig").unlink(), "unsigned"),
    (lambda f, k: (f / "manifest.json").unlink(), "unsigned"),
    (lambda f, k: _flip_byte(f / "adapter_model.safetensors"), "does not match its sha256"),
    (lambda f, k: _flip_byte(f / "adapter_config.json"), "does not match its sha256"),
    (lambda f, k: _edit_manifest(f, epsilon=0.01), "does not verify"),
    (lambda f, k: _flip_byte(f / "manifest.sig"), "does not verify"),
    (lambda f, k: (f / "notes.txt").write_text("hi"), "not in the manifest"),
    (lambda f, k: (f / "adapter_config.json").unlink(), "missing"),
    # Re-signed by the real key but not canonical: what was signed is not what it says.
    (lambda f, k: (f / "manifest.sig").write_bytes(k.sign(_pretty(f))), "canonical"),
    # Correctly signed, canonical, but listing a file the folder lacks.
    (lambda f, k: _resign(f, k, files={"adapter_config.json": "0" * 64,
                                       "adapter_model.safetensors": "0" * 64,
                                       "extra.bin": "0" * 64}), "malformed"),
])
def test_verify_refuses_unsigned_tampered_and_unlisted(registry, key, tamper, message) -> None:
    folder = registry.publish(new_b(), RELEASE).folder
    tamper(folder, key)
    with pytest.raises(VersionError, match=message):
        versions.verify(folder, key.public_key())
    with pytest.raises(VersionError):
        registry.get(1)


def _pretty(folder: Path) -> bytes:
    raw = json.dumps(json.loads((folder / "manifest.json").read_bytes()), indent=2).encode()
    (folder / "manifest.json").write_bytes(raw)
    return raw


def _resign(folder: Path, key, **changes) -> None:
    (folder / "manifest.sig").write_bytes(key.sign(_edit_manifest(folder, **changes)))


def test_verify_refuses_another_aggregators_signature(registry) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(VersionError, match="does not verify"):
        versions.verify(registry.get(0).folder, stranger)


def test_a_crashed_publication_leaves_no_version_and_is_swept(registry, tmp_path, key,
                                                              monkeypatch) -> None:
    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        registry.publish(new_b(), RELEASE)
    monkeypatch.undo()
    assert registry.numbers() == [0]
    assert [p.name for p in registry.folder.iterdir()] == ["00000000"]
    # A partial folder that a kill -9 left behind is swept at the next start.
    (registry.folder / ".partial-1-dead").mkdir()
    assert [p.name for p in VersionRegistry(tmp_path, key).folder.iterdir()] == ["00000000"]


def test_manifest_is_validated_at_the_edge() -> None:
    fields = dict(version=1, parent=0, base_model_id="m", base_model_sha256=BASE_HASH,
                  frozen_a_seed=1, round_id=1, cohort_size=3, clip_norm=1.0,
                  noise_multiplier=1.0, noise_mode="central", epsilon=1.0, delta=1e-5,
                  files={"adapter_config.json": "0" * 64,
                         "adapter_model.safetensors": "0" * 64})
    Manifest(**fields)
    for change, message in [({"parent": None}, "only genesis"), ({"parent": 1}, "earlier"),
                            ({"epsilon": float("nan")}, "epsilon"),
                            ({"cohort_size": 1}, "cohort_size"),
                            ({"version": 1.5}, "integer"), ({"noise_mode": "x"}, "noise_mode"),
                            ({"format": "fleetmind.version/9"}, "upgrade"),
                            ({"files": {"adapter_config.json": "0" * 64}}, "exactly")]:
        with pytest.raises(ValueError, match=message):
            Manifest(**{**fields, **change})
    with pytest.raises(ValueError, match="64"):
        AdapterSpec("m", "nothex", MODULES, 1)
    with pytest.raises(ValueError, match="dotted module path"):
        TargetModule("model..x", 1, 1)


def test_the_adapter_loads_in_peft_with_a_and_b_as_published(registry) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    published = registry.publish(new_b(), RELEASE)
    loaded = peft.PeftModel.from_pretrained(model, str(published.folder))
    a, b = published.tensors()
    adapted = {name.removeprefix("base_model.model."): module
               for name, module in loaded.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert sorted(adapted) == sorted(m.name for m in MODULES)
    for name, layer in adapted.items():
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), a[name])
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), b[name])
