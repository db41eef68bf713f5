"""The two-module adapter that protocol tests aggregate: small enough to check sums by hand,
with the privacy policy those tests run under."""

from fleetmind.server.config import PrivacyPolicy
from fleetmind.server.versions import AdapterSpec, TargetModule

MODULES = (TargetModule("model.layers.0.mlp.gate_proj", 8, 12),
           TargetModule("model.layers.0.mlp.down_proj", 12, 8))
SPEC = AdapterSpec("toy", "cd" * 32, MODULES, frozen_a_seed=7, rank=2)
# B of each module: (out_features, rank).
SHAPES = {m.name: (m.out_features, 2) for m in MODULES}
PRIVACY = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0,
                        fixed_point_clip=1.0)
