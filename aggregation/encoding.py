"""How a round's payload is encoded for secure aggregation: the fixed-point codes derived
from the round's clip, noise and cohort. Policy, so it lives here; `protos/` only maps
the fields that carry it."""

from __future__ import annotations

from typing import cast

import numpy as np

from fleetmind.aggregation.dp import (
    NOISE_TAIL_SIGMAS,
    DPConfig,
    NoiseMode,
    PrivacyUnit,
    distributed_noise,
    noise_for_site,
)
from fleetmind.aggregation.merge import secagg_payload
from fleetmind.aggregation.quantize import FixedPoint

# A site's aggregation weight is its staleness weight 1/sqrt(1+tau) <= 1 (merge.staleness_weight).
WEIGHT_CLIP = 1.0


def encoding_codes(clip_norm: float, noise_multiplier: float, noise_mode: str,
                   privacy_unit: str, expected_cohort: int, fixed_point_clip: float,
                   cohort_max: int, ring_bits: int) -> tuple[FixedPoint, FixedPoint]:
    """The two fixed-point codes of a round's payload (merge.secagg_payload): the weighted
    delta's, with ring headroom for `cohort_max` sites and, in distributed mode, for each
    site's share of the integer noise; and the weight's. Raises ValueError."""
    # The unit and mode come off the wire as text; DPConfig refuses any other value.
    dp = DPConfig(clip_norm, noise_multiplier, cast(PrivacyUnit, privacy_unit),
                  cast(NoiseMode, noise_mode), expected_cohort)
    noise_bound = NOISE_TAIL_SIGMAS * dp.site_noise_stddev if dp.mode == "distributed" else 0.0
    return (FixedPoint(fixed_point_clip, cohort_max, ring_bits, noise_bound),
            FixedPoint(WEIGHT_CLIP, cohort_max, ring_bits))


def site_payload(weighted_delta: np.ndarray, weight: float, delta_code: FixedPoint,
                 weight_code: FixedPoint, noise: DPConfig | None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """A site's ring words for the round: its flat weighted delta (w * dB, sorted-name
    order) and weight, with the site's share of the round's noise (`noise`, None: none):
    distributed, drawn as integers in the ring of `delta_code`; local, the full Gaussian
    on the delta; central, none here. The site agent on the fleet's wire and the Flower
    ClientApp both encode with this, so the same update makes the same words."""
    integer_noise = None
    if noise is not None and noise.mode == "distributed":
        integer_noise = distributed_noise(noise, delta_code, weighted_delta.size, rng)
    elif noise is not None:
        weighted_delta = noise_for_site(weighted_delta, noise, rng)
    return secagg_payload(weighted_delta, weight, delta_code, weight_code, rng, integer_noise)
