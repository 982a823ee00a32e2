"""The `echo` DEMO provider: no upstream, no key. It answers with the text of the last
user message, streamed word by word, and counts words as tokens. It exists so that
`switchboard serve` answers real requests out of the box, and so load tests can
measure the gateway's own cost. It is not a model.

Channel options: `delay_ms` (pause before each streamed word, default 0).
Image requests return a 1×1 PNG (as b64_json, or as a data: URL for `url`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator

from pydantic import Field

from switchboard.core.config import Num, ProviderOptions, ProviderSpec
from switchboard.core.providers.base import ProviderClient, message_text
from switchboard.v1 import inference_pb2 as pb

_PNG_1x1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
            "hKmMIQAAAABJRU5ErkJggg==")
_WORDS = re.compile(r"\S+\s*")


class Options(ProviderOptions):
    """Channel `options` of `provider: echo`."""

    delay_ms: Num = Field(default=0.0, description="pause before each streamed word, milliseconds")


def reply_text(params: pb.ChatCompletionParams) -> str:
    for m in reversed(params.messages):
        if m.role == pb.ROLE_USER:
            return message_text(m) or "(no text)"
    return "(no user message)"


def count_tokens(text: str) -> int:
    return len(text.split())


def usage_for(params: pb.ChatCompletionParams, completion: str) -> pb.Usage:
    prompt = sum(count_tokens(message_text(m)) for m in params.messages)
    done = count_tokens(completion)
    return pb.Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


class EchoClient(ProviderClient):
    supports_images = True

    async def chat(self, params: pb.ChatCompletionParams,
                   model: str) -> pb.CreateChatCompletionResponse:
        text = reply_text(params)
        n = params.n if params.HasField("n") else 1
        r = pb.CreateChatCompletionResponse(id=f"chatcmpl-echo-{time.monotonic_ns()}",
                                            created=int(time.time()), model=model)
        for i in range(n):
            r.choices.add(index=i, message=pb.AssistantMessage(content=text),
                          finish_reason=pb.FINISH_REASON_STOP)
        r.usage.CopyFrom(usage_for(params, text * n if n > 1 else text))
        return r

    async def stream(self, params: pb.ChatCompletionParams,
                     model: str) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        text = reply_text(params)
        delay = Options.of(self.channel).delay_ms / 1000.0
        cid, created = f"chatcmpl-echo-{time.monotonic_ns()}", int(time.time())
        first = True
        for word in _WORDS.findall(text) or [""]:
            if delay:
                await asyncio.sleep(delay)
            chunk = pb.StreamChatCompletionResponse(id=cid, created=created, model=model)
            delta = chunk.choices.add(index=0).delta
            if first:
                delta.role = pb.ROLE_ASSISTANT
                first = False
            delta.content = word
            yield chunk
        last = pb.StreamChatCompletionResponse(id=cid, created=created, model=model)
        last.choices.add(index=0, finish_reason=pb.FINISH_REASON_STOP)
        last.usage.CopyFrom(usage_for(params, text))
        yield last

    async def create_image(self, req: pb.CreateImageRequest, model: str) -> pb.CreateImageResponse:
        r = pb.CreateImageResponse(created=int(time.time()))
        for _ in range(req.n if req.HasField("n") else 1):
            if req.response_format == "b64_json":
                r.data.add(b64_json=_PNG_1x1, revised_prompt=req.prompt)
            else:
                r.data.add(url=f"data:image/png;base64,{_PNG_1x1}", revised_prompt=req.prompt)
        return r


SPEC = ProviderSpec(name="echo", default_base_url="", options=Options, client=EchoClient,
                    upstream=False)
