"""Switchboard, an LLM gateway: switchboard.core (the routing core), switchboard.facade
(the REST surfaces), switchboard.v1 (the generated gRPC stubs), switchboard.client."""
