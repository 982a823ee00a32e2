"""Fake upstreams on loopback, each speaking one provider's real wire format."""
