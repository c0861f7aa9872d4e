#!/usr/bin/env python3
"""wingslite benchmarks: one command, a table on stdout, the figures in bench/results.json.

    python3 bench/run.py                 # everything (about 3-5 minutes on 2 cores)
    python3 bench/run.py --only sync,http --out /tmp/r.json

Every figure is measured against a baseline taken in the same run (machines are noisy), and each
measurement is repeated so that medians can be quoted. The daemon runs as its own process through
the CLI (``wingslite.py --config``), against a Panel stand-in that runs in another process; the
benchmark process is only the client. Memory is the daemon's ``VmRSS`` / ``VmHWM`` from /proc.

Items (see bench/README.md):
  sync   POST /sync p50/p99 on a new connection against its floor: the Panel GET plus the same
         exchange with a bare ThreadingHTTPServer (no limit changed), plus one ``docker update``
         and one fsync'd atomic write (a limit changed, on a running container)
  scale  boot with 1,000 servers (20 pages): API up, boot done, peak RSS; 200 concurrent syncs
  http   GET /api/servers/:server req/s against a bare ThreadingHTTPServer sending the same bytes
  idle   RSS with 100 servers loaded, before and after the first SFTP login; the import floor of
         each layer (Python + pyyaml, wingslite, + docker, + paramiko)
  suspend  1,000 websockets + 20 SFTP sessions on one server, then a suspending sync
  files  files/write, files/contents and /upload/file throughput of 96 MiB vs cp/cat
  console  a container flooding stdout to 30 websockets vs the engine's own attach stream read
           directly; unthrottled, with Wings' default throttle and with a low one (and 1 socket)
  backup   a 200 MiB server directory: backup (POST to the Panel's report) vs ``tar czf`` and
           ``tar cf | gzip -1`` of it; restore (truncating) vs ``tar xzf`` of the same archive
  strangers  GET /api/system latency with 1,000 idle stranger connections held open (reopened as
           the daemon closes them) next to none, at a file limit of 1,024 and at the machine's

A run of some items (``--only``) keeps the other items' figures already in the output file.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import wingslite as w  # noqa: E402

TOKEN_ID = "BenchTokenId0001"
TOKEN = "bench-node-token-0123456789abcdef0123456789abcdef0123456789abcdef"
IMAGE = os.environ.get("WINGSLITE_TEST_IMAGE", "wingslite-test:latest")
RUNNING_STARTUP = 'echo ready; while read -r line; do [ "$line" = quit ] && exit 0; done'


# -- statistics ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- the Panel stand-in (runs in its own process) -----------------------------------------------


def panel_document(uuid: str, startup: str = RUNNING_STARTUP, port: int = 25565) -> dict:
    """The demo's Panel document (shaped as the Panel sends it), with the bench's startup and
    port."""
    doc = w.demo_document(uuid, f"bench {uuid[:8]}", 256, image=IMAGE)
    settings = doc["settings"]
    settings["invocation"] = settings["environment"]["STARTUP"] = startup
    settings["environment"]["P_SERVER_LOCATION"] = "bench"
    settings["allocations"].update(
        default={"ip": "127.0.0.1", "port": port}, mappings={"127.0.0.1": [port]}
    )
    doc["process_configuration"]["startup"]["done"] = ["ready"]
    doc["process_configuration"]["stop"] = {"type": "command", "value": "quit"}
    return doc


class _FastHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1, TCP_NODELAY, one write per answer: a Panel (or baseline) that is never the
    bottleneck."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def answer(
        self, status: int, data: bytes = b"", content_type: str = "application/json"
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: "
            f"{content_type}\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.wfile.write(head.encode() + data)


class BenchPanel(w.PanelStandIn):
    """The module's Panel stand-in, plus ``POST /bench/servers/{uuid}`` (merge into settings, 204)
    and ``POST /bench/all`` (the same change for every server). It keeps no request log, and
    caches each server's encoded document so that the Panel is never the bottleneck."""

    ROUTES = (
        *w.PanelStandIn.ROUTES,
        w.PanelRoute("POST", r"/bench/servers/(?P<ident>[^/]+)", "bench_one", auth=False),
        w.PanelRoute("POST", r"/bench/all", "bench_all", auth=False),
        w.PanelRoute("POST", r"/bench/backups/(?P<backup>[^/]+)", "bench_backup", auth=False),
        w.PanelRoute("GET", r"/bench/backups/(?P<backup>[^/]+)", "bench_backup_row", auth=False),
    )

    def __init__(self, docs: list[dict]):
        super().__init__(TOKEN_ID, TOKEN, docs)
        self.keep_requests = False
        self.sftp_users[("bench", "bench")] = ["*"]
        self.user_uuid = BENCH_USER
        self.encoded: dict[str, bytes] = {}

    def route_server(self, h, req, ident):
        with self.lock:
            data = self.encoded.get(ident)
            if data is None and ident in self.servers:
                data = self.encoded[ident] = self.encode(self.servers[ident])
        if data is None:
            return super().route_server(h, req, ident)
        h.send_bytes(200, data)

    def route_bench_one(self, h, req, ident):
        self.merge_settings(ident, req.body)
        with self.lock:
            self.encoded.pop(ident, None)
        h.send_json(204)

    def route_bench_backup(self, h, req, backup):  # the row the Panel makes before it asks
        self.add_backup(req.body["server"], backup)
        h.send_json(204)

    def route_bench_backup_row(self, h, req, backup):
        with self.lock:
            h.send_json(200, dict(self.backups.get(backup) or {}))

    def route_bench_all(self, h, req):
        for uuid in list(self.servers):
            self.merge_settings(uuid, req.body)
        with self.lock:
            self.encoded.clear()
        h.send_json(204)


def serve_panel(servers: int, port_file: str) -> None:
    """The Panel's remote API for ``servers`` generated servers (see ``BenchPanel``)."""
    docs = []
    for i in range(servers):
        uuid = str(uuidlib.UUID(int=(0x4BE4C000 << 96) | (i + 1), version=4))
        docs.append(panel_document(uuid, port=20000 + i))
    panel = BenchPanel(docs)
    Path(port_file).write_text(json.dumps({"port": panel.port, "uuids": list(panel.servers)}))
    panel.httpd.serve_forever(poll_interval=0.1)


def serve_bare(body_file: str, port_file: str) -> None:
    """The HTTP baseline: a bare ThreadingHTTPServer answering every GET with the same bytes and
    every POST with 204 (a sync's answer)."""
    data = Path(body_file).read_bytes()

    class Handler(_FastHandler):
        def do_GET(self):
            self.answer(200, data, "application/json; charset=utf-8")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer(204)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    Path(port_file).write_text(json.dumps({"port": httpd.server_address[1]}))
    httpd.serve_forever(poll_interval=0.1)


BENCH_USER = "0b0b0b0b-1111-4222-8333-444455556666"


# -- processes ----------------------------------------------------------------------------------


