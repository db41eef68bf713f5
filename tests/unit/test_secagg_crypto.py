import contextlib

import numpy as np
import pytest

from fleetmind.aggregation.secagg import crypto


def test_signatures_verify_and_tampering_is_refused() -> None:
    identity = crypto.new_identity()
    public = crypto.identity_public_bytes(identity)
    signature = crypto.sign(identity, b"keys")
    crypto.verify(public, b"keys", signature)
    with pytest.raises(crypto.CryptoError):
        crypto.verify(public, b"keyz", signature)
    with pytest.raises(crypto.CryptoError):
        crypto.verify(public, b"keys", bytes([signature[0] ^ 1]) + signature[1:])
    with pytest.raises(crypto.CryptoError):
        crypto.verify(crypto.identity_public_bytes(crypto.new_identity()), b"keys", signature)


def test_agreement_is_symmetric_and_purpose_bound() -> None:
    alice, bob = crypto.new_agreement_key(), crypto.new_agreement_key()
    bob_public, alice_public = (crypto.agreement_public_bytes(k) for k in (bob, alice))
    assert crypto.agree(alice, bob_public, b"x") == crypto.agree(bob, alice_public, b"x")
    assert crypto.agree(alice, bob_public, b"x") != crypto.agree(alice, bob_public, b"y")
    assert len(crypto.agree(alice, bob_public, b"x")) == 32
    with pytest.raises(crypto.CryptoError):
        crypto.agree(alice, bytes(32), b"x")  # low-order point


def test_aes_gcm_binds_associated_data() -> None:
    key = crypto.random_seed()
    ciphertext = crypto.encrypt(key, b"share", b"round 1")
    assert crypto.decrypt(key, ciphertext, b"round 1") == b"share"
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(key, ciphertext, b"round 2")
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(key, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), b"round 1")


def test_mask_expansion_is_deterministic_and_uniform() -> None:
    seed = crypto.random_seed()
    mask = crypto.expand_mask(seed, 1 << 16)
    assert mask.dtype == np.uint32
    np.testing.assert_array_equal(mask, crypto.expand_mask(seed, 1 << 16))
    assert not np.array_equal(mask, crypto.expand_mask(crypto.random_seed(), 1 << 16))
    # top byte of each word: 256 bins of about 256 each
    counts = np.bincount(mask >> 24, minlength=256)
    assert counts.min() > 150 and counts.max() < 380


def test_short_seeds_refused() -> None:
    with pytest.raises(crypto.CryptoError, match="16 bytes"):
        crypto.expand_mask(bytes(16), 8)


def test_shamir_threshold() -> None:
    secret = crypto.random_seed()
    holders = [3, 5, 8, 13, 21]
    shares = crypto.split_secret(secret, 3, holders)
    assert crypto.combine_shares([shares[5], shares[13], shares[21]], 3) == secret
    assert crypto.combine_shares(list(shares.values()), 3) == secret
    with pytest.raises(crypto.CryptoError, match="need 3"):
        crypto.combine_shares([shares[3], shares[5]], 3)
    # Two shares with a wrong third do not give the secret back (or are refused).
    forged = crypto.Share(8, (shares[8].y + 2**200) % crypto.SHAMIR_PRIME)
    with contextlib.suppress(crypto.CryptoError):
        assert crypto.combine_shares([shares[3], shares[5], forged], 3) != secret


def test_share_bytes_round_trip() -> None:
    share = crypto.split_secret(crypto.random_seed(), 2, [1, 2])[2]
    assert crypto.Share.from_bytes(share.to_bytes()) == share
    with pytest.raises(crypto.CryptoError):
        crypto.Share(0, 1)
