"""What a Flower round may differ by from the plaintext merge (the ring code's rounding)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")


from fleetmind.flower.secure import round_encoding
from fleetmind.flower.settings import FlowerRun
from fleetmind.protos import secagg_codec as codec


def quantisation_bound(run: FlowerRun, contributors: int) -> float:
    """Per coordinate: the decoded delta sum is within n/s of the true one and the weight
    sum within n/s_w of n (quantize.py); the mean, scaled by eta, moves at most this, plus
    one float32 rounding of B (about 0.5 here) on each side."""
    delta_code, weight_code = codec.payload_codes(round_encoding(run, run.sites))
    n = contributors
    low = n - weight_code.sum_error_bound(n)
    return run.server_learning_rate * (delta_code.sum_error_bound(n)
                                       + run.fixed_point_clip * weight_code.sum_error_bound(n)
                                       / low) / low + 2 * float(np.spacing(np.float32(1.0)))
