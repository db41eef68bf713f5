import json
import struct

import numpy as np
import pytest

from fleetmind.aggregation.update import Update, UpdateError, UpdateMetadata

SHAPES = {"layers.0.q_proj.lora_B": (16, 4), "layers.0.v_proj.lora_B": (16, 4)}


def make_update(**metadata) -> Update:
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    fields = {"site": "site-a", "base_version": 3} | metadata
    return Update(tensors, UpdateMetadata(**fields))


def test_round_trip_keeps_tensors_and_metadata() -> None:
    update = make_update(weight=0.5, staleness=2, sessions=7, tokens=1234, seed=99)
    back = Update.from_bytes(update.to_bytes())
    assert back.metadata == update.metadata
    assert set(back.tensors) == set(SHAPES)
    for name in SHAPES:
        assert back.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(back.tensors[name], update.tensors[name])


def test_blob_is_plain_safetensors_with_json_metadata() -> None:
    blob = make_update().to_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    assert json.loads(header["__metadata__"]["fleetmind.update"])["site"] == "site-a"
    assert header["layers.0.q_proj.lora_B"]["dtype"] == "F32"


def test_validation_accepts_matching_shapes() -> None:
    make_update().validate_against(SHAPES, max_parameters=128)


@pytest.mark.parametrize("shapes, names", [
    ({**SHAPES, "layers.1.q_proj.lora_B": (16, 4)}, "layers.1.q_proj.lora_B"),
    ({"layers.0.q_proj.lora_B": (16, 4)}, "layers.0.v_proj.lora_B"),
    ({**SHAPES, "layers.0.v_proj.lora_B": (16, 8)}, "'layers.0.v_proj.lora_B' has shape"),
])
def test_validation_names_the_offending_tensor(shapes, names) -> None:
    with pytest.raises(UpdateError, match=names.replace(".", r"\.").replace("(", r"\(")):
        make_update().validate_against(shapes)


def test_size_limit() -> None:
    with pytest.raises(UpdateError, match="128 parameters, limit 100"):
        make_update().validate_against(SHAPES, max_parameters=100)
    blob = make_update().to_bytes()
    with pytest.raises(UpdateError, match="limit 100"):
        Update.from_bytes(blob, max_bytes=100)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_with_name(bad) -> None:
    tensor = np.zeros((16, 4), np.float32)
    tensor[3, 1] = bad
    with pytest.raises(UpdateError, match=r"'m\.lora_B' has 1 non-finite"):
        Update({"m.lora_B": tensor}, UpdateMetadata("s", 0))


def test_wrong_dtype_refused() -> None:
    with pytest.raises(UpdateError, match="'m' must be a float32"):
        Update({"m": np.zeros(3, np.float64)}, UpdateMetadata("s", 0))


def test_tensors_are_read_only_copies() -> None:
    source = np.zeros(3, np.float32)
    update = Update({"m": source}, UpdateMetadata("s", 0))
    source[0] = 1
    assert update.tensors["m"][0] == 0
    with pytest.raises(ValueError):
        update.tensors["m"][0] = 2


@pytest.mark.parametrize("fields, message", [
    ({"site": ""}, "site"),
    ({"base_version": -1}, "base_version"),
    ({"weight": 0.0}, "weight"),
    ({"weight": float("nan")}, "weight"),
    ({"staleness": 1.5}, "staleness"),
])
def test_metadata_validated(fields, message) -> None:
    with pytest.raises(UpdateError, match=message):
        UpdateMetadata(**({"site": "s", "base_version": 0} | fields))


@pytest.mark.parametrize("blob", [b"", b"garbage-bytes", struct.pack("<Q", 2) + b"{}"])
def test_garbage_refused(blob) -> None:
    with pytest.raises(UpdateError):
        Update.from_bytes(blob)


def test_safetensors_without_our_metadata_refused() -> None:
    import safetensors.numpy

    blob = safetensors.numpy.save({"m": np.zeros(2, np.float32)})
    with pytest.raises(UpdateError, match=r"fleetmind\.update"):
        Update.from_bytes(blob)
