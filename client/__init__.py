"""The site: session store, scrubber, model loading (any local Hugging Face causal LM with
PEFT), the OPSD distiller, dreaming, outbox, the site's gRPC client and hot-swap.

Never imports `fleetmind.server` (tests/integration/test_boundaries.py guards this).
"""
