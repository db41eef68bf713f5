"""Tampering with signed bytes."""


def flip_last_bit(data: bytes) -> bytes:
    """`data` with its last bit flipped: a hash, signature or chunk that no longer verifies."""
    return data[:-1] + bytes([data[-1] ^ 1])
