"""`fleetmind server ...`: the aggregator operator's commands.

`add_server_commands` plugs into the program's subparsers (fleetmind.cli.main registers it).
Bad input is reported as the program expects of every group: `argparse.ArgumentError(None,
message)`, which its `main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK


def _usage(error: Exception) -> argparse.ArgumentError:
    return argparse.ArgumentError(None, str(error))


def add_server_commands(commands: Any) -> None:
    server = commands.add_parser("server", help="the aggregator: rounds, versions, ledger",
                                 description="Commands an aggregator operator runs.")
    sub = server.add_subparsers(dest="action", required=True, metavar="ACTION",
                                parser_class=type(server))

    run = sub.add_parser(
        "run", help="serve the fleet over gRPC",
        description="Run the aggregator: Fleet, Models and Audit services, health and "
                    "reflection. With --config FILE (TOML or JSON; see fleetmind.server.config)"
                    " for deployments under mTLS; or, for development, --insecure --listen "
                    "127.0.0.1:PORT --data DIR (plaintext, loopback only).")
    run.add_argument("--config", type=Path, help="TOML or JSON config file")
    run.add_argument("--listen", help="host:port (default 127.0.0.1:7443; port 0: any free)")
    run.add_argument("--data", type=Path, help="data folder (dev mode, without --config)")
    run.add_argument("--insecure", action="store_true",
                     help="plaintext gRPC; refused on any non-loopback address")
    run.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics over HTTP here (overrides the config's "
                          "metrics_listen; default: none)")
    run.set_defaults(run=_server_run)

    adapter = sub.add_parser(
        "adapter", help="write the genesis [adapter] table from a local model folder",
        description="Write the aggregator's genesis adapter (base model id and sha256, "
                    "modules and shapes, rank, alpha, frozen-A seed, fan_in_fan_out) from a "
                    "local Hugging Face model folder, for a config's adapter_file. Reading a "
                    "model needs the client extra (torch, transformers, peft); it runs as a "
                    "process of its own, so the aggregator never imports them.")
    adapter.add_argument("--model", type=Path, required=True, metavar="DIR",
                         help="the base model's local Hugging Face folder")
    adapter.add_argument("--out", type=Path, required=True, metavar="FILE",
                         help="where to write the [adapter] table (.toml, or .json)")
    adapter.add_argument("--rank", type=int, default=DEFAULT_RANK,
                         help=f"LoRA rank (default {DEFAULT_RANK})")
    adapter.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                         help=f"LoRA alpha (default {DEFAULT_ALPHA:g})")
    adapter.add_argument("--targets", default="mlp",
                         help="mlp (default), peft (PEFT's default for the family), "
                              "all-linear, or comma-separated module names")
    adapter.add_argument("--seed", type=int, default=0,
                         help="the public seed every site derives the frozen A from "
                              "(default 0)")
    adapter.add_argument("--base-model-id", "--id", dest="base_model_id",
                         help="the base model's name in manifests (default: the folder's "
                              "name)")
    adapter.set_defaults(run=_server_adapter)

    key = sub.add_parser(
        "key", help="print the aggregator's public signing key",
        description="Print the Ed25519 public key that signs every version and ledger entry "
                    "(64 hex digits), creating the signing key in DIR if there is none yet. "
                    "Sites pin it: put it in their aggregator_key file.")
    key.add_argument("--data", type=Path, required=True, metavar="DIR",
                     help="the aggregator's data folder (its config's data_dir)")
    key.add_argument("--out", type=Path, help="also write the hex key to this file")
    key.set_defaults(run=_server_key)

    certs = sub.add_parser("certs", help="create the fleet's CA and certificates",
                           description="Create a CA, the aggregator's TLS certificate and "
                                       "site certificates (ECDSA P-256). Keys are written "
                                       "0600; existing files are never overwritten.")
    kinds = certs.add_subparsers(dest="kind", required=True, metavar="KIND",
                                 parser_class=type(server))
    ca = kinds.add_parser("ca", help="a new certificate authority: OUT/ca.crt, OUT/ca.key")
    ca.add_argument("--out", type=Path, required=True)
    ca.add_argument("--name", default="fleetmind CA", help="the CA's common name")
    ca.set_defaults(run=_certs_ca)
    aggregator = kinds.add_parser("server", help="the aggregator's certificate, signed by the CA")
    aggregator.add_argument("--ca", type=Path, required=True, help="folder with ca.crt, ca.key")
    aggregator.add_argument("--host", action="append", required=True,
                            help="an address sites dial (IP or DNS name); repeat for more")
    aggregator.add_argument("--out", type=Path, required=True)
    aggregator.add_argument("--name", default="aggregator", help="file name stem")
    aggregator.set_defaults(run=_certs_server)
    site = kinds.add_parser("site", help="a site's client certificate, signed by the CA")
    site.add_argument("site_name", help="the site's name (the certificate's common name)")
    site.add_argument("--ca", type=Path, required=True, help="folder with ca.crt, ca.key")
    site.add_argument("--out", type=Path, required=True)
    site.set_defaults(run=_certs_site)


def _config(args: argparse.Namespace):
    from fleetmind.server.config import ConfigError, ServerConfig, load_config

    if args.config is not None:
        if args.data is not None or args.insecure:
            raise ConfigError("--config already says where data lives and how to listen; "
                              "drop --data/--insecure (or run without --config)")
        config = load_config(args.config)
        if args.listen:
            config = replace(config, listen=args.listen)
        if args.metrics_listen:
            config = replace(config, metrics_listen=args.metrics_listen)
        return config
    if args.data is None:
        raise ConfigError("give --config FILE, or --data DIR (with --insecure on a loopback "
                          "address) for development")
    return ServerConfig(data_dir=args.data, listen=args.listen or "127.0.0.1:7443",
                        insecure=args.insecure, metrics_listen=args.metrics_listen)


def _server_run(args: argparse.Namespace) -> int:
    from fleetmind.server.config import ConfigError
    from fleetmind.server.service import serve

    try:
        config = _config(args)
        running = serve(config)
    except (ConfigError, OSError, ValueError) as error:
        raise _usage(error) from None
    # The handler goes in before the line that says the aggregator is up: a supervisor
    # may stop it as soon as it reads that line.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    mode = "mTLS" if config.tls is not None else "PLAINTEXT (development, loopback only)"
    metrics = running.metrics_endpoint
    print(f"fleetmind aggregator on {running.address} ({mode}); data in {config.data_dir}; "
          f"latest version {running.coordinator.registry.numbers()[-1]}"
          + (f"; metrics on {metrics.url}" if metrics else ""), flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it like SIGTERM does
        stopping.wait()
    running.stop(grace=5.0)
    return 0


# What reading a model folder needs: the client extra. Named as strings and looked up, never
# imported: the aggregator's image has none of them.
CLIENT_EXTRA = ("torch", "transformers", "peft")
ADAPTER_SPEC_MODULE = "fleetmind.client.adapter_spec"


def _server_adapter(args: argparse.Namespace) -> int:
    """Runs `python -m fleetmind.client.adapter_spec` with the same options."""
    missing = [name for name in CLIENT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise argparse.ArgumentError(None, f"server adapter needs the client extra: pip install "
                                           f"'fleetmind[client]' (missing: {', '.join(missing)})"
                                           "; or run it where the model and the client are, "
                                           "and copy the file to the aggregator")
    command = [sys.executable, "-m", ADAPTER_SPEC_MODULE, "--model", str(args.model),
               "--out", str(args.out), "--rank", str(args.rank), "--alpha", str(args.alpha),
               "--targets", args.targets, "--seed", str(args.seed)]
    if args.base_model_id:
        command += ["--id", args.base_model_id]
    # Its line naming what it wrote goes straight through; an error comes back as ours.
    done = subprocess.run(command, check=False, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise argparse.ArgumentError(None, last.split(" error: ", 1)[-1])
    sys.stderr.write(done.stderr)
    return 0


def _server_key(args: argparse.Namespace) -> int:
    from fleetmind.server import identity
    from fleetmind.server.service import SIGNING_KEY

    try:
        key = identity.load_or_create_signing_key(args.data / SIGNING_KEY)
        text = identity.public_key_bytes(key).hex()
        if args.out is not None:
            args.out.write_text(text + "\n")
    except (OSError, ValueError) as error:
        raise _usage(error) from None
    print(text)
    return 0


def _load_ca(folder: Path):
    from fleetmind.server import identity

    return identity.Credentials.load(folder, "ca")


def _certs_ca(args: argparse.Namespace) -> int:
    from fleetmind.server import identity

    try:
        cert, key = identity.create_ca(args.name).save(args.out, "ca")
    except (FileExistsError, ValueError) as error:
        raise _usage(error) from None
    print(f"CA certificate {cert}\nCA key {key} (keep it offline; it admits sites)")
    return 0


def _certs_server(args: argparse.Namespace) -> int:
    from fleetmind.server import identity

    try:
        cert, key = identity.issue_server(_load_ca(args.ca), args.host).save(args.out, args.name)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as error:
        raise _usage(error) from None
    print(f"aggregator certificate {cert} for {', '.join(args.host)}\nkey {key}")
    return 0


def _certs_site(args: argparse.Namespace) -> int:
    from fleetmind.server import identity

    try:
        credentials = identity.issue_site(_load_ca(args.ca), args.site_name)
        cert, key = credentials.save(args.out, args.site_name)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as error:
        raise _usage(error) from None
    print(f"site certificate {cert}\nkey {key}")
    return 0
