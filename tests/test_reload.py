"""Config reload: channels, keys and routes change without dropping in-flight streams;
a bad config is rejected and the old one keeps serving; SIGHUP does it for the real
CLI process; `switchboard check-config` validates a file."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from switchboard.core.config import ConfigError, load_config
from tests.harness import running_stack

KEY_A = "sk-reload-key-a-123456"
KEY_B = "sk-reload-key-b-654321"


def write_config(path: Path, *, model: str, key: str, delay_ms: int = 0, extra: str = "") -> None:
    path.write_text(
        "shutdown_grace_s: 1\n"
        f"keys: [{{name: k, key: {key}}}]\n"
        "channels:\n"
        f"  - {{name: ch-{model}, provider: echo, models: [{model}], options: {{delay_ms: {delay_ms}}}}}\n"
        + extra)


async def chat(base_url: str, key: str, model: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(
            base_url + "/chat/completions", headers={"authorization": f"Bearer {key}"},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
        return r.status


async def open_stream(base_url: str, key: str, model: str, text: str) -> tuple[aiohttp.ClientSession,
                                                                                  aiohttp.ClientResponse]:
    s = aiohttp.ClientSession()
    r = await s.post(base_url + "/chat/completions", headers={"authorization": f"Bearer {key}"},
                     json={"model": model, "stream": True,
                           "messages": [{"role": "user", "content": text}]})
    assert r.status == 200
    await r.content.readline()  # the first event has arrived: the stream is in flight
    return s, r


async def finish_stream(s: aiohttp.ClientSession, r: aiohttp.ClientResponse) -> bytes:
    try:
        return await r.content.read()
    finally:
        r.release()
        await s.close()


async def test_reload_swaps_channels_keys_routes_without_dropping_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "sb.yaml"
    write_config(path, model="m1", key=KEY_A, delay_ms=60)
    async with running_stack(load_config(path)) as stack:
        s, r = await open_stream(stack.base_url, KEY_A, "m1", "one two three four five six")
        write_config(path, model="m2", key=KEY_B,
                     extra="routes: [{model: smart, targets: [m2]}]\n")
        new = await stack.runtime.reload()
        assert [c.name for c in new.channels] == ["ch-m2"]
        rest = await finish_stream(s, r)
        # The stream that started before the reload ran to its end on the old channel.
        assert rest.endswith(b"data: [DONE]\n\n") and b'"error"' not in rest
        assert b"six" in rest
        assert await chat(stack.base_url, KEY_B, "m2") == 200
        assert await chat(stack.base_url, KEY_B, "smart") == 200
        assert await chat(stack.base_url, KEY_B, "m1") == 404
        assert await chat(stack.base_url, KEY_A, "m2") == 401  # the old key is gone
        records = [x for x in stack.usage.records if x.stream]
        assert records and records[-1].status == "OK" and records[-1].channel == "ch-m1"


@pytest.mark.parametrize("bad", [
    "channels: [{name: x, provider: nope, models: [m]}]\n",     # unknown provider
    "channels: [\n",                                            # broken YAML
    "keys: [{name: k, key: short}]\n",                          # invalid key
    "channels: [{name: x, provider: echo, models: [m], options: {delay_ms: soon}}]\n",  # bad option
])
async def test_bad_config_is_rejected_and_the_old_one_keeps_serving(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "sb.yaml"
    write_config(path, model="m1", key=KEY_A)
    async with running_stack(load_config(path)) as stack:
        path.write_text(bad)
        with pytest.raises(ConfigError):
            await stack.runtime.reload()
        assert await chat(stack.base_url, KEY_A, "m1") == 200
        async with aiohttp.ClientSession() as session, session.get(stack.http_url + "/metrics") as m:
            text = await m.text()
        assert 'switchboard_config_reloads_total{result="error"} 1.0' in text
        assert stack.runtime.config.channels[0].name == "ch-m1"


# ------------------------------------------------------------ the real CLI ----

async def start_cli(*args: str, cwd: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.core.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=cwd)  # the default SQLite store lands in the working directory
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert line.startswith("switchboard: ready"), line
    http = next(p for p in line.split() if p.startswith("http=")).removeprefix("http=")
    return proc, f"http://{http}/v1"


async def stop_cli(proc: asyncio.subprocess.Process) -> bytes:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err


async def models(base_url: str, key: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    try:
        return [m.id async for m in client.models.list()]
    finally:
        await client.close()


async def wait_for_models(base_url: str, key: str, want: list[str]) -> None:
    for _ in range(100):
        try:
            if await models(base_url, key) == want:
                return
        except openai.AuthenticationError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"models never became {want}")


async def test_sighup_reloads_the_running_process(tmp_path: Path) -> None:
    path = tmp_path / "sb.yaml"
    write_config(path, model="m1", key=KEY_A, delay_ms=60)
    proc, base = await start_cli("serve", "--config", str(path), "--http", "127.0.0.1:0",
                                 "--grpc", "127.0.0.1:0", cwd=tmp_path)
    try:
        assert await models(base, KEY_A) == ["m1"]
        s, r = await open_stream(base, KEY_A, "m1", "alpha beta gamma delta epsilon")
        write_config(path, model="m2", key=KEY_B)
        proc.send_signal(signal.SIGHUP)
        await wait_for_models(base, KEY_B, ["m2"])
        rest = await finish_stream(s, r)
        assert rest.endswith(b"data: [DONE]\n\n") and b"epsilon" in rest

        path.write_text("channels: [{name: x, provider: nope, models: [m]}]\n")
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):  # until the process has tried (and refused) the bad file
            async with aiohttp.ClientSession() as session, session.get(
                    base.removesuffix("/v1") + "/metrics") as m:
                if 'switchboard_config_reloads_total{result="error"} 1.0' in await m.text():
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the bad config was never tried")
        assert await models(base, KEY_B) == ["m2"]  # still serving the last good config
    finally:
        err = (await stop_cli(proc)).decode()
    assert proc.returncode == 0
    assert "config reloaded" in err
    assert "config reload rejected" in err and "unknown provider 'nope'" in err


def test_check_config(tmp_path: Path) -> None:
    import subprocess

    good = tmp_path / "good.yaml"
    write_config(good, model="m1", key=KEY_A)
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels: [{name: x, provider: nope, models: [m]}]\n")
    ok = subprocess.run([sys.executable, "-m", "switchboard.core.cli", "check-config", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok
    no = subprocess.run([sys.executable, "-m", "switchboard.core.cli", "check-config", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert no.returncode == 2
    assert "channels[0].provider" in no.stderr and "unknown provider" in no.stderr
    assert not no.stdout
    missing = subprocess.run([sys.executable, "-m", "switchboard.core.cli", "check-config", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# ------------------------------------------------------------- admin API ----

ADMIN = "sk-admin-reload-test-99"


async def test_reload_through_the_admin_api(tmp_path: Path) -> None:
    import grpc

    from switchboard.v1 import admin_pb2 as apb
    from switchboard.v1 import admin_pb2_grpc as apb_grpc

    path = tmp_path / "sb.yaml"
    write_config(path, model="m1", key=KEY_A, extra=f"admin_key: {ADMIN}\n")
    async with running_stack(load_config(path)) as stack:
        admin = apb_grpc.AdminServiceStub(stack.channel)
        auth = (("authorization", f"Bearer {ADMIN}"),)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await admin.ReloadConfig(apb.ReloadConfigRequest(),
                                     metadata=(("authorization", f"Bearer {KEY_A}"),))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

        write_config(path, model="m2", key=KEY_A, extra=f"admin_key: {ADMIN}\n")
        resp = await admin.ReloadConfig(apb.ReloadConfigRequest(), metadata=auth)
        assert (resp.source, resp.channels, resp.keys, resp.routes) == (str(path), 1, 1, 0)
        assert await chat(stack.base_url, KEY_A, "m2") == 200

        # REST: POST /admin/v1/config:reload, same operation
        write_config(path, model="m3", key=KEY_A, extra=f"admin_key: {ADMIN}\n")
        async with aiohttp.ClientSession() as s:
            async with s.post(stack.http_url + "/admin/v1/config:reload",
                              headers={"authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["channels"] == 1
            assert await chat(stack.base_url, KEY_A, "m3") == 200
            path.write_text("channels: [{name: x, provider: nope, models: [m]}]\n")
            async with s.post(stack.http_url + "/admin/v1/config:reload",
                              headers={"authorization": f"Bearer {ADMIN}"}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["code"] == "invalid_config"
                assert "unknown provider" in body["error"]["message"]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.ReloadConfig(apb.ReloadConfigRequest(), metadata=auth)
        assert bad.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await chat(stack.base_url, KEY_A, "m3") == 200  # the old config still serves


async def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    path = tmp_path / "sb.yaml"
    write_config(path, model="m1", key=KEY_A)
    proc, base = await start_cli("serve", "--config", str(path), "--workers", "2",
                                 "--http", f"127.0.0.1:{free_port()}",
                                 "--grpc", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    try:
        write_config(path, model="m2", key=KEY_A)
        proc.send_signal(signal.SIGHUP)
        # Connections are spread over the workers by the kernel (one connection per
        # client here): wait until 20 answers in a row come from the new config.
        streak = 0
        for _ in range(400):
            streak = streak + 1 if await models(base, KEY_A) == ["m2"] else 0
            if streak == 20:
                break
            await asyncio.sleep(0.02 if streak == 0 else 0)
        assert streak == 20
    finally:
        await stop_cli(proc)
    assert proc.returncode == 0
