import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    """The committed (or cached) toy base model; a test run never rebuilds it."""
    from fleetmind.sim.basemodel import toy_model_path

    return toy_model_path(build=False)


@pytest.fixture(scope="session")
def toy_model(toy_model_dir):
    from fleetmind.client.model import load_model

    return load_model(toy_model_dir)
