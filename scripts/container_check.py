"""Runs a built Switchboard image and checks it; called by scripts/container_check.sh.

    python scripts/container_check.py IMAGE

Every container runs with `--network host` (the engine here has no bridge) on free
loopback ports chosen through the environment, so parallel runs and other servers on
the machine do not collide; the sidecar check runs with `--network none` (loopback only,
like a pod's), so it keeps the manifest's fixed ports. Checks:

1. `docker run IMAGE` (default command, no config; read-only root, all capabilities
   dropped, as the Kubernetes manifests run it): /healthz and /readyz, a chat and a
   stream on the echo demo, gRPC unary + streaming calls and grpc.health.v1 from this
   virtualenv's grpcio, the Docker HEALTHCHECK reaching `healthy`, the server process
   (PID 1) not root, `docker stop` (SIGTERM) exiting 0; the image size.
2. A mounted config (over /etc/switchboard/config.yaml): it replaces the demo (the demo
   key is refused); a stream in flight when `docker stop` sends SIGTERM completes, and
   the container exits 0.
3. The env route: SWITCHBOARD_CONFIG=/etc/switchboard/example.yaml refuses to start
   without APP_KEY (exit 2, clear message) and serves with it.
4. deploy/k8s/sidecar.yaml: its ConfigMap, env, args, user, read-only root and mounts,
   run in the image; its startup/readiness/liveness exec probes pass inside it.
5. deploy/k8s/replicas.yaml and deploy/compose.yaml against the image: user, ports,
   mount paths, the preStop command.

Containers are named switchboard-check-<pid>-* and removed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "sk-switchboard-demo"
PREFIX = f"switchboard-check-{os.getpid()}"


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def ok(what: str) -> None:
    print(f"  ok  {what}", flush=True)


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args[:3])}...: {done.stderr.strip()[-500:]}")
    return done


def inspect(name: str, template: str) -> str:
    return docker("inspect", "-f", template, name).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe():
            return time.monotonic() - start
        time.sleep(0.25)
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_ready(name: str, timeout: float = 60) -> None:
    def ready() -> bool:
        logs = docker("logs", name, check=False)
        if inspect(name, "{{.State.Running}}") != "true":
            raise CheckFailed(f"{name} exited: {logs.stdout[-500:]}{logs.stderr[-1500:]}")
        return "switchboard: ready" in logs.stdout
    wait_for(f"{name} ready line", ready, timeout)


def http(method: str, url: str, key: str | None = None, body: dict[str, Any] | None = None,
         ) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def chat(base: str, key: str, text: str) -> tuple[int, str]:
    status, raw = http("POST", f"{base}/v1/chat/completions", key,
                       {"model": "echo", "messages": [{"role": "user", "content": text}]})
    return status, json.loads(raw)["choices"][0]["message"]["content"] if status == 200 else raw.decode()


def stream(base: str, key: str, text: str, on_first: Callable[[], None] | None = None) -> tuple[str, bool]:
    """The streamed text and whether `data: [DONE]` ended it; calls on_first after chunk 1."""
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", method="POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        data=json.dumps({"model": "echo", "stream": True,
                         "messages": [{"role": "user", "content": text}]}).encode())
    parts: list[str] = []
    done = False
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            data = line.decode().strip()
            if not data.startswith("data: "):
                continue
            if data == "data: [DONE]":
                done = True
                break
            choices = json.loads(data[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                parts.append(choices[0]["delta"]["content"])
                if on_first is not None and len(parts) == 1:
                    on_first()
    return "".join(parts), done


def run(name: str, *args: str, network: str = "host") -> str:
    docker("rm", "-f", name, check=False)
    return docker("run", "-d", "--name", name, f"--network={network}", *args).stdout.strip()


def stop(name: str, timeout_s: int = 30) -> tuple[int, float]:
    start = time.monotonic()
    docker("stop", "-t", str(timeout_s), name, timeout=timeout_s + 30)
    return int(inspect(name, "{{.State.ExitCode}}")), time.monotonic() - start


# ------------------------------------------------------------------ 1. default ----

def check_default(image: str) -> None:
    print("1. docker run IMAGE (default command, no config)")
    h, g = free_port(), free_port()
    name = f"{PREFIX}-demo"
    run(name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "-e", f"SWITCHBOARD_HTTP_LISTEN=127.0.0.1:{h}", "-e", f"SWITCHBOARD_GRPC_LISTEN=127.0.0.1:{g}",
        "-e", f"SWITCHBOARD_HEALTH_URL=http://127.0.0.1:{h}/healthz", image)
    expect(json.loads(inspect(name, "{{json .Config.Cmd}}")) == ["serve"], "default CMD is serve")
    wait_ready(name)
    base = f"http://127.0.0.1:{h}"
    for path in ("/healthz", "/readyz"):
        status, _ = http("GET", base + path)
        expect(status == 200, f"{path} -> {status}")
    ok("/healthz and /readyz: 200")
    status, text = chat(base, DEMO_KEY, "hello from the container")
    expect((status, text) == (200, "hello from the container"), f"chat: {status} {text}")
    status, _ = http("POST", f"{base}/v1/chat/completions", "sk-wrong",
                     {"model": "echo", "messages": [{"role": "user", "content": "x"}]})
    expect(status == 401, f"wrong key -> {status}")
    ok("chat on the echo demo with the demo key (a wrong key: 401)")
    text, done = stream(base, DEMO_KEY, "one word at a time")
    expect(text == "one word at a time" and done, f"stream: {text!r} done={done}")
    ok("SSE stream, ends with [DONE]")
    with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        auth = (("authorization", f"Bearer {DEMO_KEY}"),)
        params = pb.ChatCompletionParams(model="echo", messages=[pb.Message(role=pb.ROLE_USER,
                                                                             text="hello grpc")])
        reply = stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params),
                                          metadata=auth, timeout=10)
        expect(reply.choices[0].message.content == "hello grpc", f"gRPC unary: {reply}")
        words = "".join(m.choices[0].delta.content for m in stub.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=params), metadata=auth, timeout=10) if m.choices)
        expect(words == "hello grpc", f"gRPC stream: {words!r}")
        served = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        expect(served.status == health_pb2.HealthCheckResponse.SERVING, f"grpc health: {served}")
    ok("gRPC CreateChatCompletion, StreamChatCompletion, grpc.health.v1 SERVING")
    took = wait_for("HEALTHCHECK healthy", lambda: inspect(name, "{{.State.Health.Status}}") == "healthy",
                    90)
    ok(f"Docker HEALTHCHECK: healthy ({took:.0f}s after ready)")
    status_lines = docker("exec", name, "cat", "/proc/1/status").stdout.splitlines()
    uid = next(line.split()[1:] for line in status_lines if line.startswith("Uid:"))
    cmdline = docker("exec", name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ").strip()
    expect("switchboard serve" in cmdline, f"PID 1 is {cmdline!r}")
    expect(all(u != "0" for u in uid), f"PID 1 runs as uid {uid}")
    ok(f"PID 1 ({cmdline}) runs as uid {uid[0]}, image USER {inspect(name, '{{.Config.User}}')}")
    code, took = stop(name)
    expect(code == 0, f"docker stop: exit code {code}")
    expect(inspect(name, "{{.State.OOMKilled}}") == "false", "OOM killed")
    ok(f"docker stop (SIGTERM): exit code 0 after {took:.1f}s")


# ------------------------------------------------------------ 2. mounted config ----

MOUNTED = """\
listen: {{http: "127.0.0.1:{h}", grpc: "127.0.0.1:{g}"}}
store: "sqlite:///./switchboard.db"
shutdown_grace_s: 20
keys:
  - {{name: mine, key: sk-mounted-config-key-0001}}
