"""Smoke: the harness runs the real stack, in both deployments, against the OpenAI fake."""

from __future__ import annotations

import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import TEST_KEY, channel_yaml, make_config, running_stack


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "split"])
async def test_chat_through_both_deployments(split: bool) -> None:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config("channels:\n" + channel_yaml("oa", "openai", url, ["gpt-4o"]))
    async with running_stack(cfg, split=split) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
        r = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
        assert r.choices[0].message.content == "You said: hello"
        await client.close()
    await fake.close()
