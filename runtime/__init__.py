"""The shared floor: I/O plumbing client and server both use, once. Imports neither torch,
the client nor the server (tests/integration/test_boundaries.py).

    durable           atomic_write, write_synced, fsync_dir: files that survive kill -9
    signed_log        SignedLog (the outbox's and the ledger's SQLite), read_log, canonical_json
    layout            OUTBOX_FILE, LEDGER_FILE, VERSIONS; verify_folder (a version folder on disk)
    config            load_document (TOML or JSON, FLEETMIND_* overrides), ConfigError
    addresses         split_host_port, join_host_port, is_loopback
    keys              public_key_bytes (raw, hex, PEM), private_key_from_bytes, read_key_file
    metrics_endpoint  serve_registry, MetricsEndpoint: Prometheus /metrics over HTTP
    tls               TlsFiles: the CA, certificate and key a site or an auditor dials with
"""
