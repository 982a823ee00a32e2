"""Every ```python and ```bash block in README.md and docs/*.md runs against a real
`switchboard serve` process, so the documentation cannot rot (issue 11).

The server is the demo (the echo provider, the demo key) plus what the other sections
need: an admin key, a SQLite store in a temp dir, and `gpt-4o` served by echo too. The
documented addresses (127.0.0.1:8080 / localhost:50051 …) are rewritten to its ports.

- python blocks run as scripts with this interpreter and must exit 0 and print
  something; `SWITCHBOARD_KEY` holds the demo key.
- bash blocks run line by line through a small interpreter: `curl` is performed with an
  HTTP client (status < 400), `switchboard …` runs the CLI (exit 0), `export` sets the
  environment, `kill -HUP <pid>` signals the server. Lines for tools this suite must not
  run (`NOT_RUN` below: they are outside the repository and its virtualenv, or are the
  install/CI steps themselves) are listed with the reason; a line the interpreter does
  not know fails the test, so a new kind of snippet cannot slip through unrun.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from switchboard.core.config import DEMO_KEY

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ADMIN_KEY = "adm-docs-0123456789abcdef"

# Commands a snippet may show but this suite does not run, and why.
NOT_RUN = {
    "docker": "the container is built and run by the Docker check, not by the unit suite",
    "kubectl": "needs a Kubernetes cluster",
    "grpcurl": "a binary outside the virtualenv; tests/test_health.py makes the same reflection "
               "and health calls with a raw client",
    "grpc_health_probe": "a binary outside the virtualenv; tests/test_health.py checks grpc.health.v1",
    "buf": "installed from npm by .ci/run, which runs `buf lint`",
    "python3": "the install step (`python3 -m venv`): the suite already runs in the installed venv",
    ".": "activating the venv the suite already runs in",
    "pip": "installing: the suite runs in the installed venv; .ci/run installs a fresh clone",
    "python": "`python -m pytest` is this suite and `python -m bench.run` a minutes-long benchmark; "
              ".ci/run runs the former verbatim",
    "scripts/gen_protos.sh": ".ci/run runs `scripts/gen_protos.sh --check`",
    "ruff": ".ci/run runs it",
    "mypy": ".ci/run runs it",
    "bash": "`bash .ci/run` is CI itself",
}


@dataclass
class Block:
    file: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def blocks() -> list[Block]:
    out = []
    fence = re.compile(r"^( *)```(\w*)\s*$")
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = fence.match(lines[i])
            if not m:
                i += 1
                continue
            indent, lang, start = len(m.group(1)), m.group(2), i
            body = []
            i += 1
            while not fence.match(lines[i]):
                body.append(lines[i][indent:])
                i += 1
            i += 1
            if lang in ("python", "bash"):
                out.append(Block(path, start + 1, lang, "\n".join(body) + "\n"))
    return out


BLOCKS = blocks()


@dataclass
class Server:
    proc: subprocess.Popen[str]
    http: str  # host:port
    grpc: str
    env: dict[str, str]

    def rewrite(self, text: str) -> str:
        for host in ("127.0.0.1", "localhost"):
            text = text.replace(f"{host}:8080", self.http).replace(f"{host}:50051", self.grpc)
        return text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("docs")
    config = tmp / "switchboard.yaml"
    config.write_text(f"""
admin_key: ${{SWITCHBOARD_ADMIN_KEY}}
store: "sqlite:///{tmp}/switchboard.db"
keys: [{{name: demo, key: {DEMO_KEY}}}]
channels:
  - {{name: echo, provider: echo, models: [echo, gpt-4o, echo-image]}}
