"""Each protocol state alone, driven by plain messages: what it accepts, what it refuses
(tampered signatures, wrong rounds, replays), and that a refusal changes no state."""

import dataclasses

import numpy as np
import pytest

from fleetmind.aggregation.secagg import (
    DropReason,
    NeighbourGraph,
    ProtocolError,
    RoundConfig,
    ServerAborted,
    ServerAdvertiseKeys,
    ServerCompleted,
    SiteAdvertiseKeys,
    crypto,
)
from fleetmind.aggregation.secagg.messages import (
    MaskedInput,
    SharesForSite,
    UnmaskRequest,
    pack_ring,
    unpack_ring,
)
from fleetmind.aggregation.secagg.site_r1_share_keys import SiteShareKeys
from fleetmind.aggregation.secagg.site_r3_unmasking import SiteUnmasking

COHORT = 5
LENGTH = 16


def make_config(round_id: int = 1, identities=None, min_cohort: int = 3):
    identities = identities or {s: crypto.new_identity() for s in range(1, COHORT + 1)}
    config = RoundConfig(round_id, NeighbourGraph.full(identities), threshold=3,
                         min_cohort=min_cohort, vector_length=LENGTH, ring_bits=32,
                         identities={s: crypto.identity_public_bytes(k)
                                     for s, k in identities.items()})
    return config, identities


class Round:
    """A cohort driven phase by phase, so each test can stop and poke one state."""

    def __init__(self, round_id: int = 1, identities=None, min_cohort: int = 3) -> None:
        self.config, self.identities = make_config(round_id, identities, min_cohort)
        self.server = ServerAdvertiseKeys(self.config)
        self.sites = {s: SiteAdvertiseKeys(self.config, s, k) for s, k in self.identities.items()}
        self.inputs = {s: np.full(LENGTH, s * 1000, np.uint32) for s in self.identities}

    def advertise(self):
        for site in self.sites.values():
            self.server.receive(site.advertisement)
        self.server = self.server.close()
        self.sites = {s: site.receive(self.server.to_sites[s]) for s, site in self.sites.items()}

    def share(self):
        for site in self.sites.values():
            self.server.receive(site.encrypted_shares)
        self.server = self.server.close()
        self.sites = {s: site.receive(self.server.to_sites[s]) for s, site in self.sites.items()}

    def mask(self, skip=()):
        unmasking = {}
        for s, site in self.sites.items():
            if s in skip:
                continue
            masked, unmasking[s] = site.mask(self.inputs[s])
            self.server.receive(masked)
        self.server = self.server.close()
        self.sites = unmasking

    def unmask(self):
        for site in self.sites.values():
            self.server.receive(site.respond(self.server.request))
        return self.server.close()


