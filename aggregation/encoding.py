"""How a round's payload is encoded for secure aggregation: the fixed-point codes derived
from the round's clip, noise and cohort. Policy, so it lives here; `protos/` only maps
the fields that carry it."""

from __future__ import annotations

from typing import cast

from fleetmind.aggregation.dp import NOISE_TAIL_SIGMAS, DPConfig, NoiseMode, PrivacyUnit
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
