"""Switchboard core: the gRPC routing service (config, auth, routing, providers, usage)."""
