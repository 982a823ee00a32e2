"""Micro-benchmark of the per-chunk translation on the streaming hot path.

`python -m bench.chunk_codec [N]` times, over N (default 100,000) chunks, the two steps
every streamed token takes through the OpenAI schema (core/schema/openai.py): upstream
chunk JSON → proto (the provider's `chunk_from_wire`, the schema's `chunk_from_json`
under the provider's error policy) and proto → client JSON (`chunk_to_json` +
orjson.dumps, in the façade's SSE relay). Prints µs per chunk, the best of 5 rounds of
CPU time (process_time: time spent waiting for a core while other processes run is not
counted; the least disturbed round wins).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import orjson

from switchboard.core.providers.openai import chunk_from_wire
from switchboard.core.schema.openai import chunk_to_json

# A typical content token, as OpenAI sends it (parsed: the SSE reader's work is not timed).
WIRE = orjson.loads(b'{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1733300000,'
                    b'"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_50cad350e4",'
                    b'"choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,'
                    b'"finish_reason":null}]}')


def best_us(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    proto = chunk_from_wire(WIRE)
    dumps = orjson.dumps
    up = best_us(lambda: chunk_from_wire(WIRE), n)
    down = best_us(lambda: dumps(chunk_to_json(proto, True)), n)
    print(f"chunks={n} from_json={up:.3f}us to_json+dumps={down:.3f}us total={up + down:.3f}us")


if __name__ == "__main__":
    main()
