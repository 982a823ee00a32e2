"""Wire schemas: one module per external JSON format, owning both directions.

Each module here translates one wire format to and from the contract's messages
(`switchboard.v1`), in both directions, so the inbound surface that speaks the format
and the upstream provider that speaks it share one set of tables and one codec:

- `openai`: OpenAI's Chat Completions, Images and Models objects, used by the REST
  façade (client JSON → proto, proto → client JSON) and by `core/providers/openai.py`
  (proto → upstream JSON, upstream JSON → proto).

The next formats get sibling modules (`anthropic`, `gemini`, `openai_responses`, …).
This package is a leaf layer: it imports only the generated contract, `core/errors.py`
and `core/bounds.py` (plus its own `check` helpers), never the façade, the router, the
gateway or a provider, so both sides can depend on it.
"""
