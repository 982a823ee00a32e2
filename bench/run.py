"""Switchboard's benchmark: one command, one run, every target side by side.

    python -m bench.run            # full run (~12 minutes with both peers installed)
    python -m bench.run --quick    # one round of 2 s runs, 200 held streams (~3 minutes)

Layout (2-core machine): the gateway under test is pinned to core 0; the mock upstream
(bench/mock_upstream.py) and the load drivers (wrk + bench/post.lua for non-streaming
REST, bench/drivers.py for gRPC and streams) share core 1. Targets, in this order:
direct-to-mock, Switchboard REST and gRPC (`switchboard serve`, 1 worker), the same with
`--workers 2` (spread over both cores, so sharing them with the load), and the peers
when installed under bench/.peers (LiteLLM proxy in its own virtualenv, Portkey's
gateway from npm in its own prefix; see bench/README.md).

Non-streaming runs go in interleaved rounds (every target, then again; default 3) and the
table shows medians, so a noisy minute on a shared machine does not land on one target.

Measured per target: req/s at c=1/16/64/256 (ratio vs direct at c=64), p50/p99 latency
at c=1 minus direct's, the gateway's CPU seconds per 1,000 requests (utime+stime of its
whole process tree from /proc, c=64 run), streams one at a time (20 chunks sent at once:
time to first token and total time, minus direct's), and N held streams (100 chunks,
50 ms apart: how many completed, TTFT p50/p99 minus direct's, gateway RSS idle → peak).
The markdown table goes to stdout and, with --write, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PEERS = BENCH / ".peers"
PY = sys.executable
KEY = "sk-bench-key-0123456789"
LITELLM_KEY = "sk-bench-master-key-0123456789"
GW_CORE, LOAD_CORE = "0", "1"
PIN: list[str] = []  # set by --nice: a priority prefix for every process the run starts
CLK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = (1, 16, 64, 256)
CPU_AT = 64
# gRPC load spreads over this many connections (one HTTP/2 connection stays on one
# SO_REUSEPORT worker, so a single one could never show --workers scaling).
GRPC_CHANNELS = 4
BODY = json.dumps({"model": "bench", "messages": [
    {"role": "user", "content": "Say hello in one short sentence."}]}, separators=(",", ":"))
SEQ_MODEL, HELD_MODEL = "bench-s20x0ms", "bench-s100x50ms"
MODELS = ("bench", SEQ_MODEL, HELD_MODEL)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout:g}s")


# ------------------------------------------------------------ /proc figures ----


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ servers ----


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str                       # chat completions URL
    key: str = ""
    headers: list[str] = field(default_factory=list)
    grpc: str = ""                 # gRPC target, when the server has one

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(cmd: list[str], cores: str, logname: str, **kw: Any) -> subprocess.Popen[bytes]:
    OUT.mkdir(exist_ok=True)
    out = open(OUT / f"{logname}.log", "wb")  # closed when the process exits
    return subprocess.Popen([*PIN, "taskset", "-c", cores, *cmd], stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT, **kw)


def start_mock() -> Server:
    port = free_port()
    proc = spawn([PY, "-m", "bench.mock_upstream", "--port", str(port)], LOAD_CORE, "mock")
    wait_port(port, 10, proc)
    return Server("direct (mock upstream)", proc, f"http://127.0.0.1:{port}/v1/chat/completions")


def start_switchboard(mock_port: int, workers: int) -> Server:
    http, grpc = free_port(), free_port()
    cfg = OUT / f"switchboard-w{workers}.yaml"
    for old in OUT.glob(f"switchboard-w{workers}.db*"):
        old.unlink()
    cfg.write_text(
        f'listen: {{http: "127.0.0.1:{http}", grpc: "127.0.0.1:{grpc}"}}\n'
        f"store: 'sqlite:///{OUT}/switchboard-w{workers}.db'\n"
        "shutdown_grace_s: 2\n"
        f"keys: [{{name: bench, key: {KEY}}}]\n"
        "channels:\n"
        f"  - {{name: mock, provider: openai, base_url: 'http://127.0.0.1:{mock_port}/v1',\n"
        f"     api_key: sk-upstream, models: [{', '.join(MODELS)}]}}\n")
    cores = GW_CORE if workers == 1 else f"{GW_CORE},{LOAD_CORE}"
    cmd = [str(Path(PY).parent / "switchboard"), "serve", "--config", str(cfg)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = spawn(cmd, cores, f"switchboard-w{workers}")
    wait_port(http, 30, proc)
    wait_port(grpc, 30, proc)
    time.sleep(0.5 * workers)  # every worker bound (the port opens with the first)
    label = "Switchboard" + (f" ×{workers} workers" if workers > 1 else "")
    return Server(label, proc, f"http://127.0.0.1:{http}/v1/chat/completions", KEY,
                  grpc=f"127.0.0.1:{grpc}")


def litellm_installed() -> bool:
    return (PEERS / "litellm/bin/litellm").exists()


def start_litellm(mock_port: int) -> Server:
    port = free_port()
    cfg = OUT / "litellm.yaml"
    models = "".join(
        f"  - model_name: {m}\n    litellm_params: {{model: openai/{m}, "
        f"api_base: 'http://127.0.0.1:{mock_port}/v1', api_key: sk-upstream}}\n" for m in MODELS)
    cfg.write_text(f"model_list:\n{models}general_settings: {{master_key: {LITELLM_KEY}}}\n"
                   "litellm_settings: {telemetry: false}\n")
    env = {**os.environ, "LITELLM_LOG": "ERROR"}
    proc = spawn([str(PEERS / "litellm/bin/litellm"), "--config", str(cfg), "--port", str(port),
                  "--num_workers", "1"], GW_CORE, "litellm", env=env)
    wait_port(port, 120, proc)
    return Server("LiteLLM proxy", proc, f"http://127.0.0.1:{port}/v1/chat/completions",
                  LITELLM_KEY)


PORTKEY_JS = PEERS / "portkey/node_modules/@portkey-ai/gateway/build/start-server.js"


def start_portkey(mock_port: int) -> Server:
    port = free_port()
    proc = spawn(["node", str(PORTKEY_JS), f"--port={port}", "--headless"], GW_CORE, "portkey")
    wait_port(port, 60, proc)
    return Server("Portkey gateway", proc, f"http://127.0.0.1:{port}/v1/chat/completions",
                  "sk-upstream", headers=["x-portkey-provider: openai",
                                          f"x-portkey-custom-host: http://127.0.0.1:{mock_port}/v1"])


# ------------------------------------------------------------------ drivers ----


def run_load(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
             ) -> tuple[str, float, float]:
    """Run a driver on the load core; (stdout, wall s, driver CPU s)."""
    before, t0 = children_cpu(), time.monotonic()
    res = subprocess.run([*PIN, "taskset", "-c", LOAD_CORE, *cmd], capture_output=True, cwd=ROOT,
                         env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        log(f"driver failed ({res.returncode}): {res.stderr.decode()[-500:]}")
    return res.stdout.decode(), wall, children_cpu() - before


def last_json(text: str, prefix: str = "") -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith(prefix + "{"):
            return dict(json.loads(line[len(prefix):]))
    return {}


@dataclass
class Measure:
    rps: float = 0.0
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    errors: int = 0
    cpu_per_1k: float | None = None
    load_busy: float = 0.0   # load core (mock + driver) CPU / wall
    other_busy: float = 0.0  # CPU used by anything else on the machine / wall (noise)


class Bench:
    def __init__(self, args: argparse.Namespace, mock: Server) -> None:
        self.args = args
        self.mock = mock
        self.results: dict[str, dict[str, Any]] = {}

    def _measure(self, server: Server | None, cmd: list[str], env: dict[str, str] | None,
                 parse: Any) -> Measure:
        pids = server.pids() if server is not None else []
        mock_pids = self.mock.pids()
        cpu0, mock0, all0 = cpu_seconds(pids), cpu_seconds(mock_pids), machine_busy()
        out, wall, driver_cpu = run_load(cmd, env)
        cpu1, mock1, all1 = cpu_seconds(pids), cpu_seconds(mock_pids), machine_busy()
        ours = (cpu1 - cpu0) + (mock1 - mock0) + driver_cpu
        m = parse(out)
        if server is not None and m.rps > 0:
            m.cpu_per_1k = (cpu1 - cpu0) / (m.rps * wall) * 1000.0
        m.load_busy = ((mock1 - mock0) if server is not None else 0.0) + driver_cpu
        m.load_busy /= wall
        m.other_busy = max(0.0, (all1 - all0) - ours) / wall
        return m

    def wrk(self, server: Server | None, url: str, c: int, key: str, headers: list[str],
            duration: float) -> Measure:
        env = {"BENCH_BODY": BODY, "BENCH_AUTH": key, "BENCH_HEADERS": "|".join(headers)}
        cmd = ["wrk", "-t1", f"-c{c}", f"-d{duration:g}s", "--timeout", "10s",
               "-s", str(BENCH / "post.lua"), url]

        def parse(out: str) -> Measure:
            d = last_json(out, "BENCH-JSON ")
            if not d:
                return Measure(errors=-1)
            return Measure(rps=d["requests"] / (d["duration_us"] / 1e6), p50_us=d["p50_us"],
                           p99_us=d["p99_us"], errors=d["non2xx"] + d["errors"])
        # The mock shares the load core: count its CPU in the load core's busy share.
        m = self._measure(server, cmd, env, parse)
        if server is None:
            m.load_busy = 1.0  # wrk + mock together saturate the load core by design
        return m

    def grpc_unary(self, server: Server, c: int, duration: float) -> Measure:
        cmd = [PY, "-m", "bench.drivers", "grpc-unary", "--target", server.grpc, "--key", KEY,
               "-c", str(c), "-d", f"{duration:g}", "--channels", str(min(c, GRPC_CHANNELS))]

        def parse(out: str) -> Measure:
            d = last_json(out)
            if not d:
                return Measure(errors=-1)
            return Measure(rps=d["rps"], p50_us=d["p50_us"], p99_us=d["p99_us"],
                           errors=d["errors"])
        return self._measure(server, cmd, None, parse)

    def streams(self, server: Server | None, kind: str, model: str, n: int, c: int,
                warmup: int) -> dict[str, Any]:
        srv = server or self.mock
        if kind == "grpc":
            cmd = [PY, "-m", "bench.drivers", "grpc-streams", "--target", srv.grpc]
        else:
            cmd = [PY, "-m", "bench.drivers", "rest-streams", "--url", srv.url]
            for h in srv.headers:
                cmd += ["--header", h]
        cmd += ["--key", srv.key, "--model", model, "-n", str(n), "-c", str(c),
                "--warmup", str(warmup)]
        pids = server.pids() if server is not None else []
        peak = [rss_mib(pids)]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak[0] = max(peak[0], rss_mib(pids))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = cpu_seconds(pids)
        out, wall, driver_cpu = run_load(cmd)
        stop.set()
        sampler.join()
        d = last_json(out)
        d["driver_busy"] = driver_cpu / wall
        d["rss_peak_mib"] = peak[0]
        d["cpu_s"] = cpu_seconds(pids) - cpu0
        return d

    # -------------------------------------------------------------- targets ----

    def unary_round(self, name: str, server: Server | None, surface: str) -> None:
        """One pass over the concurrency levels; rounds interleave targets so that a noisy
        minute on a shared machine spreads over all of them, and the table shows medians."""
        a = self.args
        r = self.results.setdefault(name, {"surface": surface, "rounds": {}, "by_c": {}})
        srv = server or self.mock
        if server is not None and "rss_idle_mib" not in r:
            r["rss_idle_mib"] = rss_mib(server.pids())
        # warm-up: connections, caches, allocator
        if surface == "grpc":
            self.grpc_unary(srv, 16, 1.0)
        else:
            self.wrk(server, srv.url, 16, srv.key, srv.headers, 1.0)
        for c in CONCURRENCY:
            if surface == "grpc":
                m = self.grpc_unary(srv, c, a.duration)
            else:
                m = self.wrk(server, srv.url, c, srv.key, srv.headers, a.duration)
            r["rounds"].setdefault(c, []).append(m.__dict__)
            r["by_c"][c] = median_measure(r["rounds"][c])
            log(f"{name:32s} c={c:<3d} {m.rps:9.0f} req/s  p50 {m.p50_us / 1000:7.2f} ms  "
                f"p99 {m.p99_us / 1000:7.2f} ms  err {m.errors}  cpu/1k "
                f"{m.cpu_per_1k if m.cpu_per_1k is not None else float('nan'):.3f}  "
                f"load core {m.load_busy * 100:.0f}%  other {m.other_busy * 100:.0f}%")

    def stream_tests(self, name: str, server: Server | None, surface: str) -> None:
        a = self.args
        r = self.results[name]
        r["seq"] = self.streams(server, surface, SEQ_MODEL, a.seq, 1, 5)
        seq = r["seq"]
        log(f"{name:32s} streams one at a time: {_brief(seq)}, gateway CPU "
            f"{seq.get('cpu_s', 0) / max(1, seq.get('streams', 0) + 5) * 1000:.2f} ms per stream")
        r["held"] = self.streams(server, surface, HELD_MODEL, a.held, a.held, 0)
        log(f"{name:32s} {a.held} held streams: {_brief(r['held'])} "
            f"RSS peak {r['held'].get('rss_peak_mib', 0):.0f} MiB, gateway CPU "
            f"{r['held'].get('cpu_s', 0):.1f} s, driver busy "
            f"{r['held'].get('driver_busy', 0) * 100:.0f}%")


def median_measure(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in rounds[0]:
        values = [r[k] for r in rounds if r[k] is not None and r[k] == r[k]]
        if not values:
            out[k] = rounds[0][k]
        elif k == "errors":
            out[k] = sum(values)
        else:
            out[k] = statistics.median(values)
    return out


def _brief(d: dict[str, Any]) -> str:
    if not d:
        return "no result"
    return (f"{d['completed']}/{d['streams']} done, TTFT p50 {d['ttft_p50_us'] / 1000:.2f} ms "
            f"p99 {d['ttft_p99_us'] / 1000:.2f} ms, total p50 {d['total_p50_us'] / 1000:.2f} ms")


# -------------------------------------------------------------------- table ----


def fmt_ms(us: float) -> str:
    return "n/a" if us != us else f"{us / 1000:.2f}"


def fmt_added(us: float, base: float) -> str:
    if us != us or base != base:
        return "n/a"
    return f"{(us - base) / 1000:+.2f}"


def table(results: dict[str, dict[str, Any]], missing: dict[str, str], held: int) -> str:
    direct = results["direct"]
    d1 = direct["by_c"][1]
    dseq, dheld = direct.get("seq", {}), direct.get("held", {})
    base64 = direct["by_c"][CPU_AT]["rps"]
    head = ("| target | req/s c=1 | c=16 | c=64 (× direct) | c=256 | added p50 / p99 at c=1, ms "
            "| CPU s per 1k req | stream TTFT / total, ms (added) "
            f"| {held} held streams: done, added TTFT p50 / p99, ms | RSS idle → under load, MiB |")
    lines = [head, "|" + "---|" * 10]
    for name, r in results.items():
        bc = r["by_c"]
        tput = [f"{bc[c]['rps']:,.0f}" + (f" ({bc[c]['rps'] / base64:.3f}×)"
                                            if c == CPU_AT and name != "direct" else "")
                + (f" ⚠{bc[c]['errors']} err" if bc[c]["errors"] else "") for c in CONCURRENCY]
        if name == "direct":
            added = f"{fmt_ms(d1['p50_us'])} / {fmt_ms(d1['p99_us'])} (absolute)"
        else:
            added = f"{fmt_added(bc[1]['p50_us'], d1['p50_us'])} / " \
                    f"{fmt_added(bc[1]['p99_us'], d1['p99_us'])}"
        cpu = bc[CPU_AT]["cpu_per_1k"]
        cpu_s = "—" if cpu is None else f"{cpu:.3f}"
        seq, hs = r.get("seq"), r.get("held")
        if not seq:
            seq_s = "—"
        elif name == "direct":
            seq_s = f"{fmt_ms(seq['ttft_p50_us'])} / {fmt_ms(seq['total_p50_us'])} (absolute)"
        else:
            seq_s = (f"{fmt_ms(seq['ttft_p50_us'])} / {fmt_ms(seq['total_p50_us'])} "
                     f"({fmt_added(seq['ttft_p50_us'], dseq.get('ttft_p50_us', float('nan')))} / "
                     f"{fmt_added(seq['total_p50_us'], dseq.get('total_p50_us', float('nan')))})")
            if seq.get("failed"):
                seq_s += f" ⚠{seq['failed']} failed"
        if not hs:
            held_s = "—"
        elif name == "direct":
            held_s = (f"{hs['completed']}/{hs['streams']}, TTFT {fmt_ms(hs['ttft_p50_us'])} / "
                      f"{fmt_ms(hs['ttft_p99_us'])} (absolute)")
        else:
            held_s = (f"{hs['completed']}/{hs['streams']}, "
                      f"{fmt_added(hs['ttft_p50_us'], dheld.get('ttft_p50_us', float('nan')))} / "
                      f"{fmt_added(hs['ttft_p99_us'], dheld.get('ttft_p99_us', float('nan')))}")
        rss = "—" if "rss_idle_mib" not in r else (
            f"{r['rss_idle_mib']:.0f} → {hs['rss_peak_mib']:.0f}" if hs
            else f"{r['rss_idle_mib']:.0f}")
        lines.append(f"| {name} | " + " | ".join(tput) + f" | {added} | {cpu_s} | {seq_s} | "
                     f"{held_s} | {rss} |")
    for name, why in missing.items():
        lines.append(f"| {name} | {why} |" + " |" * 8)
    return "\n".join(lines)


def load_table(results: dict[str, dict[str, Any]]) -> str:
    """Is the load side the bottleneck? Its core's busy share per run (mock + driver)."""
    lines = ["| target | load core busy at c=1 / 16 / 64 / 256 | other processes' CPU (noise) "
             "| gateway CPU s per 1k at c=1 / 16 / 64 / 256 |", "|---|---|---|---|"]
    for name, r in results.items():
        bc = r["by_c"]
        busy = " / ".join(f"{bc[c]['load_busy'] * 100:.0f}%" for c in CONCURRENCY)
        cpu = " / ".join("—" if bc[c]["cpu_per_1k"] is None else f"{bc[c]['cpu_per_1k']:.3f}"
                         for c in CONCURRENCY)
        other = " / ".join(f"{bc[c]['other_busy'] * 100:.0f}%" for c in CONCURRENCY)
        lines.append(f"| {name} | {busy} | {other} | {cpu} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- main ----


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 200 held streams")
    parser.add_argument("--duration", type=float, help="seconds per concurrency level")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, medians reported "
                                                   "(default 3; --quick 1)")
    parser.add_argument("--held", type=int, help="concurrent held streams (default 1000)")
    parser.add_argument("--only", help="comma-separated subset: direct,rest,grpc,workers,"
                                       "litellm,portkey")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument("--nice", type=int, default=0,
                        help="run every benchmark process at this nice level (e.g. -5 on a "
                             "machine shared with other work; needs root for < 0)")
    parser.add_argument("--json", help="also dump raw results to this file")
    args = parser.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 4.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.held = args.held or (200 if args.quick else 1000)
    args.seq = 50 if args.quick else 200
    if args.nice:
        PIN[:] = ["nice", "-n", str(args.nice)]
    only = set((args.only or "direct,rest,grpc,workers,litellm,portkey").split(","))
    only.add("direct")
    if shutil.which("wrk") is None:
        print("bench: wrk is missing (apt-get install -y wrk)", file=sys.stderr)
        return 2
    if os.cpu_count() != 2:
        log(f"note: this machine has {os.cpu_count()} CPUs; pinning uses cores 0 and 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    started = time.monotonic()
    mock = start_mock()
    mock_port = int(mock.url.split(":")[2].split("/")[0])
    bench = Bench(args, mock)
    missing: dict[str, str] = {}
    # Every server starts up front (idle ones cost nothing) so rounds can interleave.
    targets: list[tuple[str, Server | None, str, bool]] = [("direct", None, "rest", True)]
    servers: list[Server] = []
    try:
        if only & {"rest", "grpc"}:
            sb = start_switchboard(mock_port, 1)
            servers.append(sb)
            for surface in ("rest", "grpc"):
                if surface in only:
                    targets.append((f"Switchboard {'REST' if surface == 'rest' else 'gRPC'}",
                                    sb, surface, True))
        if "workers" in only:
            sb2 = start_switchboard(mock_port, 2)
            servers.append(sb2)
            targets += [("Switchboard REST ×2 workers", sb2, "rest", False),
                        ("Switchboard gRPC ×2 workers", sb2, "grpc", False)]
        for peer, installed, start in (("LiteLLM proxy", litellm_installed(), start_litellm),
                                       ("Portkey gateway", PORTKEY_JS.exists(), start_portkey)):
            if peer.split()[0].lower() not in only:
                continue
            if not installed:
                missing[peer] = "not installed (see bench/README.md)"
                continue
            srv = start(mock_port)
            servers.append(srv)
            targets.append((peer, srv, "rest", True))
        for i in range(args.rounds):
            log(f"round {i + 1} of {args.rounds}")
            for name, server, surface, _ in targets:
                bench.unary_round(name, server, surface)
        for name, server, surface, streams in targets:
            if streams:
                bench.stream_tests(name, server, surface)
    finally:
        for srv in servers:
            srv.stop()
        mock.stop()
    elapsed = time.monotonic() - started
    cmd = "python -m bench.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    uname = os.uname()
    md = (f"Command: `{cmd.strip()}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{elapsed / 60:.1f} min, {os.cpu_count()} CPUs, {uname.sysname} {uname.release}, "
          f"{args.duration:g} s per concurrency level, medians of {args.rounds} interleaved "
          "rounds.\n\n"
          + table(bench.results, missing, args.held)
          + "\n\nLoad side (mock upstream + driver share core 1; near 100% means the load side,"
            " not the gateway, may be the limit):\n\n" + load_table(bench.results) + "\n")
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=1, default=str))
    if args.write:
        write_results(md)
    return 0


def write_results(md: str) -> None:
    path = BENCH / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    start, end = "<!-- bench:table -->", "<!-- /bench:table -->"
    block = f"{start}\n{md}{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = "# Benchmark results\n\n" + block + "\n" + text
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
