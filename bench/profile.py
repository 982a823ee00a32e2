"""Where a request's CPU goes: py-spy samples the gateway under load and prints, per
scenario, the share of samples by component and the top functions by self time.

    python -m bench.profile                      # all four scenarios, 8 s each
    python -m bench.profile --only rest-unary,grpc-stream --seconds 10

py-spy is a dev tool (`pip install py-spy`), not a project dependency. Under uvloop a
coroutine's stack starts at the coroutine the loop resumed, so inclusive times are
partial; self time is exact. Time inside C (the uvloop loop, syscalls, grpc's Cython
core when it runs on the loop thread) shows up as the Python frame that called it —
mostly `Runner.run` (the loop itself).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.run import (
    BENCH,
    BODY,
    KEY,
    LOAD_CORE,
    OUT,
    PY,
    Server,
    start_mock,
    start_switchboard,
)

PYSPY = str(Path(PY).parent / "py-spy")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?):\d+\)$")

COMPONENTS = (  # first match wins
    ("aiohttp server", ("aiohttp/web", "aiohttp/http_writer", "aiohttp/http_parser",
                        "aiohttp/_http", "aiohttp/base_protocol")),
    ("aiohttp client", ("aiohttp/",)),
    ("grpc (Python side)", ("grpc/",)),
    ("event loop + C (uvloop, syscalls, grpc core on the loop)", ("asyncio/runners",)),
    ("asyncio (tasks, timeouts)", ("asyncio/",)),
    ("observability: logs, metrics, traces", ("core/logs", "core/observe", "core/metrics",
                                              "core/tracing", "logging/", "prometheus")),
    ("usage ledger / store (incl. aiosqlite thread)", ("core/ledger", "core/store",
                                                       "aiosqlite", "threading.py")),
    ("limits", ("core/limits",)),
    ("façade (ours)", ("facade/",)),
    ("provider translate + client (ours)", ("core/providers/",)),
    ("router (ours)", ("core/router", "core/circuit")),
    ("gateway + servicer (ours)", ("core/gateway", "core/service", "core/keys")),
)


def component(frame: str) -> str:
    m = _FRAME.match(frame)
    path = m.group("path") if m else frame
    for name, needles in COMPONENTS:
        if any(n in path for n in needles):
            return name
    return "other (stdlib, yarl, multidict, protobuf…)"


def summarize(raw: Path, top: int) -> str:
    by_comp: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        total += int(n)
        by_comp[component(leaf)] += int(n)
        m = _FRAME.match(leaf)
        name = f"{m.group('func')} ({m.group('path').split('site-packages/')[-1]})" if m else leaf
        by_func[name] += int(n)
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "| component | self time |", "|---|---|"]
    out += [f"| {k} | {100 * v / total:.1f}% |" for k, v in by_comp.most_common()]
    out += ["", "| function | self time |", "|---|---|"]
    out += [f"| `{k}` | {100 * v / total:.1f}% |" for k, v in by_func.most_common(top)]
    return "\n".join(out) + "\n"


def load_cmd(scenario: str, sb: Server, seconds: float) -> list[str]:
    if scenario == "rest-unary":
        return ["wrk", "-t1", "-c64", f"-d{seconds + 3:g}s", "-s", str(BENCH / "post.lua"), sb.url]
    if scenario == "grpc-unary":
        return [PY, "-m", "bench.drivers", "grpc-unary", "--target", sb.grpc, "--key", KEY,
                "-c", "64", "-d", f"{seconds + 3:g}", "--channels", "4"]
    kind = "rest-streams" if scenario == "rest-stream" else "grpc-streams"
    where = ["--url", sb.url] if kind == "rest-streams" else ["--target", sb.grpc]
    # 100 chunks 50 ms apart, 300 at a time: the per-chunk relay path dominates
    return [PY, "-m", "bench.drivers", kind, *where, "--key", KEY, "--model", "bench-s100x50ms",
            "-n", str(int(300 * (seconds + 3) / 5)), "-c", "300", "--warmup", "0"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="rest-unary,rest-stream,grpc-unary,grpc-stream")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    mock = start_mock()
    port = int(mock.url.split(":")[2].split("/")[0])
    sb = start_switchboard(port, 1)
    env = {"BENCH_BODY": BODY, "BENCH_AUTH": KEY}
    try:
        for scenario in args.only.split(","):
            load = subprocess.Popen(["taskset", "-c", LOAD_CORE, *load_cmd(scenario, sb,
                                                                        args.seconds)],
                                    stdout=subprocess.DEVNULL, env={**os.environ, **env})
            time.sleep(1.5)
            raw = OUT / f"profile-{scenario}.raw"
            subprocess.run(["taskset", "-c", LOAD_CORE, PYSPY, "record", "-p", str(sb.proc.pid),
                            "-d", f"{args.seconds:g}", "-r", "250", "--format", "raw",
                            "--nonblocking", "-o", str(raw)],
                           check=True, capture_output=True)
            load.wait()
            print(f"### {scenario}\n\n{summarize(raw, args.top)}", flush=True)
    finally:
        sb.stop()
        mock.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
