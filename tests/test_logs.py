"""Logs: one structured JSON line per request with the fields operators need, and no
secret anywhere — keys planted in requests, in the config and in upstream error
bodies are all masked, in log lines and in the errors clients receive."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import openai
import orjson
import pytest
from aiohttp import web

from switchboard.core.config import load_config_text
from switchboard.core.logs import REDACTED, Redactor, config_secrets, make_handler, setup_logging
from switchboard.core.store.base import new_secret
from switchboard.v1 import inference_pb2 as pb
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import AUTH, TEST_KEY, channel_yaml, make_config, running_stack

ADMIN_KEY = "sk-admin-planted-7f3e9a1c55"
UPSTREAM_KEY = "upstream-secret-leaky"  # channel_yaml names it upstream-secret-<channel>


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, through the production handler."""
    buf = io.StringIO()
    handler = make_handler("json", buf)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buf
    finally:
        root.removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def access(buf: io.StringIO) -> list[dict]:
    return [x for x in lines(buf) if x["logger"] == "switchboard.access"]


async def test_one_json_line_per_request_with_its_fields(captured: io.StringIO) -> None:
    fake = FakeOpenAI()
    url = await fake.start()
    cfg = make_config("channels:\n" + channel_yaml("oa", "openai", url, ["gpt-4o"]))
    async with running_stack(cfg) as stack:
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
        stream = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-request-id": "req-log-test-1"})
        async for _ in stream.parse():
            pass
        await client.close()
        await stack.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(model="gpt-4o", messages=[
                pb.Message(role=pb.ROLE_USER, text="yo")])), metadata=AUTH)
    await fake.close()
    recs = access(captured)
    assert len(recs) == 2
    rest = next(r for r in recs if r["surface"] == "rest")
    assert rest["request_id"] == "req-log-test-1"
    assert rest["key_name"] == "test" and rest["model"] == "gpt-4o" and rest["channel"] == "oa"
    assert rest["status"] == "OK" and rest["stream"] is True
    assert rest["prompt_tokens"] == 11 and rest["completion_tokens"] == 7
    assert rest["latency_ms"] >= 0 and rest["ttft_ms"] is not None and rest["attempts"] == 1
    assert {"ts", "level", "msg"} <= set(rest)
    grpc_line = next(r for r in recs if r["surface"] == "grpc")
    assert grpc_line["request_id"].startswith("req_") and grpc_line["stream"] is False
    assert TEST_KEY not in captured.getvalue()


async def _leaky_upstream() -> tuple[web.AppRunner, str]:
    """An upstream that quotes back the credentials it was sent, as real ones sometimes do."""
    async def chat(request: web.Request) -> web.Response:
        auth = request.headers.get("authorization", "")
        return web.json_response({"error": {
            "message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')} "
                       f"(header was {auth!r})", "type": "invalid_request_error"}}, status=401)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_secrets_never_reach_logs_or_clients(captured: io.StringIO) -> None:
    runner, url = await _leaky_upstream()
    cfg = make_config(f"admin_key: {ADMIN_KEY}\nrouter: {{max_attempts: 1}}\n"
                      "channels:\n" + channel_yaml("leaky", "openai", url, ["gpt-4o"]))
    setup_logging(cfg, captured)  # what the CLI does: the production handler on root
    try:
        async with running_stack(cfg) as stack:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY, max_retries=0)
            # 1. upstream error body quoting the upstream key
            with pytest.raises(openai.APIStatusError) as exc:
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": f"my key is {TEST_KEY}"}])
            client_error = exc.value.response.text
            # 2. a key planted in a request: a wrong key that looks like a key
            bad = openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-planted-wrong-key-0042",
                                     max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
            await bad.close()
            await client.close()
            # 3. the config itself, and an exception whose traceback carries a secret
            log = logging.getLogger("switchboard.test")
            log.warning("loaded config %r", cfg)
            try:
                raise RuntimeError(f"upstream said Bearer {UPSTREAM_KEY} and admin {ADMIN_KEY}")
            except RuntimeError:
                log.exception("boom with %s", TEST_KEY)
            log.info("request", extra={"headers": {"authorization": f"Bearer {TEST_KEY}",
                                                   "x-api-key": UPSTREAM_KEY}})
    finally:
        setup_logging(make_config(""), io.StringIO())
        logging.getLogger().handlers.clear()
    out = captured.getvalue()
    for secret in (TEST_KEY, UPSTREAM_KEY, ADMIN_KEY, "sk-planted-wrong-key-0042"):
        assert secret not in out, secret
        assert secret not in client_error, secret
    assert REDACTED in out and REDACTED.lower() in client_error.lower()
    recs = access(captured)
    failed = next(r for r in recs if r["status"] == "UNAVAILABLE")
    assert failed["key_name"] == "test" and failed["channel"] == ""
    assert "Incorrect API key provided" in failed["error"]
    await runner.cleanup()


