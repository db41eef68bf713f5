"""Where an audit's evidence comes from: keys, the stored logs, the aggregator's Audit service.

The auditor holds no private key and must change nothing it reads, so the logs are read
with a read-only SQLite connection (`read_log`) rather than through `Ledger`/`Outbox`, which take
the owner's signing key and open their file for appending (creating it when absent). What
is read is only handed on: every check is the shared code the sides check with
(`aggregation.records` for the logs, `runtime.layout` for version folders), never a side's
own. Parsing keys and addresses, and reading a log read-only, are fleetmind.runtime's,
shared with the sites and the aggregator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# The shared parsers (fleetmind.runtime): the auditor accepts exactly the key files a
# site's `aggregator_key` setting does, and refuses plaintext off this machine just as a
# site does. The read-only reader of a signed log is the log's own module's.
from fleetmind.aggregation.chain import ChainEntry
from fleetmind.runtime.addresses import is_loopback, split_host_port
from fleetmind.runtime.keys import public_key_bytes, read_key_file
from fleetmind.runtime.signed_log import LogError, read_log
from fleetmind.runtime.tls import TlsFiles

if TYPE_CHECKING:
    import grpc

__all__ = ["LogError", "Tls", "aggregator_key", "audit_channel", "fetch_budget", "fetch_ledger",
           "ledger_from_aggregator", "read_log", "site_key"]


def aggregator_key(path: Path) -> bytes:
    """The aggregator's Ed25519 public key as 32 raw bytes, from a file holding it raw, as
    64 hex digits or as PEM (what a site's `aggregator_key` accepts). Raises ValueError."""
    return public_key_bytes(read_key_file(path, "aggregator key"), str(path))


def site_key(path: Path) -> bytes:
    """A site's Ed25519 public key as 32 raw bytes: from its public key (raw, hex, PEM), or
    from the site's PEM identity key, of which only the public half is kept (the operator
    auditing their own site holds that file, not a separate public key)."""
    return public_key_bytes(read_key_file(path, "site key"), str(path), private_ok=True)


# mTLS to the aggregator, as a site has it: the fleet CA, a certificate and its key.
Tls = TlsFiles


def audit_channel(address: str, *, insecure: bool = False, tls: Tls | None = None
                  ) -> grpc.Channel:
    """A channel to the aggregator: mTLS, or plaintext only to a loopback address (the rule
    sites follow). Raises ValueError naming what is missing or refused."""
    import grpc

    host, _ = split_host_port(address, "--server", any_port=False)
    if insecure and tls is not None:
        raise ValueError("both --insecure and --ca/--cert/--key given: pick one (mTLS for any "
                         "real aggregator)")
    if insecure:
        if not is_loopback(host):
            raise ValueError(f"plaintext refused to {address}: --insecure is only for a "
                             "loopback aggregator (127.0.0.1, ::1, localhost); pass --ca, "
                             "--cert and --key")
        return grpc.insecure_channel(address)
    if tls is None:
        raise ValueError(f"no credentials for {address}: pass --ca, --cert and --key (a "
                         "certificate the fleet's CA issued), or --insecure for a loopback "
                         "aggregator")
    ca, key, certificate = tls.read({"ca_certificate": "--ca", "certificate": "--cert",
                                     "private_key": "--key"})
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=certificate)
    return grpc.secure_channel(address, credentials)


def fetch_ledger(channel: grpc.Channel, timeout: float = 60.0) -> list[ChainEntry]:
    """The whole ledger from the aggregator's Audit service, as the exact bytes it hashed
    and signed; nothing it says about them is trusted until `audit_ledger` checks them."""
    from fleetmind.protos.fleetmind.v1 import audit_pb2, audit_pb2_grpc

    stream = audit_pb2_grpc.AuditStub(channel).StreamLedger(
        audit_pb2.StreamLedgerRequest(from_index=0, follow=False), timeout=timeout)
    return [ChainEntry(entry.index, entry.prev_hash, entry.body, entry.hash, entry.signature)
            for entry in stream]


def fetch_budget(channel: grpc.Channel, timeout: float = 10.0) -> dict[str, Any]:
    """The aggregator's word on its privacy budget (unsigned: shown beside the ledger's
    signed totals, never instead of them)."""
    from fleetmind.protos.fleetmind.v1 import audit_pb2, audit_pb2_grpc

    reply = audit_pb2_grpc.AuditStub(channel).Budget(audit_pb2.BudgetRequest(),
                                                     timeout=timeout)
    return {"epsilon_spent": reply.epsilon_spent, "epsilon_budget": reply.epsilon_budget,
            "delta": reply.delta, "rounds": reply.rounds, "accountant": reply.accountant}


def ledger_from_aggregator(channel: grpc.Channel, address: str, timeout: float
                           ) -> tuple[list[ChainEntry], dict[str, Any] | None]:
    """The ledger from the aggregator at `address`, and its unsigned budget status (None
    when it does not answer that: the budget is only shown beside the ledger). Raises
    ValueError when the ledger itself cannot be read."""
    import grpc

    try:
        entries = fetch_ledger(channel, timeout=timeout)
    except grpc.RpcError as error:
        raise ValueError(f"the aggregator at {address} did not answer the ledger request "
                         f"({error.code().name}: {error.details()})") from None
    try:
        budget = fetch_budget(channel, timeout=timeout)
    except grpc.RpcError:
        budget = None  # unsigned and only shown beside the ledger: its absence is no break
    return entries, budget
