"""Pure math on updates: the update format, the exact frozen-A LoRA merge, quantisation,
secure aggregation as transport-free state machines, DP clipping/noise and the accountant.

No I/O, no torch, no grpc, and no import of `fleetmind.client` or `fleetmind.server`
(tests/integration/test_boundaries.py guards this).

    update      Update, UpdateMetadata: the site's B deltas, validated, to/from safetensors
    merge       exact frozen-A merge, FedAvg/FedAdam, staleness weights, secagg payloads,
                and the FedIT baseline (benchmark only)
    frozen_a    the frozen A factor from the public seed
    quantize    FixedPoint: stochastic rounding into Z_2^b with cohort headroom
    secagg/     SecAgg+: crypto, neighbour graph, one module per site/server phase
    dp          clipping per privacy unit, discrete Gaussian and Gaussian noise
    accountant  epsilon(delta) on dp-accounting (RDP, PLD), and the Budget
    manifest    the signed global version's manifest: canonical bytes and verification,
                shared by the aggregator that signs and the sites that verify
    identity_proof  the bytes a site signs to prove it holds its identity key at enrolment
    chain       hash-chained, Ed25519-signed logs (hashing, sealing, verify_chain), shared
                by the aggregator's ledger and the site's outbox
    records     what those logs hold (OutboxRecord, ForgetRecord, RoundRecord,
                StoppedRound) and each log's check (verify_outbox, verify_ledger), shared
                by the side that writes it and the auditor
"""