def test_redactor_masks_known_and_shaped_secrets() -> None:
    cfg = load_config_text(
        "admin_key: ${A}\nkeys: [{name: k, key: ${K}}]\nchannels:\n"
        "  - {name: c, provider: openai, api_key: ${U}, models: [m], headers: {x-extra: ${H}}}\n",
        "<t>", env={"A": "admin-aaaaaaaa", "K": "client-kkkkkkkk", "U": "up-uuuuuuuu",
                    "H": "hdr-hhhhhhhh"})
    assert set(config_secrets(cfg)) == {"admin-aaaaaaaa", "client-kkkkkkkk", "up-uuuuuuuu",
                                        "hdr-hhhhhhhh"}
    r = Redactor(config_secrets(cfg))
    text = ("a admin-aaaaaaaa b client-kkkkkkkk c up-uuuuuuuu d hdr-hhhhhhhh "
            "Authorization: Bearer some.jwt-ish_token== key sk-proj-abcdefghijklmnop "
            "https://x/v1?key=AIzaSyA1234567890abcdefghijklmnop&alt=sse "
            '{"api_key": "zzzzzzzzzz"} x-goog-api-key: qqqqqqqqqq')
    red = r.redact(text)
    for s in ("admin-aaaaaaaa", "client-kkkkkkkk", "up-uuuuuuuu", "hdr-hhhhhhhh", "some.jwt-ish",
              "sk-proj-abcdefghijklmnop", "AIzaSyA123", "zzzzzzzzzz", "qqqqqqqqqq"):
        assert s not in red, (s, red)
    assert "&alt=sse" in red  # only the secret goes
    minted = new_secret()  # keys the admin API creates are not in any config
    assert minted not in r.redact(f"lookup failed for {minted}")
    assert r.redact("nothing secret here: gpt-4o, req_123") == "nothing secret here: gpt-4o, req_123"


def test_redactor_masks_credentials_not_the_auth_scheme_or_placeholders() -> None:
    r = Redactor()
    hint = "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
    assert r.redact(hint) == hint
    assert r.redact("api_key: <your key>") == "api_key: <your key>"
    for secret, text in (("opaque-token-123", "Authorization: Bearer opaque-token-123"),
                         ("opaque-token-123", '{"authorization": "bearer opaque-token-123"}'),
                         ("dXNlcjpwYXNzd29yZA", "authorization: Basic dXNlcjpwYXNzd29yZA=="),
                         ("plainvalue99", "Authorization=plainvalue99"),
                         ("sk-abcdefghijklmnop", "sent Bearer sk-abcdefghijklmnop upstream")):
        red = r.redact(text)
        assert secret not in red and REDACTED in red, (text, red)
    assert r.redact("Authorization: Bearer opaque-token-123") == f"Authorization: Bearer {REDACTED}"


def test_text_format() -> None:
    buf = io.StringIO()
    handler = make_handler("text", buf)
    log = logging.getLogger("switchboard.texttest")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("request", extra={"request_id": "r1", "status": "OK"})
    finally:
        log.removeHandler(handler)
    assert "INFO switchboard.texttest request request_id=r1 status=OK" in buf.getvalue()


async def test_handlers_installed_by_someone_else_are_redacted_too() -> None:
    """An embedding application (or pytest) set up its own handler: starting the gateway
    puts the redaction filter on it."""
    buf = io.StringIO()
    foreign = logging.StreamHandler(buf)
    foreign.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(foreign)
    try:
        cfg = make_config(f"admin_key: {ADMIN_KEY}\nchannels:\n  - {{name: e, provider: echo, models: [echo]}}")
        async with running_stack(cfg):
            logging.getLogger("switchboard.test").warning("admin %s client %s", ADMIN_KEY, TEST_KEY)
    finally:
        root.removeHandler(foreign)
    out = buf.getvalue()
    assert "admin [REDACTED] client [REDACTED]" in out
    assert ADMIN_KEY not in out and TEST_KEY not in out


async def test_access_log_can_be_switched_off() -> None:
    buf = io.StringIO()
    cfg = make_config("observability: {access_log: false, log_format: text}\n"
                      "channels:\n  - {name: e, provider: echo, models: [echo]}")
    setup_logging(cfg, buf)
    try:
        async with running_stack(cfg) as stack:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=TEST_KEY)
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
            await client.close()
    finally:
        setup_logging(make_config(""), io.StringIO())
        logging.getLogger().handlers.clear()
    assert "switchboard.access" not in buf.getvalue()
    assert "INFO switchboard" in buf.getvalue()  # other lines still come, as text