channels:
  - {{name: slow-echo, provider: echo, models: [echo], options: {{delay_ms: 150}}}}
"""


def check_mounted(image: str, tmp: Path) -> None:
    print("2. a mounted config; SIGTERM drains an in-flight stream")
    h, g = free_port(), free_port()
    cfg = tmp / "mounted.yaml"
    cfg.write_text(MOUNTED.format(h=h, g=g))
    cfg.chmod(0o644)
    name = f"{PREFIX}-mounted"
    run(name, "-v", f"{cfg}:/etc/switchboard/config.yaml:ro",
        "-e", f"SWITCHBOARD_HEALTH_URL=http://127.0.0.1:{h}/healthz", image)
    wait_ready(name)
    base = f"http://127.0.0.1:{h}"
    status, _ = chat(base, DEMO_KEY, "x")
    expect(status == 401, f"the demo key on a mounted config -> {status}")
    status, text = chat(base, "sk-mounted-config-key-0001", "mine")
    expect((status, text) == (200, "mine"), f"chat: {status} {text}")
    ok("the mounted config replaces the demo (demo key: 401, its own key: 200)")
    words = " ".join(f"w{i}" for i in range(16))  # 16 x 150 ms: SIGTERM lands mid-stream
    stopped: dict[str, Any] = {}

    def sigterm() -> None:
        t = threading.Thread(target=lambda: stopped.update(zip(("code", "took"), stop(name), strict=True)))
        t.start()
        stopped["thread"] = t

    text, done = stream(base, "sk-mounted-config-key-0001", words, on_first=sigterm)
    stopped["thread"].join(60)
    expect(text == words and done, f"in-flight stream cut by SIGTERM: {text!r} done={done}")
    expect(stopped.get("code") == 0, f"exit code after drain: {stopped.get('code')}")
    ok(f"stream in flight at SIGTERM completed ({len(words.split())} words + [DONE]); "
       f"exit code 0 after {stopped['took']:.1f}s")


# ------------------------------------------------------------------- 3. env ----

def check_env(image: str) -> None:
    print("3. SWITCHBOARD_CONFIG=/etc/switchboard/example.yaml (deploy/config.yaml)")
    env = ["-e", "SWITCHBOARD_CONFIG=/etc/switchboard/example.yaml"]
    refused = docker("run", "--rm", "--network=host", *env, image, check=False, timeout=60)
    expect(refused.returncode == 2 and "APP_KEY is not set" in refused.stderr,
           f"without APP_KEY: exit {refused.returncode}: {refused.stderr[-300:]}")
    ok("without APP_KEY: exit 2, 'APP_KEY is not set'")
    h, g = free_port(), free_port()
    name = f"{PREFIX}-env"
    run(name, *env, "-e", "APP_KEY=sk-env-app-key-0001",
        "-e", f"SWITCHBOARD_HTTP_LISTEN=127.0.0.1:{h}", "-e", f"SWITCHBOARD_GRPC_LISTEN=127.0.0.1:{g}",
        "-e", f"SWITCHBOARD_HEALTH_URL=http://127.0.0.1:{h}/healthz", image)
    wait_ready(name)
    status, text = chat(f"http://127.0.0.1:{h}", "sk-env-app-key-0001", "from env")
    expect((status, text) == (200, "from env"), f"chat: {status} {text}")
    code, _ = stop(name)
    expect(code == 0, f"exit code {code}")
    ok("with APP_KEY: serves (echo channel), stops with exit 0")


# -------------------------------------------------------------- 4. manifests ----

def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def container_env(spec: dict[str, Any]) -> list[str]:
    out = []
    for e in spec.get("env", []):
        value = e.get("value", f"placeholder-{e['name'].lower()}-secret")
        out += ["-e", f"{e['name']}={value}"]
    return out


def check_sidecar(image: str, tmp: Path) -> None:
    print("4. deploy/k8s/sidecar.yaml in the image")
    docs = docs_of(ROOT / "deploy" / "k8s" / "sidecar.yaml")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    spec = next(c for c in pod["initContainers"] if c["name"] == "switchboard")
    volumes = {v["name"]: v for v in pod["volumes"]}
    sec = spec["securityContext"]
    args = ["--user", f"{sec['runAsUser']}:{sec['runAsGroup']}", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges"]
    if sec.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for m in spec["volumeMounts"]:
        vol = volumes[m["name"]]
        if "configMap" in vol:
            d = tmp / m["name"]
            d.mkdir()
            d.chmod(0o755)
            for key, text in cm["data"].items():
                (d / key).write_text(text)
                (d / key).chmod(0o644)
            args += ["-v", f"{d}:{m['mountPath']}:ro"]
        else:  # emptyDir: writable by the pod's user (this engine ignores tmpfs mode=)
            args += ["--tmpfs", f"{m['mountPath']}:uid={sec['runAsUser']},gid={sec['runAsGroup']}"]
    name = f"{PREFIX}-sidecar"
    # --network none: a namespace of its own with loopback only, as in a pod.
    run(name, *args, *container_env(spec), image, *spec["args"], network="none")
    wait_ready(name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = spec[probe]["exec"]["command"]
        done = docker("exec", name, *command, check=False, timeout=30)
        expect(done.returncode == 0, f"{probe} {command}: {done.stderr[-300:]}")
    ok("started as the manifest says (user, read-only root, ConfigMap, emptyDir, env, args); "
       "startup/readiness/liveness exec probes pass")
    db = docker("exec", name, "python", "-c",
                "import os; print(sorted(os.listdir('.')), os.getcwd())").stdout.strip()
    ok(f"working directory (the emptyDir) holds the sqlite store: {db}")
    code, _ = stop(name)
    expect(code == 0, f"exit code {code}")
    ok("docker stop: exit 0")


def check_static(image: str) -> None:
    print("5. deploy/k8s/replicas.yaml and deploy/compose.yaml against the image")
    cfg = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    exposed = {int(p.split("/")[0]) for p in cfg["ExposedPorts"]}
    env = dict(e.split("=", 1) for e in cfg["Env"])
    docs = docs_of(ROOT / "deploy" / "k8s" / "replicas.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "switchboard")
    pod = dep["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    expect(cfg["User"] == user, f"image USER {cfg['User']} != manifest {user}")
    expect({p["containerPort"] for p in spec["ports"]} == exposed, f"ports vs EXPOSE {exposed}")
    for m in spec["volumeMounts"]:
        done = docker("run", "--rm", "--network=none", "--entrypoint", "test", image, "-d",
                      m["mountPath"], check=False)
        expect(done.returncode == 0, f"{m['mountPath']} is not a directory in the image")
    pod_env = {e["name"]: e.get("value") for e in spec["env"]}
    expect(os.path.dirname(pod_env["SWITCHBOARD_CONFIG"]) == "/etc/switchboard",
           "SWITCHBOARD_CONFIG lies in the ConfigMap mount")
    pre = spec["lifecycle"]["preStop"]["exec"]["command"]
    done = docker("run", "--rm", "--network=none", "--read-only", "--user", user,
                  "--entrypoint", pre[0], image, *pre[1:], check=False, timeout=60)
    expect(done.returncode == 0, f"preStop {pre}: {done.stderr[-300:]}")
    ok(f"replicas: user {user}, ports {sorted(exposed)}, mount paths exist, preStop runs")
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for n, s in compose["services"].items():
        if not n.startswith("switchboard"):
            continue
        expect({int(p.split(":")[1]) for p in s["ports"]} <= exposed, f"{n}: ports")
        target = s["volumes"][0].split(":")[1]
        expect(target == s["environment"]["SWITCHBOARD_CONFIG"] == env["SWITCHBOARD_CONFIG"],
               f"{n}: config path {target}")
    ok("compose: container ports exposed, config mounted where SWITCHBOARD_CONFIG points")


def main() -> int:
    image = sys.argv[1]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    print(f"image {image}: {size / 1e6:.0f} MB")
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            check_default(image)
            check_mounted(image, Path(tmp))
            check_env(image)
            check_sidecar(image, Path(tmp))
            check_static(image)
    except CheckFailed as exc:
        print(f"container check: FAIL: {exc}", file=sys.stderr)
        for suffix in ("demo", "mounted", "env", "sidecar"):
            logs = docker("logs", "--tail", "20", f"{PREFIX}-{suffix}", check=False)
            if logs.returncode == 0:
                print(f"--- {PREFIX}-{suffix} logs:\n{logs.stdout}{logs.stderr}", file=sys.stderr)
        return 1
    finally:
        for suffix in ("demo", "mounted", "env", "sidecar"):
            docker("rm", "-f", f"{PREFIX}-{suffix}", check=False)
    print(f"all checks passed in {time.monotonic() - start:.0f}s; image size {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
