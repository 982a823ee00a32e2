"""Packaging without a Docker engine: what the image is made of. (tests/test_container.py
builds and runs the real image when an engine can be used.)

- The Dockerfile's build stage is replayed in a clean virtualenv: only the files its
  COPY lines bring in, installed the way its RUN line does. Then the final stage's
  exact ENTRYPOINT + CMD runs with its ENV (paths mapped to the temp directory, ports
  overridden the way `docker run -e` would) and the exact HEALTHCHECK command must
  pass while it serves and fail once it has stopped.
- The default command with no configuration serves the echo demo (deploy/demo.yaml,
  which must equal demo_config() but for its listen addresses).
- The Kubernetes manifests and the compose file parse as YAML with the expected
  structure, the Switchboard configs embedded in them pass the config parser, and their
  user, ports, mount paths, config path and probes match the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchboard.core.config import DEMO_KEY, Listen, demo_config, load_config_text

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
APP_KEY = "sk-deploy-test-app-key-0001"


# ------------------------------------------------------------ Dockerfile ----

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    args = next(a for w, a in stage if w == word)
    if word == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4:]
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{word} must use the exec form"
    return parsed


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The build stage replayed: a clean venv holding what the Dockerfile installs."""
    tmp = tmp_path_factory.mktemp("image")
    build, final = stages(DOCKERFILE.read_text())
    src = tmp / "src"
    src.mkdir()
    for word, args in build:
        if word == "COPY":
            *sources, _dest = args.split()
            for what in sources:
                target = src / what
                if (ROOT / what).is_dir():
                    shutil.copytree(ROOT / what, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / what, target)
    venv = tmp / "opt-switchboard"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = next(a for w, a in build if w == "RUN" and "pip install" in a)
    argv = shlex.split(install)
    assert argv[0] == "/opt/switchboard/bin/pip"
    done = subprocess.run([str(venv / "bin" / "pip"), *argv[1:], "-q"], cwd=src,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    etc = tmp / "etc-switchboard"
    etc.mkdir()
    for word, args in final:
        if word == "COPY" and not args.startswith("--from"):
            what, dest = args.split()
            assert dest.startswith("/etc/switchboard/")
            shutil.copy(ROOT / what, etc / dest.removeprefix("/etc/switchboard/"))
    workdir = tmp / "var-lib-switchboard"
    workdir.mkdir()
    paths = {"/opt/switchboard": str(venv), "/etc/switchboard": str(etc)}
    env = {}
    for key, value in env_of(final).items():
        for image_path, here in paths.items():
            value = value.replace(image_path, here)
        env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return {"final": final, "env": env, "workdir": workdir, "venv": venv}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_image_is_multi_stage_slim_and_non_root() -> None:
    st = stages(DOCKERFILE.read_text())
    assert len(st) >= 2
    assert all("slim" in args or args.startswith("${PYTHON}") for w, args in
               (s[0] for s in st) if w == "FROM")
    final = st[-1]
    user = next(a for w, a in final if w == "USER")
    assert not user.startswith(("root", "0"))
    health = next(a for w, a in final if w == "HEALTHCHECK")
    assert "curl" not in health and "wget" not in health
    assert any(w == "COPY" and a.startswith("--from=build") for w, a in final)


def test_entrypoint_and_healthcheck_work_in_a_clean_venv(image: dict[str, Any]) -> None:
    final = image["final"]
    command = exec_form(final, "ENTRYPOINT") + exec_form(final, "CMD")
    health = exec_form(final, "HEALTHCHECK")
    http, grpc_port = free_port(), free_port()
    env = {**image["env"], "HOME": str(image["workdir"]), "APP_KEY": APP_KEY,
           # `docker run -e SWITCHBOARD_CONFIG=/etc/switchboard/example.yaml -e APP_KEY ...`
           "SWITCHBOARD_CONFIG": str(Path(image["env"]["SWITCHBOARD_CONFIG"]).with_name("example.yaml")),
           # what `docker run -e ...` would override: ports free on this machine
           "SWITCHBOARD_HTTP_LISTEN": f"127.0.0.1:{http}",
           "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{grpc_port}"}
    env["SWITCHBOARD_HEALTH_URL"] = re.sub(r":8080/", f":{http}/", env["SWITCHBOARD_HEALTH_URL"])
    assert shutil.which(command[0], path=env["PATH"]) == str(image["venv"] / "bin" / command[0])
    proc = subprocess.Popen(command, env=env, cwd=image["workdir"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("switchboard: ready"), (line, proc.stderr.read() if proc.poll() else "")
        probe = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/chat/completions", method="POST",
            headers={"authorization": f"Bearer {APP_KEY}", "content-type": "application/json"},
            data=json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["choices"][0]["message"]["content"] == "hi"
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
            assert 'switchboard_requests_total{channel="echo",model="echo",status="OK",surface="rest"} 1.0' \
                in r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert APP_KEY not in err  # the access log names the key, never its secret
    assert '"key_name":"app"' in err
    probe = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0  # stopped: the healthcheck says so


def test_image_refuses_a_bad_config(image: dict[str, Any]) -> None:
    final = image["final"]
    command = exec_form(final, "ENTRYPOINT") + exec_form(final, "CMD")
    env = {k: v for k, v in image["env"].items()}  # APP_KEY missing: the config cannot load
    env["SWITCHBOARD_CONFIG"] = str(Path(env["SWITCHBOARD_CONFIG"]).with_name("example.yaml"))
    done = subprocess.run(command, env=env, cwd=image["workdir"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "APP_KEY is not set" in done.stderr
    check = subprocess.run(["switchboard", "check-config", env["SWITCHBOARD_CONFIG"]],
                           env={**env, "APP_KEY": APP_KEY}, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and check.stdout.startswith("OK"), check.stderr


def test_default_command_serves_the_demo(image: dict[str, Any]) -> None:
    """`docker run IMAGE` with no configuration: the echo demo, like `switchboard serve`."""
    final = image["final"]
    command = exec_form(final, "ENTRYPOINT") + exec_form(final, "CMD")
    health = exec_form(final, "HEALTHCHECK")
    http = free_port()
    env = {**image["env"], "HOME": str(image["workdir"]),
           "SWITCHBOARD_HTTP_LISTEN": f"127.0.0.1:{http}",
           "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{free_port()}"}
    env["SWITCHBOARD_HEALTH_URL"] = re.sub(r":8080/", f":{http}/", env["SWITCHBOARD_HEALTH_URL"])
    before = set(image["workdir"].iterdir())
    proc = subprocess.Popen(command, env=env, cwd=image["workdir"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("switchboard: ready"), (line, proc.stderr.read() if proc.poll() else "")
        assert subprocess.run(health, env=env, timeout=30).returncode == 0
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/chat/completions", method="POST",
            headers={"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"},
            data=json.dumps({"model": "echo", "messages": [{"role": "user", "content": "demo"}]}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["choices"][0]["message"]["content"] == "demo"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert set(image["workdir"].iterdir()) == before  # in-memory store: no file left behind


def test_baked_demo_config_is_the_cli_demo() -> None:
    """deploy/demo.yaml is demo_config() but for the listen addresses (all interfaces)."""
    baked = load_config_text((ROOT / "deploy" / "demo.yaml").read_text(), "demo.yaml", env={})
    expected = demo_config().model_copy(update={
        "listen": Listen(http="0.0.0.0:8080", grpc="0.0.0.0:50051"), "source": "demo.yaml"})
    assert baked == expected


# ------------------------------------------------------------- manifests ----

def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def embedded_config(configmap: dict[str, Any]) -> None:
    """The config in a ConfigMap passes the real parser (with placeholder secrets)."""
    text = configmap["data"]["config.yaml"]
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))  # those without a default
    load_config_text(text, configmap["metadata"]["name"], env={n: f"placeholder-{n.lower()}-secret"
                                                                for n in names})


def test_sidecar_manifest() -> None:
    docs = load_all(ROOT / "deploy" / "k8s" / "sidecar.yaml")
    cm = by_kind(docs, "ConfigMap")
    embedded_config(cm)
    assert "127.0.0.1:8080" in cm["data"]["config.yaml"]  # loopback: only the pod's app
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "switchboard")
    assert sidecar["restartPolicy"] == "Always"  # native sidecar
    app = next(c for c in pod["containers"] if c["name"] == "app")
    env = {e["name"]: e for e in app["env"]}
    assert env["OPENAI_BASE_URL"]["value"] == "http://localhost:8080/v1"
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "APP_KEY"
    assert "OPENAI_API_KEY" not in {e["name"] for e in app["env"] if "valueFrom" in e
                                    and e["valueFrom"]["secretKeyRef"]["key"] == "OPENAI_API_KEY"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"][0] == "python"
    assert sidecar["securityContext"]["runAsUser"] != 0
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert {"/etc/switchboard", "/var/lib/switchboard"} <= mounts


def test_replicas_manifest() -> None:
    docs = load_all(ROOT / "deploy" / "k8s" / "replicas.yaml")
    cm = by_kind(docs, "ConfigMap", "switchboard-config")
    embedded_config(cm)
    config = cm["data"]["config.yaml"]
    assert "postgresql://" in config and "redis://redis:6379" in config
    dep = by_kind(docs, "Deployment", "switchboard")
    assert dep["spec"]["replicas"] >= 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["grpc"]["port"] == 50051
    assert {p["containerPort"] for p in c["ports"]} == {8080, 50051}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 25
    by_kind(docs, "Service", "switchboard")
    assert by_kind(docs, "Service", "switchboard-grpc")["spec"]["clusterIP"] == "None"
    assert by_kind(docs, "Deployment", "redis")
    assert by_kind(docs, "StatefulSet", "postgres")
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Service"} >= {"redis", "postgres"}


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    replicas = [s for n, s in services.items() if n.startswith("switchboard")]
    assert len(replicas) == 2
    host_ports = set()
    for s in replicas:
        assert s["build"]["context"] == ".." and s["build"]["dockerfile"] == "Dockerfile"
        assert s["environment"]["SWITCHBOARD_STORE"].startswith("postgresql://")
        assert s["environment"]["SWITCHBOARD_LIMITS"].startswith("redis://redis")
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        host_ports |= {p.split(":")[0] for p in s["ports"]}
    assert len(host_ports) == 4  # each replica has its own REST and gRPC host port
    assert {"redis", "postgres"} <= set(services)
    mounted = replicas[0]["volumes"][0].split(":")[0]
    assert (ROOT / "deploy" / mounted).exists()
    # The mounted config loads with the environment compose gives it.
    env = {k: str(v) for k, v in replicas[0]["environment"].items()}
    env["APP_KEY"] = APP_KEY
    cfg = load_config_text((ROOT / "deploy" / mounted).read_text(), mounted, env=env)
    assert cfg.store.startswith("postgresql://") and cfg.limits.startswith("redis://")


# ------------------------------------------------- manifests vs. the image ----

def image_facts() -> dict[str, Any]:
    """What the Dockerfile's final stage puts in the image: user, ports, paths, env."""
    final = stages(DOCKERFILE.read_text())[-1]
    user = next(a for w, a in final if w == "USER")
    exposed = {int(p) for w, a in final if w == "EXPOSE" for p in a.split()}
    workdir = next(a for w, a in final if w == "WORKDIR")
    dirs = {workdir, "/tmp", "/opt/switchboard"}
    for w, a in final:
        if w == "RUN" and "mkdir -p" in a:
            dirs |= {t for t in shlex.split(a) if t.startswith("/")}
        if w in ("COPY",):
            dirs.add(os.path.dirname(a.split()[-1]))
    env = env_of(final)
    return {"user": user, "exposed": exposed, "workdir": workdir, "dirs": dirs, "env": env}


def url_port(url: str) -> int:
    match = re.search(r"//[^/:]+:(\d+)/", url)
    assert match, url
    return int(match.group(1))


def listen_ports(configmap: dict[str, Any]) -> set[int]:
    text = configmap["data"]["config.yaml"]
    listen = yaml.safe_load(text)["listen"]
    return {int(listen["http"].rsplit(":", 1)[1]), int(listen["grpc"].rsplit(":", 1)[1])}


def test_replicas_manifest_matches_the_image() -> None:
    img = image_facts()
    docs = load_all(ROOT / "deploy" / "k8s" / "replicas.yaml")
    pod = by_kind(docs, "Deployment", "switchboard")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    sec = pod["securityContext"]
    assert f"{sec['runAsUser']}:{sec['runAsGroup']}" == img["user"]
    assert {p["containerPort"] for p in c["ports"]} == img["exposed"]
    assert listen_ports(by_kind(docs, "ConfigMap", "switchboard-config")) == img["exposed"]
    assert {m["mountPath"] for m in c["volumeMounts"]} <= img["dirs"]
    config = {e["name"]: e.get("value") for e in c["env"]}["SWITCHBOARD_CONFIG"]
    assert os.path.dirname(config) in {m["mountPath"] for m in c["volumeMounts"]}
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named[c["readinessProbe"]["httpGet"]["port"]] in img["exposed"]
    assert c["livenessProbe"]["grpc"]["port"] in img["exposed"]
    # preStop and the HEALTHCHECK run `python`: the venv's, first on the image's PATH
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "python"
    assert img["env"]["PATH"].startswith("/opt/switchboard/bin:")


def test_sidecar_manifest_matches_the_image() -> None:
    img = image_facts()
    docs = load_all(ROOT / "deploy" / "k8s" / "sidecar.yaml")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "switchboard")
    sec = sidecar["securityContext"]
    assert f"{sec['runAsUser']}:{sec['runAsGroup']}" == img["user"]
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts <= img["dirs"] and img["workdir"] in mounts  # the sqlite store is writable
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert os.path.dirname(env["SWITCHBOARD_CONFIG"]) in mounts
    http_port = min(listen_ports(by_kind(docs, "ConfigMap")))
    assert url_port(env["SWITCHBOARD_HEALTH_URL"]) == http_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[0] == "python" and url_port(command[-1]) == http_port
    assert listen_ports(by_kind(docs, "ConfigMap")) == img["exposed"]


def test_compose_matches_the_image() -> None:
    img = image_facts()
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for name, s in compose["services"].items():
        if not name.startswith("switchboard"):
            continue
        assert {int(p.split(":")[1]) for p in s["ports"]} == img["exposed"]
        target = s["volumes"][0].split(":")[1]
        assert target == s["environment"]["SWITCHBOARD_CONFIG"] == img["env"]["SWITCHBOARD_CONFIG"]