class Child:
    """A child process that writes ``{"port": ...}`` to a file once it listens."""

    def __init__(self, args: list[str], workdir: Path, name: str):
        self.port_file = workdir / f"{name}.port"
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), *args, "--port-file", str(self.port_file)]
        )
        deadline = time.monotonic() + 30
        while not (self.port_file.exists() and self.port_file.read_text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.02)
        time.sleep(0.02)
        self.info = json.loads(self.port_file.read_text())
        self.port = self.info["port"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Daemon:
    """wingslite run through its CLI against a panel, in a fresh root directory."""

    def __init__(
        self,
        panel_port: int,
        workdir: Path,
        node_keys: dict | None = None,
        nofile: int | None = None,
        **wingslite_keys,
    ):
        self.root = Path(tempfile.mkdtemp(prefix="root-", dir=workdir))
        self.port = free_port()
        self.sftp_port = free_port()
        raw = {
            "uuid": str(uuidlib.uuid4()),
            "token_id": TOKEN_ID,
            "token": TOKEN,
            "remote": f"http://127.0.0.1:{panel_port}",
            "api": {"host": "127.0.0.1", "port": self.port},
            "system": {
                "root_directory": str(self.root / "root"),
                "data": str(self.root / "volumes"),
                "backup_directory": str(self.root / "backups"),
                "log_directory": str(self.root / "logs"),
                "tmp_directory": str(self.root / "tmp"),
                "sftp": {"bind_address": "127.0.0.1", "bind_port": self.sftp_port},
            },
            "remote_query": {"timeout": 10},
            "wingslite": {"disk_quota": "soft", **wingslite_keys},
            **(node_keys or {}),
        }
        config = self.root / "config.yml"
        config.write_text(json.dumps(raw))  # JSON is YAML
        self.log = open(self.root / "daemon.log", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(DAEMON_SCRIPT[0]), "--config", str(config)],
            stdout=self.log,
            stderr=self.log,
            preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
        )

    def wait_api(self, timeout_s: float = 60) -> float:
        """Seconds from the process start until ``GET /api/system`` answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if request(self.port, "GET", "/api/system")[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited; see {self.root / 'daemon.log'}")
            time.sleep(0.005)
        raise RuntimeError("the daemon's API did not answer")

    def wait_booted(self, timeout_s: float = 120) -> float:
        self.wait_api()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with_status = request(self.port, "GET", "/api/system")
            if with_status[0] == 200 and json.loads(with_status[1])["wingslite"]["booted"]:
                return time.monotonic() - self.started
            time.sleep(0.01)
        raise RuntimeError("the daemon did not finish booting")

    def memory_kb(self) -> dict[str, int]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                fields[key] = int(value.split()[0])
        return fields

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


DAEMON_SCRIPT = [ROOT / "wingslite.py"]  # --daemon: another wingslite.py to measure


def _limit_files(nofile: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    port: int, method: str, path: str, body=None, conn: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    if own:
        conn.close()
    return resp.status, payload


def panel_post(panel_port: int, path: str, body) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", panel_port, timeout=30)
    conn.request(
        "POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    conn.getresponse().read()
    conn.close()


def docker_api():
    try:
        import docker

        client = docker.APIClient(version="1.41", timeout=30)
        client.inspect_image(IMAGE)
        return client
    except Exception as exc:
        print(
            f"  (no Docker engine or no {IMAGE} image: {exc}; the Docker parts are skipped)",
            flush=True,
        )
        return None


def remove_containers(engine, uuids) -> None:
    for uuid in uuids:
        try:
            engine.remove_container(uuid, force=True)
        except Exception:
            pass


# -- 1. sync overhead ---------------------------------------------------------------------------


def bench_sync(workdir: Path, rounds: int) -> dict:
    """Each sync is sent on a new connection, as the Panel's HTTP client does (a new Guzzle
    client per call), and so is every exchange of its floor: the Panel GET the sync makes, and
    the same POST answered by a bare ThreadingHTTPServer (the HTTP cost any daemon pays)."""
    panel = Child(["--serve-panel", "1"], workdir, "panel")
    (workdir / "empty.json").write_bytes(b"")
    bare = Child(["--serve-bare", str(workdir / "empty.json")], workdir, "bare-sync")
    uuid = panel.info["uuids"][0]
    engine = docker_api()
    daemon = Daemon(panel.port, workdir)
    result: dict = {}
    try:
        daemon.wait_booted()
        client = w.PanelClient(f"http://127.0.0.1:{panel.port}", TOKEN_ID, TOKEN, budget_s=10)
        if engine is not None:
            assert (
                request(daemon.port, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0]
                == 202
            )
            deadline = time.monotonic() + 60
            while (
                json.loads(request(daemon.port, "GET", f"/api/servers/{uuid}")[1])["state"]
                != "running"
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench server did not reach running")
                time.sleep(0.05)

        def bare_exchange() -> float:
            t0 = time.perf_counter()
            assert request(bare.port, "POST", f"/api/servers/{uuid}/sync")[0] == 204
            return time.perf_counter() - t0

        for _ in range(20):  # warm-up
            client.get_server(uuid)
            bare_exchange()
            request(daemon.port, "POST", f"/api/servers/{uuid}/sync")

        # (a) nothing changed: the floor is the Panel GET plus a bare HTTP exchange
        get_s, bare_s, sync_s = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            client.get_server(uuid)
            get_s.append(time.perf_counter() - t0)
            bare_s.append(bare_exchange())
            t0 = time.perf_counter()
            status, _ = request(daemon.port, "POST", f"/api/servers/{uuid}/sync")
            sync_s.append(time.perf_counter() - t0)
            assert status == 204, status
        record = json.loads(request(daemon.port, "GET", f"/api/servers/{uuid}")[1])["wingslite"][
            "last_sync"
        ]
        floor_p50 = pct(get_s, 0.5) + pct(bare_s, 0.5)
        floor_p99 = pct(get_s, 0.99) + pct(bare_s, 0.99)
        result["unchanged"] = {
            "samples": rounds,
            "panel_get_ms": {"p50": ms(pct(get_s, 0.5)), "p99": ms(pct(get_s, 0.99))},
            "bare_exchange_ms": {"p50": ms(pct(bare_s, 0.5)), "p99": ms(pct(bare_s, 0.99))},
            "floor_ms": {"p50": ms(floor_p50), "p99": ms(floor_p99)},
            "sync_ms": {"p50": ms(pct(sync_s, 0.5)), "p99": ms(pct(sync_s, 0.99))},
            "ratio_p50": round(pct(sync_s, 0.5) / floor_p50, 3),
            "ratio_p99": round(pct(sync_s, 0.99) / floor_p99, 3),
            "ratio_p50_vs_panel_get_alone": round(pct(sync_s, 0.5) / pct(get_s, 0.5), 3),
            "target_p50": 1.20,
            "record": record,
        }

        # (b) a limit changed on a running container: floor = Panel GET + bare HTTP exchange +
        # docker update + atomic write
        if engine is not None:
            cid = engine.inspect_container(uuid)["Id"]
            scratch = Path(tempfile.mkdtemp(prefix="fsync-", dir=daemon.root))
            document = json.dumps(panel_document(uuid)).encode()
            get_s, bare_s, update_s, write_s, sync_s = [], [], [], [], []
            for i in range(rounds):
                memory_mb = 256 + (i % 2)
                t0 = time.perf_counter()
                client.get_server(uuid)
                get_s.append(time.perf_counter() - t0)
                bare_s.append(bare_exchange())
                limit = w.memory_limit_bytes(300 + (i % 2))
                t0 = time.perf_counter()
                engine.update_container(cid, mem_limit=limit, memswap_limit=limit)
                update_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                w.atomic_write(scratch / "doc.json", document)
                write_s.append(time.perf_counter() - t0)
                panel_post(
                    panel.port,
                    f"/bench/servers/{uuid}",
                    {"build": {"memory_limit": 1024 + memory_mb}},
                )
                t0 = time.perf_counter()
                status, payload = request(daemon.port, "POST", f"/api/servers/{uuid}/sync")
                sync_s.append(time.perf_counter() - t0)
                assert status == 204, (status, payload)
            record = json.loads(request(daemon.port, "GET", f"/api/servers/{uuid}")[1])[
                "wingslite"
            ]["last_sync"]
            parts = (get_s, bare_s, update_s, write_s)
            floor = [sum(sample) for sample in zip(*parts, strict=True)]
            floor_p50 = sum(pct(p, 0.5) for p in parts)
            floor_p99 = sum(pct(p, 0.99) for p in parts)
            result["limit_changed"] = {
                "samples": rounds,
                "panel_get_ms": {"p50": ms(pct(get_s, 0.5)), "p99": ms(pct(get_s, 0.99))},
                "bare_exchange_ms": {"p50": ms(pct(bare_s, 0.5)), "p99": ms(pct(bare_s, 0.99))},
                "docker_update_ms": {"p50": ms(pct(update_s, 0.5)), "p99": ms(pct(update_s, 0.99))},
                "atomic_write_ms": {"p50": ms(pct(write_s, 0.5)), "p99": ms(pct(write_s, 0.99))},
                "floor_ms": {
                    "p50": ms(floor_p50),
                    "p99": ms(floor_p99),
                    "p50_of_sums": ms(pct(floor, 0.5)),
                },
                "sync_ms": {"p50": ms(pct(sync_s, 0.5)), "p99": ms(pct(sync_s, 0.99))},
                "ratio_p50": round(pct(sync_s, 0.5) / floor_p50, 3),
                "ratio_p99": round(pct(sync_s, 0.99) / floor_p99, 3),
                "target_p50": 1.10,
                "record": record,
            }
    finally:
        daemon.stop()
        if engine is not None:
            remove_containers(engine, panel.info["uuids"])
        panel.stop()
        bare.stop()
    return result


# -- 2. scale -----------------------------------------------------------------------------------


def bench_scale(workdir: Path, boots: int, rounds: int) -> dict:
    panel = Child(["--serve-panel", "1000"], workdir, "panel")
    uuids = panel.info["uuids"]
    result: dict = {"servers": len(uuids), "pages": 20}
    try:
        api_up, booted, hwm, rss = [], [], [], []
        for i in range(boots):
            daemon = Daemon(panel.port, workdir)
            try:
                api_up.append(daemon.wait_api())
                booted.append(daemon.wait_booted())
                time.sleep(0.5)
                memory = daemon.memory_kb()
                hwm.append(memory["VmHWM"] / 1024)
                rss.append(memory["VmRSS"] / 1024)
                if i == boots - 1:
                    result["concurrent_syncs"] = concurrent_syncs(
                        daemon, panel, uuids[:200], rounds
                    )
                    memory = daemon.memory_kb()
                    result["concurrent_syncs"]["peak_rss_mb_after"] = round(
                        memory["VmHWM"] / 1024, 1
                    )
            finally:
                daemon.stop()
        floor = import_floor_mb()
        result.update(
            import_floor_rss_mb=floor,
            peak_rss_over_floor_mb=round(statistics.median(hwm) - floor, 1),
            boots=boots,
            api_up_s={
                "median": round(statistics.median(api_up), 3),
                "max": round(max(api_up), 3),
                "target": 3.0,
            },
            boot_done_s={
                "median": round(statistics.median(booted), 3),
                "max": round(max(booted), 3),
            },
            peak_rss_mb={
                "median": round(statistics.median(hwm), 1),
                "max": round(max(hwm), 1),
                "target": 60,
            },
            rss_after_boot_mb={"median": round(statistics.median(rss), 1)},
        )
    finally:
        panel.stop()
    return result


def concurrent_syncs(daemon: Daemon, panel: Child, uuids: list[str], rounds: int) -> dict:
    """``len(uuids)`` syncs at once, one per server, each on its own connection; ``rounds``
    times."""
    walls, latencies, statuses = [], [], []
    n = len(uuids)
    conns = [http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60) for _ in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for r in range(rounds + 1):
            panel_post(
                panel.port, "/bench/all", {"build": {"disk_space": 2048 + r}}
            )  # every sync has a change to apply
            barrier = threading.Barrier(n + 1)

            def one(i, barrier=barrier):
                barrier.wait()
                t0 = time.perf_counter()
                status, _ = request(
                    daemon.port, "POST", f"/api/servers/{uuids[i]}/sync", conn=conns[i]
                )
                return status, time.perf_counter() - t0

            futures = [pool.submit(one, i) for i in range(n)]
            barrier.wait()
            t0 = time.perf_counter()
            done = [f.result() for f in futures]
            wall = time.perf_counter() - t0
            if r == 0:
                continue  # warm-up: connections opened, threads started
            walls.append(wall)
            statuses += [s for s, _ in done]
            latencies += [d for _, d in done]
    for c in conns:
        c.close()
    throughput = [n / x for x in walls]
    return {
        "concurrency": n,
        "rounds": rounds,
        "all_204": all(s == 204 for s in statuses),
        "throughput_per_s": {"median": round(statistics.median(throughput), 1)},
        "latency_ms": {"p50": ms(pct(latencies, 0.5)), "p99": ms(pct(latencies, 0.99))},
        "wall_ms": {"median": ms(statistics.median(walls))},
    }


# -- 5. HTTP ------------------------------------------------------------------------------------

_LOAD_CLIENT = r"""
import socket, sys, threading, time
port, path, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conns, seconds = int(sys.argv[4]), float(sys.argv[5])
req = (
    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    "Accept: application/json\r\n\r\n"
).encode()
counts = [0] * conns
start = threading.Event()
def run(i):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    start.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s.sendall(req)
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buf[:head_end].lower()
                k = head.find(b"content-length:")
                line_end = head.find(b"\r\n", k)
                length = int(head[k + 15:line_end if line_end > 0 else None]) if k >= 0 else 0
                total = head_end + 4 + length
                if len(buf) >= total:
                    assert buf.startswith(b"HTTP/1.1 200"), buf[:80]
                    buf = buf[total:]
                    break
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed")
            buf += chunk
        counts[i] += 1
    s.close()
threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
for t in threads: t.start()
time.sleep(0.2); start.set()
for t in threads: t.join()
print(sum(counts) / seconds)
"""


def load(port: int, path: str, conns: int, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_CLIENT, str(port), path, TOKEN, str(conns), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def bench_http(workdir: Path, rounds: int, seconds: float) -> dict:
    panel = Child(["--serve-panel", "100"], workdir, "panel")
    uuid = panel.info["uuids"][0]
    daemon = Daemon(panel.port, workdir)
    bare = None
    try:
        daemon.wait_booted()
        status, body = request(daemon.port, "GET", f"/api/servers/{uuid}")
        assert status == 200
        (workdir / "body.json").write_bytes(body)
        bare = Child(["--serve-bare", str(workdir / "body.json")], workdir, "bare")
        path = f"/api/servers/{uuid}"
        result = {"body_bytes": len(body), "connections": {}}
        for conns in (1, 8):
            ours, theirs = [], []
            load(daemon.port, path, conns, 0.5)  # warm-up
            load(bare.port, path, conns, 0.5)
            for _ in range(rounds):  # alternate so that drift hits both alike
                ours.append(load(daemon.port, path, conns, seconds))
                theirs.append(load(bare.port, path, conns, seconds))
            result["connections"][str(conns)] = {
                "wingslite_rps": {
                    "median": round(statistics.median(ours)),
                    "all": [round(x) for x in ours],
                },
                "bare_rps": {
                    "median": round(statistics.median(theirs)),
                    "all": [round(x) for x in theirs],
                },
                "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
                "target": 0.8,
            }
        return result
    finally:
        daemon.stop()
        if bare is not None:
            bare.stop()
        panel.stop()


# What each layer of the daemon's imports costs, each measured in a fresh process that imports it,
# gives the C heap's free pages back (as the daemon does after its boot) and waits.
# "docker_sdk_as_shipped" is ``import docker`` as the SDK does it by itself: with paramiko
# installed it pulls in its ssh:// transport, paramiko and cryptography.
_IMPORT_LAYERS = {
    "python_pyyaml": "import yaml",
    "wingslite": "import wingslite",
    "wingslite_docker": "import wingslite; wingslite._docker()",
    "wingslite_docker_paramiko": "import wingslite, paramiko; wingslite._docker()",
    "docker_sdk_as_shipped": "import yaml, docker",
}


def import_floor_mb(code: str = _IMPORT_LAYERS["wingslite_docker"]) -> float:
    """RSS of a fresh process that runs ``code`` and waits."""
    setup = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
    tail = "; import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)"
    tail += "; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", setup + code + tail], stdout=subprocess.PIPE, text=True
    )
    try:
        proc.stdout.readline()
        time.sleep(0.3)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return round(
            int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024, 1
        )
    finally:
        proc.kill()
        proc.wait()


# -- /api/system next to idle strangers -----------------------------------------------------------


class StrangerCrowd:
    """``count`` connections to the API that never send a byte, reopened as the daemon closes them
    (at its header deadline, or to make room at its connection cap) -- as a slowloris would."""

    def __init__(self, port: int, count: int):
        import selectors

        self.port, self.count = port, count
        self.selector = selectors.DefaultSelector()  # epoll: select() stops at 1,024 descriptors
        self.opened = self.failed = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def __enter__(self) -> StrangerCrowd:
        for _ in range(self.count):
            self._open()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()

    def _open(self) -> None:
        import selectors

        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.failed += 1
            return
        self.selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _hold(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(0.2):
                self.selector.unregister(key.fileobj)
                key.fileobj.close()
            for _ in range(self.count - len(self.selector.get_map())):
                self._open()
            self.stopping.wait(0.2)  # an attacker's pace, not a connection flood

    def open_now(self) -> int:
        return len(self.selector.get_map())


def system_latencies(port: int, count: int, give_up_after: int = 10) -> dict:
    """``GET /api/system`` on a new connection each time (as the Panel calls): latencies of the
    answers, and how many failed (no answer within 10 s, refused, or not 200); it stops after
    ``give_up_after`` failures."""
    latencies, failures = [], 0
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            status, _ = request(port, "GET", "/api/system", conn=conn)
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        if status == 200:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
            if failures >= give_up_after:
                break
    return {
        "p50_ms": ms(pct(latencies, 0.5)),
        "p99_ms": ms(pct(latencies, 0.99)),
        "answered": len(latencies),
        "failures": failures,
    }


def _strangers_round(daemon: Daemon, strangers: int, count: int) -> dict:
    quiet = system_latencies(daemon.port, count)
    with StrangerCrowd(daemon.port, strangers) as crowd:
        time.sleep(1.0)
        crowded = system_latencies(daemon.port, count)
        crowd_figures = {
            "strangers_open_at_end": crowd.open_now(),
            "stranger_connections_opened": crowd.opened,
            "stranger_connections_failed": crowd.failed,
            "daemon_threads": daemon.memory_kb()["Threads"],
        }
    time.sleep(1.0)  # the daemon lets go of the crowd before the next round
    return {"none": quiet, "with_strangers": crowded, **crowd_figures}


def bench_strangers(workdir: Path, strangers: int, count: int, rounds: int) -> dict:
    import resource

    panel = Child(["--serve-panel", "10"], workdir, "panel")
    result: dict = {"strangers": strangers, "requests": count, "rounds": rounds, "file_limits": {}}
    try:
        for nofile in (1024, None):  # the usual default, then this machine's
            daemon = Daemon(panel.port, workdir, nofile=nofile)
            try:
                daemon.wait_booted()
                system_latencies(daemon.port, 20)  # warm-up
                runs = [_strangers_round(daemon, strangers, count) for _ in range(rounds)]
            finally:
                daemon.stop()
            p50 = {
                k: statistics.median(r[k]["p50_ms"] for r in runs)
                for k in ("none", "with_strangers")
            }
            p99 = {
                k: statistics.median(r[k]["p99_ms"] for r in runs)
                for k in ("none", "with_strangers")
            }
            limit = nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            result["file_limits"][str(limit)] = {
                "p50_ms": p50,
                "p99_ms": p99,
                "ratio_p50": round(p50["with_strangers"] / p50["none"], 2),
                "ratio_p99": round(p99["with_strangers"] / p99["none"], 2),
                "failures": sum(r["with_strangers"]["failures"] for r in runs),
                "rounds": runs,
            }
    finally:
        panel.stop()
    return result


def sftp_login(daemon: Daemon, uuid: str) -> None:
    """One SFTP login and a directory listing, as a client would make them."""
    import paramiko

    transport = paramiko.Transport(("127.0.0.1", daemon.sftp_port))
    try:
        transport.connect(username=f"bench.{uuid[:8]}", password="bench")
        client = paramiko.SFTPClient.from_transport(transport)
        client.listdir("/")
        client.close()
    finally:
        transport.close()


# -- 6. idle RSS --------------------------------------------------------------------------------


def bench_idle(workdir: Path, boots: int) -> dict:
    """RSS of a daemon with 100 servers, SFTP listening, before and after the first SFTP login."""
    panel = Child(["--serve-panel", "100"], workdir, "panel")
    rss, hwm, after_login = [], [], []
    try:
        for _ in range(boots):
            daemon = Daemon(panel.port, workdir)
            try:
                daemon.wait_booted()
                time.sleep(2)
                memory = daemon.memory_kb()
                rss.append(memory["VmRSS"] / 1024)
                hwm.append(memory["VmHWM"] / 1024)
                sftp_login(daemon, panel.info["uuids"][0])
                time.sleep(1)
                after_login.append(daemon.memory_kb()["VmRSS"] / 1024)
            finally:
                daemon.stop()
    finally:
        panel.stop()
    layers = {name: import_floor_mb(code) for name, code in _IMPORT_LAYERS.items()}
    floor = layers["wingslite_docker"]
    return {
        "servers": 100,
        "import_layers_rss_mb": layers,
        "import_floor_rss_mb": floor,
        "rss_over_floor_mb": round(statistics.median(rss) - floor, 1),
        "rss_mb": {
            "median": round(statistics.median(rss), 1),
            "max": round(max(rss), 1),
            "target": 40,
        },
        "peak_rss_mb": {"median": round(statistics.median(hwm), 1)},
        "rss_after_first_sftp_login_mb": {"median": round(statistics.median(after_login), 1)},
    }


# -- 3. suspension ------------------------------------------------------------------------------


def jwt(server_uuid: str, secret: str = TOKEN) -> str:
    """An HS256 token as the Panel's NodeJWTService signs it (the header repeats the jti)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": "http://127.0.0.1",
        "aud": ["http://127.0.0.1"],
        "jti": hashlib.md5(os.urandom(8)).hexdigest(),
        "iat": now,
        "nbf": now - 1,
        "exp": now + 600,
        "server_uuid": server_uuid,
        "permissions": ["*"],
        "user_uuid": BENCH_USER,
        "user_id": 1,
        "unique_id": os.urandom(8).hex(),
    }
    signing = (
        b64(json.dumps({"typ": "JWT", "alg": "HS256", "jti": claims["jti"]}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    return signing + "." + b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())


def watch_sftp(clients: list, closed: list[float]) -> None:
    """Note when each SFTP transport sees its connection end (polled every millisecond)."""
    pending = list(clients)
    deadline = time.perf_counter() + 30
    while pending and time.perf_counter() < deadline:
        for client in [
            c
            for c in pending
            if not c[0].is_active() or c[1].get_channel().closed or c[1].get_channel().eof_received
        ]:
            closed.append(time.perf_counter())
            pending.remove(client)
        time.sleep(0.001)


def bench_suspend(workdir: Path, sockets: int, sftp_sessions: int) -> dict:
    import asyncio

    import websockets

    panel = Child(["--serve-panel", "1"], workdir, "panel")
    uuid = panel.info["uuids"][0]
    time.sleep(
        1.1
    )  # JWTs issued in the daemon's first second are refused (iat before boot, as Wings)
    daemon = Daemon(
        panel.port,
        workdir,
        websocket_max_per_server=sockets + 10,
        sftp_enabled=True,
        sftp_max_sessions_per_user=sftp_sessions,  # one bench user holds them all
    )
    result: dict = {"websockets": sockets, "sftp_sessions": sftp_sessions}
    sftp_clients = []
    try:
        daemon.wait_booted()
        time.sleep(1.1)
        try:
            import paramiko

            for _ in range(sftp_sessions):
                transport = paramiko.Transport(("127.0.0.1", daemon.sftp_port))
                transport.connect(username=f"bench.{uuid[:8]}", password="bench")
                sftp = paramiko.SFTPClient.from_transport(transport)
                sftp.listdir(".")
                sftp_clients.append((transport, sftp))
        except Exception as exc:
            result["sftp_error"] = f"{type(exc).__name__}: {exc}"
        base = f"ws://127.0.0.1:{daemon.port}/api/servers/{uuid}/ws"

        async def run() -> dict:
            opened = []
            closed_at: list[float] = []
            codes: list[int] = []

            async def one() -> None:
                ws = await websockets.connect(
                    base,
                    origin=f"http://127.0.0.1:{panel.port}",
                    open_timeout=60,
                    max_queue=None,
                    ping_interval=None,
                )
                await ws.send(json.dumps({"event": "auth", "args": [jwt(uuid)]}))
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("event") == "auth success":
                        break
                opened.append(ws)
                try:
                    async for _ in ws:
                        pass
                except websockets.ConnectionClosed:
                    pass
                closed_at.append(time.perf_counter())
                codes.append(ws.close_code)

            tasks = [asyncio.create_task(one()) for _ in range(sockets)]
            t_open = time.perf_counter()
            while len(opened) < sockets:
                await asyncio.sleep(0.05)
                failed = [t for t in tasks if t.done() and t.exception()]
                if failed:
                    raise failed[0].exception()
                if time.perf_counter() - t_open > 240:
                    raise RuntimeError(f"only {len(opened)} websockets opened")
            open_s = time.perf_counter() - t_open
            open_sessions = json.loads(request(daemon.port, "GET", "/api/system")[1])
            panel_post(panel.port, f"/bench/servers/{uuid}", {"suspended": True})
            # The sync goes through the same event loop as the websockets, so that the order in
            # which their bytes are read is the order in which they arrived.
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            sftp_closed: list[float] = []
            watcher = threading.Thread(
                target=watch_sftp, args=(sftp_clients, sftp_closed), daemon=True
            )
            t0 = time.perf_counter()
            watcher.start()
            writer.write(
                (
                    f"POST /api/servers/{uuid}/sync HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
                ).encode()
            )
            await writer.drain()
            status_line = await reader.readline()
            t_204 = time.perf_counter()
            status = int(status_line.split()[1])
            writer.close()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return {
                "open_s": round(open_s, 2),
                "status": status,
                "answer_ms": ms(t_204 - t0),
                "last_websocket_close_ms": ms(max(closed_at) - t0),
                "websockets_closed_before_204": sum(1 for c in closed_at if c <= t_204),
                "last_sftp_close_ms": ms(max(sftp_closed) - t0) if sftp_closed else None,
                "sftp_closed": len(sftp_closed),
                "close_codes": sorted(set(codes)),
                "system": open_sessions.get("wingslite"),
                "sync_record_ms": None,
            }

        ws_result = asyncio.run(run())
        memory = daemon.memory_kb()
        ws_result["peak_rss_mb"] = round(memory["VmHWM"] / 1024, 1)
        usable = 0
        for _, sftp in sftp_clients:  # a session the suspension missed would still list files
            try:
                sftp.get_channel().settimeout(2)
                sftp.listdir(".")
                usable += 1
            except Exception:
                pass
        ws_result["sftp_usable_after_suspension"] = usable
        record = json.loads(request(daemon.port, "GET", f"/api/servers/{uuid}")[1])["wingslite"][
            "last_sync"
        ]
        ws_result["sync_record_ms"] = record.get("duration_ms")
        ws_result["record_applied"] = record.get("applied")
        result.update(ws_result)
        result["target_ms"] = 250
    finally:
        for transport, _ in sftp_clients:
            transport.close()
        daemon.stop()
        panel.stop()
    return result


# -- 4. console flood ---------------------------------------------------------------------------

# "ready" is the server's done line. ``flood-done`` (in the server's data directory, on the host)
# gets its mtime when the container has written its last line, so the benchmark can tell whether
# the console held the process back. The pause before "flood-end" outlasts any throttle window, so
# the end marker always gets through (a queue that drops, drops the oldest, never the newest).
FLOOD_STARTUP = (
    "echo ready; seq 1 {lines}; : > flood-done; sleep 1; echo flood-end; exec sleep 1000"
)
_CONSOLE_PREFIX = '{"event":"console output","args":["'


def engine_flood(engine, lines: int) -> dict:
    """The baseline: the same flood in a container made as the daemon makes it (TTY, one CPU),
    read straight from the engine's attach stream by this process, with nothing else running."""
    host = engine.create_host_config(
        cpu_quota=100_000, cpu_period=100_000, mem_limit=256 << 20, network_mode="bridge"
    )
    name = f"wingslite-bench-flood-{uuidlib.uuid4().hex[:12]}"
    environment = {"STARTUP": FLOOD_STARTUP.format(lines=lines)}
    engine.create_container(
        IMAGE, None, name=name, tty=True, stdin_open=True, environment=environment, host_config=host
    )
    try:
        owner = engine.attach_socket(
            name, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        sock = getattr(owner, "_sock", owner)
        sock.settimeout(60)
        engine.start(name)
        seen, first, last = 0, None, None
        while seen < lines + 1:  # "ready", then the flood
            data = sock.recv(65536)
            if not data:
                break
            last = time.perf_counter()
            seen += data.count(b"\n")
            if first is None and seen > 1:
                first = last
        sock.close()
        if seen < lines + 1 or first is None or last == first:
            raise RuntimeError(f"the engine's stream ended after {seen} lines")
        return {
            "lines": lines,
            "seconds": round(last - first, 3),
            "lines_per_s": round(lines / (last - first)),
        }
    finally:
        engine.remove_container(name, force=True)


async def _flood_sockets(
    daemon: Daemon, panel: Child, uuid: str, sockets: int, timeout_s: float
) -> list[dict]:
    """``sockets`` authenticated consoles; start the server; count what each receives of the
    flood."""
    import asyncio

    import websockets

    url = f"ws://127.0.0.1:{daemon.port}/api/servers/{uuid}/ws"
    conns = []
    for _ in range(sockets):
        ws = await websockets.connect(
            url,
            origin=f"http://127.0.0.1:{panel.port}",
            open_timeout=30,
            max_queue=None,
            ping_interval=None,
            compression=None,
        )
        await ws.send(json.dumps({"event": "auth", "args": [jwt(uuid)]}))
        while json.loads(await ws.recv()).get("event") != "auth success":
            pass
        conns.append(ws)

    async def count(ws) -> dict:
        lines, warnings, first, last, first_wall = 0, 0, None, None, None
        async for message in ws:
            if not message.startswith(_CONSOLE_PREFIX):
                continue  # status, stats
            line = message[len(_CONSOLE_PREFIX) : -3]  # '..."]}'
            if line[:1].isdigit():
                last = time.perf_counter()
                if first is None:
                    first, first_wall = last, time.time()
                lines += 1
            elif "outputting console data too quickly" in line:
                warnings += 1
            elif line == "flood-end":
                break
        return {
            "lines": lines,
            "warnings": warnings,
            "first": first,
            "last": last,
            "first_wall": first_wall,
        }

    try:
        counters = [asyncio.create_task(count(ws)) for ws in conns]
        status = await asyncio.to_thread(
            request, daemon.port, "POST", f"/api/servers/{uuid}/power", {"action": "start"}
        )
        if status[0] != 202:
            raise RuntimeError(f"power start answered {status}")
        return await asyncio.wait_for(asyncio.gather(*counters), timeout_s)
    finally:
        for ws in conns:
            await ws.close()
        await asyncio.to_thread(
            request, daemon.port, "POST", f"/api/servers/{uuid}/power", {"action": "kill"}
        )


def _flood_round(daemon: Daemon, panel: Child, uuid: str, sockets: int, lines: int) -> dict:
    import asyncio

    done_file = daemon.root / "volumes" / uuid / "flood-done"
    done_file.unlink(missing_ok=True)
    counts = asyncio.run(_flood_sockets(daemon, panel, uuid, sockets, 180))
    deadline = time.monotonic() + 30
    while json.loads(request(daemon.port, "GET", f"/api/servers/{uuid}")[1])["state"] != "offline":
        if time.monotonic() > deadline:
            raise RuntimeError("the flood server did not stop")
        time.sleep(0.05)
    got = [c for c in counts if c["lines"] > 1]
    rates = sorted(c["lines"] / (c["last"] - c["first"]) for c in got)
    started = min(c["first"] for c in got)
    return {
        "per_socket_lines_per_s": round(statistics.median(rates)) if rates else 0,
        "slowest_socket_lines_per_s": round(rates[0]) if rates else 0,
        "delivered_fraction": round(statistics.median(c["lines"] for c in counts) / lines, 4),
        # first flood line at any socket -> last at any socket; and -> the container's last write
        "flood_seconds": round(max(c["last"] for c in got) - started, 3),
        "container_wrote_all_s": round(
            done_file.stat().st_mtime - min(c["first_wall"] for c in got), 3
        ),
        "warnings_per_socket": sorted({c["warnings"] for c in counts}),
    }


# name -> (node config keys, lines in the flood, sockets). Wings' default throttle (2,000 lines per
# 100 ms) and one low enough to be the tightest limit on this path (100 per 100 ms = 1,000 lines/s);
# one socket alone shows what the fan-out to 30 costs.
FLOOD_CONFIGS = {
    "unthrottled": ({"throttles": {"enabled": False}}, 30_000, 30),
    "throttle_2000_per_100ms": (
        {"throttles": {"enabled": True, "lines": 2000, "line_reset_interval": 100}},
        30_000,
        30,
    ),
    "throttle_100_per_100ms": (
        {"throttles": {"enabled": True, "lines": 100, "line_reset_interval": 100}},
        300_000,
        30,
    ),
    "unthrottled_1_socket": ({"throttles": {"enabled": False}}, 30_000, 1),
}
ENGINE_FLOOD_LINES = 300_000


def bench_console(workdir: Path, rounds: int) -> dict:
    engine = docker_api()
    if engine is None:
        raise RuntimeError("needs the Docker engine and the test image")
    panel = Child(["--serve-panel", "1"], workdir, "panel")
    uuid = panel.info["uuids"][0]
    result: dict = {"rounds": rounds, "engine": []}
    try:
        engine_flood(engine, ENGINE_FLOOD_LINES)  # warm-up
        for name, (keys, lines, sockets) in FLOOD_CONFIGS.items():
            startup = FLOOD_STARTUP.format(lines=lines)
            panel_post(
                panel.port,
                f"/bench/servers/{uuid}",
                {"invocation": startup, "environment": {"STARTUP": startup}},
            )
            time.sleep(
                1.1
            )  # JWTs issued in the daemon's first second are refused (iat before boot, as Wings)
            daemon = Daemon(
                panel.port, workdir, node_keys=keys, websocket_max_per_server=max(sockets, 30)
            )
            runs = []
            try:
                daemon.wait_booted()
                time.sleep(1.1)
                for _ in range(rounds):  # alternate with the baseline so that drift hits both alike
                    result["engine"].append(engine_flood(engine, ENGINE_FLOOD_LINES))
                    runs.append(_flood_round(daemon, panel, uuid, sockets, lines))
            finally:
                daemon.stop()
                remove_containers(engine, [uuid])
            throttle = keys["throttles"]
            result[name] = {
                "sockets": sockets,
                "lines": lines,
                "configured_lines_per_s": throttle["lines"]
                * 1000
                // throttle["line_reset_interval"]
                if throttle["enabled"]
                else None,
                "runs": runs,
                "per_socket_lines_per_s": round(
                    statistics.median(r["per_socket_lines_per_s"] for r in runs)
                ),
                "delivered_fraction": statistics.median(r["delivered_fraction"] for r in runs),
                "through_daemon_lines_per_s": round(
                    statistics.median(lines / r["flood_seconds"] for r in runs)
                ),
                "container_wrote_all_s": statistics.median(
                    r["container_wrote_all_s"] for r in runs
                ),
                "warnings_per_socket": sorted({x for r in runs for x in r["warnings_per_socket"]}),
            }
    finally:
        panel.stop()
    engine_rate = statistics.median(r["lines_per_s"] for r in result["engine"])
    result["engine_lines_per_s"] = round(engine_rate)
    result["engine_seconds_for_300k"] = statistics.median(r["seconds"] for r in result["engine"])
    for name in FLOOD_CONFIGS:
        result[name]["ratio_to_engine"] = round(
            result[name]["per_socket_lines_per_s"] / engine_rate, 4
        )
    return result


# -- the table ----------------------------------------------------------------------------------


# -- 7. backups ---------------------------------------------------------------------------------


def fill_server_directory(root: Path, mib: int) -> None:
    """``mib`` MiB in 1 MiB files: half random bytes (incompressible), half log-like text."""
    line = b"[12:00:00 INFO]: Player joined the game at x=12 y=64 z=-30 (world)\n"
    text = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
    for i in range(mib):
        folder = root / f"region{i // 32}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.dat").write_bytes(os.urandom(1 << 20) if i % 2 else text)


def backup_row(panel_port: int, backup: str, key: str, timeout_s: float = 600) -> dict:
    """The Panel's backup row once ``key`` (successful: the backup; restored: a restore) is set."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", panel_port, timeout=30)
        conn.request("GET", f"/bench/backups/{backup}")
        row = json.loads(conn.getresponse().read())
        conn.close()
        if row.get(key) is not None:
            return row
        time.sleep(0.02)
    raise RuntimeError(f"the Panel got no {key} report for backup {backup}")


def timed(args: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def bench_backup(workdir: Path, rounds: int, mib: int = 200) -> dict:
    """Backup and restore throughput of the daemon against tar on the same directory."""
    panel = Child(["--serve-panel", "1"], workdir, "panel")
    daemon = Daemon(panel.port, workdir)
    try:
        daemon.wait_booted()
        server = panel.info["uuids"][0]
        root = daemon.root / "volumes" / server
        fill_server_directory(root, mib)
        size_mb = mib * 1.048576
        names = ("backup", "tar_czf", "tar_gzip1", "restore", "tar_xzf")
        figures: dict[str, list[float]] = {k: [] for k in names}
        peak = []
        for _ in range(rounds):
            backup = str(uuidlib.uuid4())
            panel_post(panel.port, f"/bench/backups/{backup}", {"server": server})
            t0 = time.monotonic()
            body = {"adapter": "wings", "uuid": backup, "ignore": ""}
            assert request(daemon.port, "POST", f"/api/servers/{server}/backup", body)[0] == 202
            report = backup_row(panel.port, backup, "successful")
            figures["backup"].append(time.monotonic() - t0)
            assert report["successful"], report
            archive = daemon.root / "backups" / f"{backup}.tar.gz"
            out = workdir / "baseline.tar.gz"
            figures["tar_czf"].append(timed(["tar", "czf", str(out), "-C", str(root), "."]))
            figures["tar_gzip1"].append(
                timed(["sh", "-c", f"tar cf - -C '{root}' . | gzip -1 > '{out}'"])
            )
            target = workdir / "untar"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            figures["tar_xzf"].append(timed(["tar", "xzf", str(archive), "-C", str(target)]))
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.monotonic()
            body = {"adapter": "wings", "truncate_directory": True, "download_url": ""}
            path = f"/api/servers/{server}/backup/{backup}/restore"
            assert request(daemon.port, "POST", path, body)[0] == 202
            assert backup_row(panel.port, backup, "restored")["restored"]
            figures["restore"].append(time.monotonic() - t0)
            restored = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            assert restored == mib << 20, f"restored {restored} bytes, not {mib << 20}"
            peak.append(daemon.memory_kb()["VmHWM"] / 1024)
        med = {k: statistics.median(v) for k, v in figures.items()}
        return {
            "directory_mib": mib,
            "seconds": {k: round(v, 2) for k, v in med.items()},
            "mb_per_s": {k: round(size_mb / v, 1) for k, v in med.items()},
            "backup_vs_tar_czf": round(med["tar_czf"] / med["backup"], 2),
            "backup_vs_tar_gzip1": round(med["tar_gzip1"] / med["backup"], 2),
            "restore_vs_tar_xzf": round(med["tar_xzf"] / med["restore"], 2),
            "daemon_peak_rss_mb": round(max(peak), 1),
            "archive_bytes": report["size"],
        }
    finally:
        daemon.stop()
        panel.stop()


# -- 8. file manager throughput -------------------------------------------------------------------

FILE_BENCH_MIB = 96  # under the default api.upload_limit (100 MiB), so one size serves all three
_MIB = 1048576


def _timed_cmd(args: list[str], stdout=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=stdout)
    return time.perf_counter() - t0


def _send_body(port: int, method: str, path: str, chunks, length: int, headers: dict) -> float:
    """Seconds to send ``length`` bytes (an iterable of chunks) and read the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=_MIB)
    t0 = time.perf_counter()
    conn.request(method, path, body=chunks, headers={**headers, "Content-Length": str(length)})
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    if resp.status not in (200, 204):
        raise RuntimeError(f"{method} {path.split('?')[0]} answered {resp.status}")
    return elapsed


def _file_chunks(path: Path, prefix: bytes = b"", suffix: bytes = b""):
    yield prefix
    with open(path, "rb") as fh:
        while chunk := fh.read(_MIB):
            yield chunk
    yield suffix


def _read_body(port: int, path: str, headers: dict) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    total = 0
    while chunk := resp.read(_MIB):
        total += len(chunk)
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed, total


def _pipe_read_s(path: Path) -> float:
    """Seconds for this process to read ``cat path`` through a pipe in 1 MiB reads: the client's
    floor."""
    t0 = time.perf_counter()
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as proc:
        while proc.stdout.read(_MIB):
            pass
    return time.perf_counter() - t0


def bench_files(workdir: Path, rounds: int, size_mib: int = FILE_BENCH_MIB) -> dict:
    """Write, read and upload ``size_mib`` MiB through the file routes vs cp/cat on the same
    disk."""
    panel = Child(["--serve-panel", "1"], workdir, "panel")
    uuid = panel.info["uuids"][0]
    daemon = Daemon(panel.port, workdir)
    size = size_mib * _MIB
    try:
        daemon.wait_booted()
        source = daemon.root / "source.bin"
        with open(source, "wb") as fh:
            block = os.urandom(_MIB)
            for _ in range(size_mib):
                fh.write(block)
        server_dir = daemon.root / "volumes" / uuid
        auth = {"Authorization": f"Bearer {TOKEN}"}
        write_path = f"/api/servers/{uuid}/files/write?file=/bench.bin"
        figures: dict[str, dict[str, list[float]]] = {
            k: {"wingslite": [], "baseline": []} for k in ("write", "read", "upload")
        }
        client_floor: list[float] = []
        for _ in range(rounds):  # alternate so that drift hits both alike
            elapsed = _send_body(
                daemon.port,
                "POST",
                write_path,
                _file_chunks(source),
                size,
                {**auth, "Content-Type": "application/json"},
            )
            figures["write"]["wingslite"].append(elapsed)
            figures["write"]["baseline"].append(
                _timed_cmd(["cp", str(source), str(daemon.root / "cp.bin")])
            )
            elapsed, got = _read_body(
                daemon.port, f"/api/servers/{uuid}/files/contents?file=/bench.bin", auth
            )
            assert got == size, got
            figures["read"]["wingslite"].append(elapsed)
            figures["read"]["baseline"].append(
                _timed_cmd(["cat", str(server_dir / "bench.bin")], stdout=subprocess.DEVNULL)
            )
            client_floor.append(_pipe_read_s(server_dir / "bench.bin"))
            token = w.encode_jwt(
                {
                    "exp": int(time.time()) + 600,
                    "iat": int(time.time()),
                    "server_uuid": uuid,
                    "user_uuid": BENCH_USER,
                    "unique_id": os.urandom(8).hex(),
                },
                TOKEN,
            )
            boundary = "wingsliteBench" + os.urandom(8).hex()
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                f'filename="upload.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            elapsed = _send_body(
                daemon.port,
                "POST",
                f"/upload/file?token={token}&directory=/",
                _file_chunks(source, head, tail),
                len(head) + size + len(tail),
                {"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            figures["upload"]["wingslite"].append(elapsed)
            figures["upload"]["baseline"].append(
                _timed_cmd(["cp", str(source), str(daemon.root / "cp.bin")])
            )
        result: dict = {
            "bytes": size,
            "rss_kb": daemon.memory_kb(),
            "client_pipe_read_mib_s": round(size / _MIB / statistics.median(client_floor), 1),
        }
        for kind, pair in figures.items():
            ours = size / _MIB / statistics.median(pair["wingslite"])
            theirs = size / _MIB / statistics.median(pair["baseline"])
            result[kind] = {
                "wingslite_mib_s": round(ours, 1),
                "baseline_mib_s": round(theirs, 1),
                "baseline": "cat" if kind == "read" else "cp",
                "ratio": round(ours / theirs, 3),
                "seconds": [round(x, 3) for x in pair["wingslite"]],
            }
        return result
    finally:
        daemon.stop()
        panel.stop()


def table(results: dict) -> str:
    rows = []

    def row(item, figure, value, target, met):
        status = (
            "" if met is None else met if isinstance(met, str) else ("met" if met else "MISSED")
        )
        rows.append((item, figure, value, target, status))

    results = {k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v)}
    s = results.get("sync")
    if s:
        u = s["unchanged"]
        row(
            "1 sync, no limit changed",
            "p50 / p99 vs Panel GET + bare HTTP",
            f"{u['ratio_p50']}x / {u['ratio_p99']}x ({u['sync_ms']['p50']} / {u['sync_ms']['p99']} "
            "ms)",
            "<= 1.20x p50",
            u["ratio_p50"] <= 1.20,
        )
        c = s.get("limit_changed")
        if c:
            row(
                "1 sync, limit changed",
                "p50 / p99 vs floor",
                f"{c['ratio_p50']}x / {c['ratio_p99']}x "
                f"({c['sync_ms']['p50']} / {c['sync_ms']['p99']} ms; floor {c['floor_ms']['p50']} "
                "ms)",
                "<= 1.10x p50",
                c["ratio_p50"] <= 1.10,
            )
    sc = results.get("scale")
    if sc:
        row(
            "2 boot, 1,000 servers",
            "API up (median)",
            f"{sc['api_up_s']['median']} s (boot done {sc['boot_done_s']['median']} s)",
            "< 3 s",
            sc["api_up_s"]["max"] < 3,
        )
        row(
            "2 boot, 1,000 servers",
            "peak RSS (median)",
            f"{sc['peak_rss_mb']['median']} MB (import floor {sc['import_floor_rss_mb']} MB)",
            "<= 60 MB",
            sc["peak_rss_mb"]["median"] <= 60,
        )
        cs = sc.get("concurrent_syncs")
        if cs:
            row(
                "2 200 concurrent syncs",
                "throughput / p99",
                f"{cs['throughput_per_s']['median']}/s / {cs['latency_ms']['p99']} ms",
                "-",
                cs["all_204"] and None,
            )
    su = results.get("suspend")
    if su and "answer_ms" in su:
        ok = (
            su["status"] == 204
            and su["last_websocket_close_ms"] <= su["answer_ms"]
            and su["answer_ms"] <= 250
        )
        row(
            "3 suspension",
            f"{su['websockets']} ws + {su['sftp_sessions']} SFTP",
            f"204 in {su['answer_ms']} ms, last ws close {su['last_websocket_close_ms']} ms",
            "closed before 204, 204 <= 250 ms",
            ok,
        )
    co = results.get("console")
    if co:
        engine = co["engine_lines_per_s"]
        for name, (_, lines, _) in FLOOD_CONFIGS.items():
            r = co[name]
            cap = r["configured_lines_per_s"]
            warned = max(r["warnings_per_socket"])
            row(
                f"4 console flood, {r['sockets']} socket(s)",
                name.replace("_", " "),
                f"{r['ratio_to_engine']}x ({r['per_socket_lines_per_s']} vs engine {engine} "
                "lines/s per socket), "
                f"{r['delivered_fraction'] * 100:.1f} % of {lines} delivered, {warned} throttle "
                "warnings",
                "-" if cap is None else f"<= {cap}/s, warned",
                None
                if cap is None
                # a throttle the daemon's read rate never reaches has nothing to cap
                else "not reached"
                if r["through_daemon_lines_per_s"] < cap and not warned
                else (r["per_socket_lines_per_s"] <= cap * 1.05 and warned > 0),
            )
    h = results.get("http")
    if h:
        for conns, v in h["connections"].items():
            row(
                "5 GET /api/servers/:server",
                f"{conns} conn. vs bare server",
                f"{v['ratio']}x ({v['wingslite_rps']['median']} vs "
                f"{v['bare_rps']['median']} req/s)",
                ">= 0.8x",
                v["ratio"] >= 0.8,
            )
    st = results.get("strangers")
    if st:
        for limit, v in st["file_limits"].items():
            row(
                f"7 GET /api/system, {st['strangers']:,} idle strangers",
                f"p50 / p99 vs none (file limit {limit})",
                f"{v['ratio_p50']}x / {v['ratio_p99']}x ({v['p50_ms']['with_strangers']} / "
                f"{v['p99_ms']['with_strangers']} ms vs {v['p50_ms']['none']} / "
                f"{v['p99_ms']['none']} ms), {v['failures']} failed",
                "every request answered",
                v["failures"] == 0,
            )
    b = results.get("backup")
    if b:
        mbs = b["mb_per_s"]
        row(
            f"7 backup, {b['directory_mib']} MiB",
            "speed vs tar czf / gzip -1",
            f"{b['backup_vs_tar_czf']}x / {b['backup_vs_tar_gzip1']}x ({mbs['backup']} vs "
            f"{mbs['tar_czf']} / {mbs['tar_gzip1']} MB/s), peak RSS {b['daemon_peak_rss_mb']} MB",
            "-",
            None,
        )
        row(
            f"7 restore, {b['directory_mib']} MiB",
            "speed vs tar xzf",
            f"{b['restore_vs_tar_xzf']}x ({mbs['restore']} vs {mbs['tar_xzf']} MB/s)",
            "-",
            None,
        )
    i = results.get("idle")
    if i:
        row(
            "6 idle, 100 servers",
            "RSS (median)",
            f"{i['rss_mb']['median']} MB (import floor {i['import_floor_rss_mb']} MB)",
            "<= 40 MB",
            i["rss_mb"]["median"] <= 40,
        )
        after = i.get("rss_after_first_sftp_login_mb")
        if after:
            row("6 idle, 100 servers", "RSS after 1st SFTP login", f"{after['median']} MB", "", "")
        layers = i.get("import_layers_rss_mb") or {}
        if layers:
            text = ", ".join(f"{k} {v}" for k, v in layers.items())
            row("6 import floors (MB)", "fresh process", text, "", "")
    f = results.get("files")
    if f:
        for kind in ("write", "read", "upload"):
            v = f[kind]
            row(
                f"8 files/{kind if kind != 'upload' else 'upload (multipart)'}",
                f"{f['bytes'] >> 20} MiB vs {v['baseline']} on the same disk",
                f"{v['ratio']}x ({v['wingslite_mib_s']} vs {v['baseline_mib_s']} MiB/s)"
                + (
                    f"; the client alone reads a pipe at {f['client_pipe_read_mib_s']} MiB/s"
                    if kind == "read"
                    else ""
                ),
                "-",
                None,
            )
    widths = [
        max(len(str(r[k])) for r in [("item", "figure", "value", "target", ""), *rows])
        for k in range(5)
    ]
    lines = [
        " | ".join(
            str(c).ljust(widths[k]) for k, c in enumerate(("item", "figure", "value", "target", ""))
        )
    ]
    lines.append("-+-".join("-" * x for x in widths))
    lines += [" | ".join(str(c).ljust(widths[k]) for k, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


ALL_ITEMS = (
    "sync",
    "scale",
    "suspend",
    "http",
    "idle",
    "console",
    "backup",
    "files",
    "strangers",
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default=",".join(ALL_ITEMS),
        help="comma-separated items",
    )
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument(
        "--daemon", help="the wingslite.py the daemon runs (default: this repository's)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions (a smoke run, not for quoting)"
    )
    parser.add_argument("--serve-panel", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_panel is not None:
        serve_panel(args.serve_panel, args.port_file)
        return 0
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.port_file)
        return 0
    only = set(args.only.split(","))
    if args.daemon:
        DAEMON_SCRIPT[0] = Path(args.daemon).resolve()
    q = args.quick
    workdir = Path(tempfile.mkdtemp(prefix="wingslite-bench-"))
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
        },
        "wingslite": w.VERSION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    started = time.monotonic()
    try:
        steps = [
            ("sync", lambda: bench_sync(workdir, 60 if q else 300)),
            ("scale", lambda: bench_scale(workdir, 1 if q else 3, 2 if q else 5)),
            ("suspend", lambda: bench_suspend(workdir, 100 if q else 1000, 20)),
            ("http", lambda: bench_http(workdir, 1 if q else 3, 1.0 if q else 3.0)),
            ("idle", lambda: bench_idle(workdir, 1 if q else 3)),
            ("strangers", lambda: bench_strangers(workdir, 1000, 50 if q else 300, 1 if q else 3)),
            ("console", lambda: bench_console(workdir, 1 if q else 3)),
            ("backup", lambda: bench_backup(workdir, 1 if q else 3)),
            ("files", lambda: bench_files(workdir, 1 if q else 7)),
        ]
        for name, fn in steps:
            if name not in only:
                continue
            print(f"[bench] {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                results[name] = fn()
            except Exception as exc:  # one item failing still leaves the others' figures
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[bench] {name} failed: {exc}", flush=True)
            print(f"[bench] {name} done in {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    if out.exists() and only != set(ALL_ITEMS):  # a partial run keeps the other items' figures
        with contextlib.suppress(ValueError):
            results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nfigures written to {args.out} ({results['duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