shutdown_grace_s: 1
""")
    env = {**os.environ, "SWITCHBOARD_ADMIN_KEY": ADMIN_KEY, "SWITCHBOARD_KEY": DEMO_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "switchboard.core.cli", "serve", "--config", str(config),
                             "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp)
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    m = re.search(r"ready http=(\S+) grpc=(\S+)", ready)
    assert m, f"no ready line: {ready!r}"
    env["SWITCHBOARD_ADMIN_ADDR"] = m.group(2)
    try:
        yield Server(proc, m.group(1), m.group(2), env)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_every_snippet_is_found() -> None:
    """The extractor sees the blocks the README is known to have (it cannot silently find none)."""
    readme = [b for b in BLOCKS if b.file.name == "README.md"]
    assert sum(b.lang == "python" for b in readme) >= 3 and sum(b.lang == "bash" for b in readme) >= 4


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.where)
def test_python_snippet_runs(block: Block, server: Server, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(server.rewrite(block.text))
    run = subprocess.run([sys.executable, str(script)], env=server.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{block.where}\n{run.stdout}\n{run.stderr}"
    assert run.stdout.strip(), f"{block.where} printed nothing"
    if "msg.usage" in block.text:  # the gRPC stream snippet's usage branch really runs
        assert re.search(r"usage: \d+ tokens", run.stdout), run.stdout


def _logical_lines(text: str) -> Iterator[str]:
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def _serve_demo() -> str:
    """`switchboard serve` with no config, on free ports: the embedded demo answers a chat
    with the demo key, then SIGTERM stops it with status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "switchboard.core.cli", "serve", "--http", "127.0.0.1:0",
                             "--grpc", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"ready http=(\S+)", proc.stdout.readline())
        assert m and "DEMO mode" in proc.stdout.readline()
        r = httpx.post(f"http://{m.group(1)}/v1/chat/completions", timeout=30,
                       headers={"authorization": f"Bearer {DEMO_KEY}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    return "switchboard serve (the demo): answered, stopped with 0"


def _commands(line: str) -> list[str]:
    """`a && b; c` -> [a, b, c], not splitting inside quotes or `$( … )`."""
    out, current, quote, depth, i = [], "", "", 0, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("$(", i):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and (ch == ";" or line.startswith("&&", i)):
            out.append(current)
            current, i = "", i + (2 if ch == "&" else 1)
            continue
        current += ch
        i += 1
    return [*out, current]


def _curl(argv: list[str], server: Server) -> str:
    method, headers, data, url = "GET", {}, None, ""
    it = iter(argv[1:])
    for arg in it:
        if arg in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg in ("-d", "--data"):
            data, method = next(it), "POST" if method == "GET" else method
        elif arg == "-X":
            method = next(it)
        elif arg in ("-N", "-s", "-sS"):
            pass
        elif not arg.startswith("-"):
            url = arg if "://" in arg else "http://" + arg
        else:
            raise AssertionError(f"curl option {arg!r} is not understood by this test")
    if not url.startswith(f"http://{server.http}/"):
        return f"not run: {url} is not the demo's address"
    r = httpx.request(method, url, headers=headers, content=data, timeout=30)
    assert r.status_code < 400, f"{' '.join(argv)} -> {r.status_code} {r.text}"
    assert r.text
    return f"HTTP {r.status_code}"


def _run_line(line: str, server: Server, notes: list[str]) -> None:
    expanded = re.sub(r"\$(\w+)|\$\{(\w+)\}",
                      lambda m: server.env.get(m.group(1) or m.group(2), m.group(0)), line)
    for command in _commands(expanded):
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        tool = argv[0]
        if tool in NOT_RUN:
            notes.append(f"not run ({tool}): {NOT_RUN[tool]}")
            continue
        if tool == "export":  # placeholders (`...`, command substitutions) keep the test's value
            for assignment in argv[1:]:
                name, _, value = assignment.partition("=")
                if value and "..." not in value and "$(" not in value:
                    server.env[name] = value
            continue
        if tool == "curl":
            notes.append(_curl(argv, server))
        elif argv == ["switchboard", "serve"]:
            notes.append(_serve_demo())
        elif tool == "switchboard":
            run = subprocess.run([sys.executable, "-m", "switchboard.core.cli", *argv[1:]], env=server.env,
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
            notes.append(f"switchboard {argv[1]}: ok")
        elif tool == "kill" and argv[1:] == ["-HUP", "<pid>"]:
            server.proc.send_signal(signal.SIGHUP)
            notes.append("SIGHUP sent")
        else:
            raise AssertionError(f"{command!r}: this test does not know how to run {tool!r}; "
                                 "teach it, or add the tool to NOT_RUN with the reason")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_bash_snippet_runs(block: Block, server: Server) -> None:
    notes: list[str] = []
    for line in _logical_lines(server.rewrite(block.text)):
        _run_line(line, server, notes)
    print(block.where, *notes, sep="\n  ")
    assert server.proc.poll() is None, "the server died"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """The README's second command is not run here (it is this suite); .ci/run runs it, as
    written, in a fresh clone."""
    readme = [b for b in BLOCKS if b.file.name == "README.md" and b.lang == "bash"]
    command = readme[1].text.strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert command.startswith("pip install") and "pytest" in command
    assert f"\n{command}\n" in ci
    assert "git clone" in ci and "mktemp -d" in ci


def test_design_references_and_local_links_resolve() -> None:
    """The code's "see the design" references point at docs/design.md, which exists, and
    every relative link in the README and docs names a file in the repository."""
    assert (REPO / "docs" / "design.md").is_file()
    sources = [*REPO.glob("core/**/*.py"), *REPO.glob("facade/*.py"), *DOCS]
    assert not [str(p) for p in sources if "DESIGN.md" in p.read_text()]
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
