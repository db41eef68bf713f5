"""The site's gRPC channel to the aggregator: mTLS, or plaintext only to loopback."""

from __future__ import annotations

import grpc

from fleetmind.client.site_config import SiteConfig

__all__ = ["make_channel"]


def make_channel(config: SiteConfig) -> grpc.Channel:
    """A channel to the aggregator: mTLS, or plaintext only to loopback (SiteConfig)."""
    if config.insecure:
        return grpc.insecure_channel(config.aggregator)
    assert config.tls is not None  # SiteConfig requires one of the two
    ca, key, certificate = config.tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=certificate)
    return grpc.secure_channel(config.aggregator, credentials)