def refused(kind: str, call, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    assert caught.value.kind == kind, str(caught.value)
    return caught.value


# --- round 0: advertise keys -------------------------------------------------------------

def test_server_advertise_keys_accepts_signed_and_refuses_the_rest() -> None:
    cohort = Round()
    advertisement = cohort.sites[1].advertisement
    tampered = dataclasses.replace(advertisement, mask_key=crypto.agreement_public_bytes(
        crypto.new_agreement_key()))
    refused("bad_signature", cohort.server.receive, tampered)
    refused("wrong_round", cohort.server.receive, dataclasses.replace(advertisement, round_id=2))
    assert cohort.server.advertisements == {}  # refusals change nothing
    cohort.server.receive(advertisement)
    refused("replay", cohort.server.receive, advertisement)
    # Keys for site 2, signed by a key that is not site 2's enrolled identity.
    keys = cohort.sites[2].advertisement
    stranger = crypto.sign(crypto.new_identity(), keys.signed_bytes(
        1, 2, keys.mask_key, keys.share_key))
    refused("bad_signature", cohort.server.receive,
            dataclasses.replace(keys, signature=stranger))
    assert set(cohort.server.advertisements) == {1}


def test_site_refuses_keys_the_server_substituted() -> None:
    cohort = Round()
    for site in cohort.sites.values():
        cohort.server.receive(site.advertisement)
    cohort.server = cohort.server.close()
    keys = cohort.server.to_sites[1]
    forged = dataclasses.replace(keys.advertisements[0], share_key=crypto.agreement_public_bytes(
        crypto.new_agreement_key()))
    refused("bad_signature", cohort.sites[1].receive,
            dataclasses.replace(keys, advertisements=(forged, *keys.advertisements[1:])))
    refused("replay", cohort.sites[1].receive, dataclasses.replace(
        keys, advertisements=(keys.advertisements[0], *keys.advertisements)))
    refused("wrong_round", cohort.sites[1].receive, dataclasses.replace(keys, round_id=9))
    refused("below_threshold", cohort.sites[1].receive,
            dataclasses.replace(keys, advertisements=keys.advertisements[:2]))
    cohort.sites[1].receive(keys)


def test_server_aborts_when_too_few_advertise() -> None:
    cohort = Round()
    cohort.server.receive(cohort.sites[1].advertisement)
    cohort.server.receive(cohort.sites[2].advertisement)
    result = cohort.server.close()
    assert isinstance(result, ServerAborted) and "2 sites advertised" in result.reason
    assert (result.phase, result.drop_reason) == ("advertise_keys", DropReason.BELOW_MIN_COHORT)
    assert result.pending() == frozenset()


# --- round 1: share keys -----------------------------------------------------------------

def test_server_share_keys_routes_and_refuses_replays() -> None:
    cohort = Round()
    cohort.advertise()
    message = cohort.sites[1].encrypted_shares
    assert {share.recipient for share in message.shares} == {2, 3, 4, 5}
    refused("wrong_round", cohort.server.receive, dataclasses.replace(message, round_id=0))
    refused("malformed", cohort.server.receive,
            dataclasses.replace(message, shares=message.shares[:-1]))
    cohort.server.receive(message)
    refused("replay", cohort.server.receive, message)
    for site in list(cohort.sites.values())[1:]:
        cohort.server.receive(site.encrypted_shares)
    collection = cohort.server.close()
    assert {share.sender for share in collection.to_sites[3].shares} == {1, 2, 4, 5}


def test_site_refuses_replayed_tampered_and_misdirected_shares() -> None:
    cohort = Round()
    cohort.advertise()
    for site in cohort.sites.values():
        cohort.server.receive(site.encrypted_shares)
    cohort.server = cohort.server.close()
    bundle = cohort.server.to_sites[2]
    refused("replay", cohort.sites[2].receive,
            dataclasses.replace(bundle, shares=(*bundle.shares, bundle.shares[0])))
    first = bundle.shares[0]
    flipped = dataclasses.replace(first, ciphertext=first.ciphertext[:-1]
                                  + bytes([first.ciphertext[-1] ^ 1]))
    refused("bad_signature", cohort.sites[2].receive,
            dataclasses.replace(bundle, shares=(flipped, *bundle.shares[1:])))
    refused("malformed", cohort.sites[3].receive, bundle)  # someone else's shares
    refused("wrong_round", cohort.sites[2].receive, dataclasses.replace(bundle, round_id=3))
    cohort.sites[2].receive(bundle)


def test_shares_replayed_from_an_earlier_round_are_refused() -> None:
    earlier = Round(round_id=1)
    earlier.advertise()
    for site in earlier.sites.values():
        earlier.server.receive(site.encrypted_shares)
    old_bundle = earlier.server.close().to_sites[2]
    later = Round(round_id=2, identities=earlier.identities)
    later.advertise()
    replay = SharesForSite(2, 2, old_bundle.shares)  # relabelled for the new round
    refused("bad_signature", later.sites[2].receive, replay)


# --- round 2: masked input ---------------------------------------------------------------

def test_masked_input_collection_keeps_only_a_running_sum() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    masked, _ = cohort.sites[1].mask(cohort.inputs[1])
    assert not np.array_equal(masked.masked_vector, cohort.inputs[1])
    refused("wrong_round", cohort.server.receive, dataclasses.replace(masked, round_id=5))
    refused("malformed", cohort.server.receive,
            MaskedInput(1, 1, np.zeros(LENGTH + 1, np.uint32)))
    cohort.server.receive(masked)
    refused("replay", cohort.server.receive, masked)
    # With one input in, the server's only vector is that input plus masks: noise.
    vectors = [v for v in vars(cohort.server).values() if isinstance(v, np.ndarray)]
    assert len(vectors) == 1
    assert not np.array_equal(vectors[0], cohort.inputs[1])
    refused("replay", cohort.sites[1].mask, cohort.inputs[1])  # same masks twice: refused


def test_site_refuses_wrong_length_input() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    with pytest.raises(ValueError, match="shape"):
        cohort.sites[1].mask(np.zeros(LENGTH + 1, np.uint32))


# --- round 3: unmasking ------------------------------------------------------------------

def test_unmasking_with_one_site_dropped_after_sharing() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    cohort.mask(skip={5})
    assert cohort.server.request.dropped == {5}
    result = cohort.unmask()
    assert isinstance(result, ServerCompleted)
    assert result.contributors == {1, 2, 3, 4}
    np.testing.assert_array_equal(result.cohort_sum, np.full(LENGTH, 10_000, np.uint32))


def test_sites_resumed_between_phases_complete_the_round_unchanged() -> None:
    """A site that keeps only what each state exposes (a Flower node between messages)
    resumes it, draws nothing new and ends the round with the same sum."""
    cohort = Round()
    advertised = {s: site.advertisement for s, site in cohort.sites.items()}
    cohort.sites = {s: SiteAdvertiseKeys.resume(site.config, s, site.keys, site.advertisement)
                    for s, site in cohort.sites.items()}
    assert {s: site.advertisement for s, site in cohort.sites.items()} == advertised
    cohort.advertise()
    for site in cohort.sites.values():
        cohort.server.receive(site.encrypted_shares)
    cohort.server = cohort.server.close()
    resumed = {s: SiteShareKeys.resume(site.config, s, site.keys, site.peers,
                                       site.self_mask_seed)
               for s, site in cohort.sites.items()}
    assert not any(hasattr(site, "encrypted_shares") for site in resumed.values())
    cohort.sites = {s: site.receive(cohort.server.to_sites[s]) for s, site in resumed.items()}
    cohort.mask(skip={5})
    cohort.sites = {s: SiteUnmasking(site.config, s, site.held)
                    for s, site in cohort.sites.items()}
    result = cohort.unmask()
    assert isinstance(result, ServerCompleted) and result.contributors == {1, 2, 3, 4}
    np.testing.assert_array_equal(result.cohort_sum, np.full(LENGTH, 10_000, np.uint32))


def test_site_never_gives_both_shares_of_one_site() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    cohort.mask(skip={5})
    request = cohort.server.request
    site = cohort.sites[1]
    refused("inconsistent", site.respond,
            UnmaskRequest(1, request.survivors | {5}, request.dropped))
    refused("inconsistent", site.respond,
            UnmaskRequest(1, request.survivors - {1}, request.dropped | {1}))
    refused("wrong_round", site.respond, dataclasses.replace(request, round_id=4))
    answer = site.respond(request)
    assert set(answer.self_mask_shares) == {2, 3, 4} and set(answer.mask_key_shares) == {5}
    refused("replay", site.respond, request)
    cohort.server.receive(answer)
    refused("replay", cohort.server.receive, answer)


def test_site_refuses_to_unmask_below_the_minimum_cohort() -> None:
    cohort = Round(min_cohort=3)
    cohort.advertise()
    cohort.share()
    cohort.mask()
    refused("below_threshold", cohort.sites[1].respond, UnmaskRequest(1, frozenset({1, 2}),
                                                                      frozenset({3, 4, 5})))


def test_server_aborts_without_enough_shares() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    cohort.mask()
    for site in (1, 2):  # threshold is 3
        cohort.server.receive(cohort.sites[site].respond(cohort.server.request))
    result = cohort.server.close()
    assert isinstance(result, ServerAborted) and "fewer than 3 shares" in result.reason
    assert (result.phase, result.drop_reason) == ("unmasking", DropReason.TOO_FEW_SHARES)


def test_corrupted_mask_key_share_is_detected() -> None:
    cohort = Round()
    cohort.advertise()
    cohort.share()
    cohort.mask(skip={5})
    for number, site in enumerate(cohort.sites.values()):
        answer = site.respond(cohort.server.request)
        if number == 0:
            share = answer.mask_key_shares[5]
            answer = dataclasses.replace(answer, mask_key_shares={
                5: crypto.Share(share.x, (share.y + 2**200) % crypto.SHAMIR_PRIME)})
        cohort.server.receive(answer)
    result = cohort.server.close()
    assert isinstance(result, ServerAborted)
    assert result.drop_reason is DropReason.MASKS_NOT_REMOVABLE


@pytest.mark.parametrize("ring_bits", [16, 24, 32])
def test_ring_packing_round_trip(ring_bits) -> None:
    vector = np.random.default_rng(0).integers(0, 2**ring_bits, 1001, dtype=np.uint32)
    packed = pack_ring(vector, ring_bits)
    assert len(packed) == 1001 * ring_bits // 8
    np.testing.assert_array_equal(unpack_ring(packed, ring_bits), vector)


def test_config_validated() -> None:
    config, _ = make_config()
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(config, threshold=5)
    with pytest.raises(ValueError, match="min_cohort"):
        dataclasses.replace(config, min_cohort=1)
    with pytest.raises(ValueError, match="ring_bits"):
        dataclasses.replace(config, ring_bits=20)


def test_every_server_state_answers_whom_it_still_waits_for() -> None:
    """fcp's NumberOfPendingClients: each state says who it waits for, so a caller never
    asks which state it holds."""
    cohort = Round()
    everyone = frozenset(cohort.sites)
    assert cohort.server.pending() == everyone
    cohort.server.receive(cohort.sites[1].advertisement)
    assert cohort.server.pending() == everyone - {1}
    for s in sorted(everyone - {1}):
        cohort.server.receive(cohort.sites[s].advertisement)
    assert cohort.server.pending() == frozenset()
    cohort.server = cohort.server.close()
    cohort.sites = {s: site.receive(cohort.server.to_sites[s])
                    for s, site in cohort.sites.items()}
    assert cohort.server.pending() == everyone  # share keys
    cohort.share()
    assert cohort.server.pending() == everyone  # masked input collection
    cohort.mask(skip={5})
    assert cohort.server.pending() == everyone - {5}  # unmasking: the survivors
    result = cohort.unmask()
    assert isinstance(result, ServerCompleted) and result.pending() == frozenset()
