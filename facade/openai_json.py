"""The façade's own OpenAI JSON: error bodies.

Every other OpenAI object (chat requests, replies, chunks, images, models) in both
directions belongs to the OpenAI wire schema, core/schema/openai.py, which the OpenAI
provider shares; the façade imports it directly.
"""

from __future__ import annotations

import orjson

from switchboard.core.errors import GatewayError


def error_json(err: GatewayError) -> bytes:
    return orjson.dumps(err.openai_body())
