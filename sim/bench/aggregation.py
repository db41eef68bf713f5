"""`fleetmind bench aggregation`: plain-sum throughput, secure aggregation against Flower
1.42's SecAgg+ primitives, and merge exactness against FedIT.

- sum: the server's running sum (ServerMaskedInputCollection.receive on 32-bit masked
  vectors) of N updates of P parameters, in GB/s of update bytes ingested, as a ratio to
  `np.copyto` of the same P (memcpy). Updates cycle through a pool of distinct buffers
  larger than the last-level cache, so every byte comes from memory.
- secagg: one whole round, all sites in this process, for each cohort and dropout rate
  (sites dropping after sharing keys, the case that costs the server most), ours and
  Flower's on the same vector length, neighbour count k and threshold t. Flower's round
  is its own primitives (flwr.common.secure_aggregation and flwr.supercore.primitives)
  called in the order its secaggplus_mod and SecAggPlusWorkflow call them, without the
  message plumbing. *_seconds = mean site time (all phases) + server time. Bytes: each
  site's uploads, as a ratio to sending its P parameters as plain 16-bit values.
- exactness: 8 sites; relative Frobenius error of the merged weight delta against the
  mean of the sites' B_i·A_i, for the frozen-A merge and for FedIT.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from fleetmind.aggregation.merge import FedAvg, exact_merge, fedit_baseline_merge
from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.secagg import (
    Dropouts,
    NeighbourGraph,
    RoundConfig,
    ServerCompleted,
    crypto,
    majority_threshold,
    run_round,
    secagg_plus_degree,
)
from fleetmind.aggregation.secagg.messages import MaskedInput
from fleetmind.aggregation.secagg.server_r2_masked_input_collection import (
    ServerMaskedInputCollection,
)

POOL_BYTES = 256 * 2**20  # distinct update buffers: well past any cache
# The graph is sized for a 2^-5 chance of a failed round (the library default is 2^-20):
# Flower's Shamir (pycryptodome, GF(2^128) in Python) costs O(t^2) per 16-byte chunk, and
# at 256 sites with 30% dropouts the default k = 196 would keep it busy for most of an
# hour. Both sides use the same k and t; graph and dropouts are seeded.
BENCH_FAILURE_LOG2 = 5

T = TypeVar("T")


def _best_of(repeats: int, work) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def bench_sum(updates: int, parameters: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 2**32, parameters, dtype=np.uint32)
            for _ in range(max(2, POOL_BYTES // (4 * parameters)))]
    messages = [MaskedInput(0, site, pool[site % len(pool)]) for site in range(1, updates + 1)]
    identities = {site: bytes(32) for site in range(1, updates + 1)}

    def server_sum() -> None:
        config = RoundConfig(0, NeighbourGraph.full(range(1, 4)), 2, 2, parameters, 32,
                             dict.fromkeys(range(1, 4), bytes(32)))
        collection = ServerMaskedInputCollection(config, identities, {})
        for message in messages:
            collection.receive(message)

    seconds = _best_of(repeats, server_sum)
    destination = np.empty_like(pool[0])
    def copy_all() -> None:
        for i in range(updates):
            np.copyto(destination, pool[i % len(pool)])

    copy_seconds = _best_of(repeats, copy_all)
    gbps = updates * parameters * 4 / seconds / 1e9
    memcpy_gbps = updates * parameters * 4 / copy_seconds / 1e9
    return {"updates": updates, "parameters": parameters, "gbps": gbps,
            "memcpy_gbps": memcpy_gbps, "ratio_to_memcpy": gbps / memcpy_gbps}


def _ours_round(cohort: int, dropout: float, parameters: int, degree: int,
                threshold: int) -> dict[str, Any]:
    identities = {site: crypto.new_identity() for site in range(1, cohort + 1)}
    graph = NeighbourGraph.harary(identities, degree, seed=cohort)
    config = RoundConfig(1, graph, threshold, 2, parameters + 1, 24,
                         {s: crypto.identity_public_bytes(k) for s, k in identities.items()})
    # 16-bit values plus headroom for the cohort: a 24-bit ring up to 256 sites.
    delta_code = FixedPoint(clip=1.0, cohort_max=cohort, ring_bits=24)
    rng = np.random.default_rng(cohort)
    values = {site: rng.uniform(-1, 1, parameters + 1) for site in identities}
    ring = {site: delta_code.encode(v, rng) for site, v in values.items()}
    dropped = frozenset(range(1, round(dropout * cohort) + 1))
    report = run_round(config, identities, ring, Dropouts({"masked_input": dropped}))
    assert isinstance(report.result, ServerCompleted), report.result
    plain = sum(values[s] for s in report.result.contributors)
    error = np.abs(delta_code.decode_sum(report.result.cohort_sum) - plain).max()
    assert error <= delta_code.sum_error_bound(len(report.result.contributors))
    site_seconds = float(np.mean(list(report.site_seconds.values())))
    site_bytes = float(np.mean([report.site_bytes_sent[s] for s in report.result.contributors]))
    return {"site_seconds": site_seconds, "server_seconds": report.server_seconds,
            "bytes_per_site": site_bytes}


def _flower_round(cohort: int, dropout: float, parameters: int, degree: int,
                  threshold: int) -> dict[str, Any]:
    """Flower 1.42 SecAgg+ on the same sizes: its primitives, its order of calls."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    clipping_range, target_range, mod_range = 8.0, 2**22, 2**32  # Flower's defaults
    sites = list(range(1, cohort + 1))
    graph = NeighbourGraph.harary(sites, degree, seed=cohort)
    share_holders = {s: sorted(graph.neighbours[s] | {s}) for s in sites}  # Flower: self too
    site_seconds = dict.fromkeys(sites, 0.0)
    site_bytes = dict.fromkeys(sites, 0)
    rng = np.random.default_rng(cohort)
    inputs = {s: [rng.uniform(-1, 1, parameters).astype(np.float32)] for s in sites}
    dropped = set(range(1, round(dropout * cohort) + 1))

    def timed(site: int, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = work()
        site_seconds[site] += time.perf_counter() - start
        return out

    keys = {}
    for s in sites:  # stage 0: setup
        def setup():
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            return (private_key_to_bytes(sk1), public_key_to_bytes(pk1),
                    private_key_to_bytes(sk2), public_key_to_bytes(pk2))
        keys[s] = timed(s, setup)
        site_bytes[s] += len(keys[s][1]) + len(keys[s][3])

    seeds: dict[int, bytes] = {}
    held: dict[int, dict[int, tuple[bytes, bytes]]] = {s: {} for s in sites}
    inbox: dict[int, list[tuple[int, bytes]]] = {s: [] for s in sites}
    for s in sites:  # stage 1: share keys
        def share(s=s):
            seed = os.urandom(32)
            b_shares = create_shares(seed, threshold, len(share_holders[s]))
            sk1_shares = create_shares(keys[s][0], threshold, len(share_holders[s]))
            out = []
            for index, holder in enumerate(share_holders[s]):
                if holder == s:
                    held[s][s] = (b_shares[index], sk1_shares[index])
                    continue
                shared = generate_shared_key(bytes_to_private_key(keys[s][2]),
                                             bytes_to_public_key(keys[holder][3]))
                out.append((holder, encrypt(shared, share_keys_plaintext_concat(
                    s, holder, b_shares[index], sk1_shares[index]))))
            return seed, out
        seeds[s], ciphertexts = timed(s, share)
        for holder, ciphertext in ciphertexts:
            inbox[holder].append((s, ciphertext))
            site_bytes[s] += len(ciphertext) + 8

    masked_sum: list[np.ndarray] | None = None
    server_seconds = 0.0
    survivors = [s for s in sites if s not in dropped]
    for s in survivors:  # stage 2: collect masked vectors
        def mask(s=s):
            for src, ciphertext in inbox[s]:
                shared = generate_shared_key(bytes_to_private_key(keys[s][2]),
                                             bytes_to_public_key(keys[src][3]))
                _, _, b_share, sk1_share = share_keys_plaintext_separate(
                    decrypt(shared, ciphertext))
                held[s][src] = (b_share, sk1_share)
            # Flower annotates float64 inputs; it quantizes float32 alike.
            quantized = factor_combine(target_range, quantize(cast(Any, inputs[s]),
                                                              clipping_range, target_range))
            shapes = [a.shape for a in quantized]
            quantized = parameters_addition(quantized, pseudo_rand_gen(seeds[s], mod_range,
                                                                       shapes))
            for peer in sorted(graph.neighbours[s]):
                shared = generate_shared_key(bytes_to_private_key(keys[s][0]),
                                             bytes_to_public_key(keys[peer][1]))
                pairwise = pseudo_rand_gen(shared, mod_range, shapes)
                combine = parameters_addition if s > peer else parameters_subtraction
                quantized = combine(quantized, pairwise)
            return parameters_mod(quantized, mod_range)
        masked = timed(s, mask)
        site_bytes[s] += sum(len(ndarray_to_bytes(a)) for a in masked)
        start = time.perf_counter()
        masked_sum = masked if masked_sum is None else parameters_addition(masked_sum, masked)
        server_seconds += time.perf_counter() - start

    collected: dict[int, list[bytes]] = {s: [] for s in sites}
    for s in survivors:  # stage 3: unmask, site side
        def unmask(s: int = s) -> list[tuple[int, bytes]]:
            return ([(owner, held[s][owner][0]) for owner in held[s] if owner not in dropped]
                    + [(owner, held[s][owner][1]) for owner in held[s] if owner in dropped])
        for owner, key_share in timed(s, unmask):
            collected[owner].append(key_share)
            site_bytes[s] += len(key_share) + 8

    start = time.perf_counter()  # stage 3: unmask, server side
    assert masked_sum is not None, "the cohort has no surviving site"
    vector = parameters_mod(masked_sum, mod_range)
    shapes = [a.shape for a in vector]
    for owner, shares in collected.items():
        secret = combine_shares(shares)
        if owner not in dropped:
            vector = parameters_subtraction(vector, pseudo_rand_gen(secret, mod_range, shapes))
            continue
        for peer in sorted(graph.neighbours[owner] - dropped):
            shared = generate_shared_key(bytes_to_private_key(secret),
                                         bytes_to_public_key(keys[peer][1]))
            pairwise = pseudo_rand_gen(shared, mod_range, shapes)
            combine = parameters_addition if owner > peer else parameters_subtraction
            vector = combine(vector, pairwise)
    vector = parameters_mod(vector, mod_range)
    _, vector = factor_extract(vector)
    total = dequantize(vector, clipping_range, target_range)[0] - (
        len(survivors) - 1) * clipping_range
    server_seconds += time.perf_counter() - start
    plain = sum(inputs[s][0].astype(np.float64) for s in survivors)
    assert np.abs(total - plain).max() < 1e-3 * len(survivors), "Flower's sum is wrong"
    return {"site_seconds": float(np.mean(list(site_seconds.values()))),
            "server_seconds": server_seconds,
            "bytes_per_site": float(np.mean([site_bytes[s] for s in survivors]))}


def bench_secagg(cohort: int, dropout: float, parameters: int) -> dict[str, Any]:
    # The same neighbour count and threshold for both: what tolerates this dropout rate.
    degree = secagg_plus_degree(cohort, max(dropout, 0.1), BENCH_FAILURE_LOG2)
    threshold = majority_threshold(min(degree, cohort - 1))
    ours = _ours_round(cohort, dropout, parameters, degree, threshold)
    flower = _flower_round(cohort, dropout, parameters, degree, threshold)
    plain16 = 2 * parameters
    return {
        "cohort": cohort, "dropout": dropout, "parameters": parameters,
        "neighbours": min(degree, cohort - 1), "threshold": threshold,
        "ours_seconds": ours["site_seconds"] + ours["server_seconds"],
        "flower_seconds": flower["site_seconds"] + flower["server_seconds"],
        "ours_site_seconds": ours["site_seconds"], "ours_server_seconds": ours["server_seconds"],
        "flower_site_seconds": flower["site_seconds"],
        "flower_server_seconds": flower["server_seconds"],
        "bytes_ratio_to_plain16": ours["bytes_per_site"] / plain16,
        "flower_bytes_ratio_to_plain16": flower["bytes_per_site"] / plain16,
    }


def bench_exactness(sites: int = 8, rank: int = 16, d_in: int = 512, d_out: int = 512) -> dict:
    rng = np.random.default_rng(0)
    frozen_a = (rng.normal(size=(rank, d_in)) / math.sqrt(d_in)).astype(np.float32)
    b_deltas = [rng.normal(0, 0.02, (d_out, rank)).astype(np.float32) for _ in range(sites)]
    # fleetmind: A frozen and shared, only B trained; merge B by the exact rule.
    weighted = {"m": np.asarray(np.sum(b_deltas, axis=0, dtype=np.float64))}
    merged, _ = exact_merge({"m": np.zeros((d_out, rank), np.float32)}, weighted, float(sites),
                            FedAvg(1.0))
    target = np.mean([b.astype(np.float64) @ frozen_a for b in b_deltas], axis=0)
    ours = merged["m"].astype(np.float64) @ frozen_a
    ours_error = np.linalg.norm(ours - target) / np.linalg.norm(target)
    # FedIT: every site trains its own A_i and B_i; A and B averaged separately.
    factors_a = [(frozen_a + rng.normal(0, 0.5, frozen_a.shape) / math.sqrt(d_in))
                 for _ in range(sites)]
    target_fedit = np.mean([b @ a for b, a in zip(b_deltas, factors_a, strict=True)], axis=0)
    mean_a, mean_b = fedit_baseline_merge(factors_a, b_deltas)
    fedit_error = np.linalg.norm(mean_b @ mean_a - target_fedit) / np.linalg.norm(target_fedit)
    return {"sites": sites, "rank": rank, "ours_rel_error": float(ours_error),
            "fedit_rel_error": float(fedit_error)}


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """Measure everything, write out/aggregation.json, print the table, return the dict."""
    sum_sizes = ([(10, 2**20), (100, 2**20)] if quick else
                 [(n, p) for p in (2**20, 2**23) for n in (10, 100, 1000)])
    cohorts = (16, 64) if quick else (16, 64, 256)
    secagg_parameters = 2**12 if quick else 2**16
    result = {
        "sum": [bench_sum(n, p, repeats=2 if quick else 3) for n, p in sum_sizes],
        "secagg": [bench_secagg(c, d, secagg_parameters) for c in cohorts for d in (0.0, 0.3)],
        "exactness": bench_exactness(),
        "quick": quick,
        "cpus": os.cpu_count(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "aggregation.png")
    print_table(result)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """Secure-aggregation time and bytes, ours against Flower's, by cohort and dropout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["secagg"]
    labels = [f"{r['cohort']} sites\n{r['dropout']:.0%} drop" for r in rows]
    x = np.arange(len(rows))
    figure, (seconds, size) = plt.subplots(1, 2, figsize=(11, 3.8))
    seconds.bar(x - 0.2, [r["ours_seconds"] for r in rows], 0.4, label="fleetmind")
    seconds.bar(x + 0.2, [r["flower_seconds"] for r in rows], 0.4, label="Flower 1.42")
    seconds.set_yscale("log")
    seconds.set_ylabel("seconds (site mean + server)")
    size.bar(x - 0.2, [r["bytes_ratio_to_plain16"] for r in rows], 0.4, label="fleetmind")
    size.bar(x + 0.2, [r["flower_bytes_ratio_to_plain16"] for r in rows], 0.4,
             label="Flower 1.42")
    size.axhline(1.73, color="grey", linestyle="--", linewidth=1, label="target 1.73")
    size.set_ylabel("bytes / plaintext 16-bit")
    for axis in (seconds, size):
        axis.set_xticks(x, labels, fontsize=8)
        axis.legend(fontsize=8)
    figure.suptitle(f"SecAgg+, {rows[0]['parameters']:,} parameters per site")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sums = Table("updates", "parameters", "GB/s", "memcpy GB/s", "ratio (target >= 0.5)",
                 title="plain sum: server running sum vs memcpy")
    for row in result["sum"]:
        sums.add_row(str(row["updates"]), f"{row['parameters']:,}", f"{row['gbps']:.2f}",
                     f"{row['memcpy_gbps']:.2f}", f"{row['ratio_to_memcpy']:.2f}")
    console.print(sums)
    secagg = Table("cohort", "dropout", "k / t", "ours s", "Flower s",
                   "Flower / ours (target >= 1)", "bytes / plain16 (target <= 1.73)",
                   "Flower bytes / plain16",
                   title=f"secure aggregation, {result['secagg'][0]['parameters']:,} parameters")
    for row in result["secagg"]:
        secagg.add_row(str(row["cohort"]), f"{row['dropout']:.0%}",
                       f"{row['neighbours']} / {row['threshold']}",
                       f"{row['ours_seconds']:.3f}", f"{row['flower_seconds']:.3f}",
                       f"{row['flower_seconds'] / row['ours_seconds']:.1f}x",
                       f"{row['bytes_ratio_to_plain16']:.2f}",
                       f"{row['flower_bytes_ratio_to_plain16']:.2f}")
    console.print(secagg)
    exact = result["exactness"]
    console.print(f"exactness ({exact['sites']} sites, rank {exact['rank']}): relative error "
                  f"of the merged delta, fleetmind {exact['ours_rel_error']:.2e}, "
                  f"FedIT {exact['fedit_rel_error']:.2f}")
