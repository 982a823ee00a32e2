"""Switchboard façade: the OpenAI REST/SSE surface, translated to the core's RPCs."""
