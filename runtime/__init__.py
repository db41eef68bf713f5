"""The shared floor: I/O plumbing client and server both use (durable files, the signed
append-only log, config loading, address and key parsing, the metrics endpoint).
Imports neither torch, the client nor the server."""
