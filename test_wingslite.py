"""Tests for wingslite, through its real interfaces: HTTP over loopback, a fake Panel that answers
as the Panel does (panel-contract.md), real websocket and SFTP clients, a real Docker engine.

Shared fixtures come first (fake Panel, daemon factory, HTTP helper); then one class per area in
the order of the sections of wingslite.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid as uuidlib
from pathlib import Path

import pytest
import yaml

import wingslite as w

HERE = Path(__file__).resolve().parent
TOKEN_ID = "Xq3LZ0a9bP2kR7tW"
TOKEN = "7hK2mQ9vX4cB8nZ1pL6sD3fG5jW0rT2yU8iO4eA1qS7dF9gH3jK6lZ2xC5vB8nM0"


##############################################################################
# shared fixtures: the fake Panel, the daemon, an HTTP client
##############################################################################


def panel_document(uuid: str | None = None, **settings_changes) -> dict:
    """A server document shaped exactly as the Panel sends it (panel-contract.md §1.4.4)."""
    uuid = uuid or str(uuidlib.uuid4())
    doc = {
        "settings": {
            "uuid": uuid,
            "meta": {"name": "Survival SMP", "description": ""},
            "suspended": False,
            "environment": {
                "MINECRAFT_VERSION": "latest",
                "SERVER_JARFILE": "server.jar",
                "DL_PATH": "",
                "STARTUP": "java -jar {{SERVER_JARFILE}}",
                "P_SERVER_LOCATION": "eu.fra",
                "P_SERVER_UUID": uuid,
                "P_SERVER_ALLOCATION_LIMIT": 0,
            },
            "invocation": "java -jar {{SERVER_JARFILE}}",
            "skip_egg_scripts": False,
            "build": {
                "memory_limit": 4096,
                "swap": 0,
                "io_weight": 500,
                "cpu_limit": 200,
                "threads": None,
                "disk_space": 20480,
                "oom_disabled": True,
            },
            "container": {"image": "ghcr.io/pterodactyl/yolks:java_21", "oom_disabled": True, "requires_rebuild": False},
            "allocations": {
                "force_outgoing_ip": False,
                "default": {"ip": "203.0.113.10", "port": 25565},
                "mappings": {"203.0.113.10": [25565, 25575]},
            },
            "mounts": [],
            "egg": {"id": "5a0f2c1e-7b3d-4c8e-9f60-2d1e3a4b5c6d", "file_denylist": []},
        },
        "process_configuration": {
            "startup": {"done": [")! For help, type "], "user_interaction": [], "strip_ansi": False},
            "stop": {"type": "command", "value": "stop"},
            "configs": [
                {
                    "parser": "properties",
                    "file": "server.properties",
                    "replace": [{"match": "server-port", "replace_with": "25565"}],
                }
            ],
        },
    }
    for dotted, value in settings_changes.items():
        node = doc["settings"]
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return doc


def panel_error(status: int, code: str, detail: str) -> dict:
    return {"errors": [{"code": code, "status": str(status), "detail": detail}]}


class FakePanel:
    """The Panel's remote API on loopback, answering as panel-contract.md says.

    ``servers`` maps uuid -> document. ``calls`` counts requests per path. Failure switches:
    ``fail[path_prefix] = [status, ...]`` answers those statuses first (then normally);
    ``garbage`` (paths answered 200 with a body that is not JSON); ``hang_s`` (paths that sleep);
    ``down`` (every request 500).
    """

    def __init__(self, token_id: str = TOKEN_ID, token: str = TOKEN):
        self.token_id, self.token = token_id, token
        self.servers: dict[str, dict] = {}
        self.sftp_users: dict[tuple[str, str], list[str]] = {}  # (username, password) -> permissions
        self.user_uuid = "c0ffee00-1111-4222-8333-444455556666"
        self.calls: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.fail: dict[str, list[int]] = {}
        self.garbage: set[str] = set()
        self.hang_s: dict[str, float] = {}
        self.down = False
        self.lock = threading.Lock()
        panel = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send_json(self, status, body=None, headers=None):
                data = b"" if body is None else json.dumps(body, indent=4).replace("/", "\\/").encode()
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method):
                path = urllib.parse.urlsplit(self.path).path
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with panel.lock:
                    panel.calls[path] = panel.calls.get(path, 0) + 1
                    panel.requests.append((method, path, dict(self.headers)))
                    failures = next((v for k, v in panel.fail.items() if path.startswith(k) and v), None)
                    status = failures.pop(0) if failures else None
                for prefix, seconds in panel.hang_s.items():
                    if path.startswith(prefix):
                        time.sleep(seconds)
                # DaemonAuthenticate (panel-contract.md §1.1)
                auth = self.headers.get("Authorization")
                if not auth or not auth.lower().startswith("bearer "):
                    return self.send_json(
                        401,
                        panel_error(401, "HttpException", "Access to this endpoint must include an Authorization header."),
                        {"WWW-Authenticate": "Bearer"},
                    )
                parts = auth[7:].split(".")
                if len(parts) != 2 or not all(parts):
                    return self.send_json(
                        400, panel_error(400, "BadRequestHttpException", "The Authorization header provided was not in a valid format.")
                    )
                if parts != [panel.token_id, panel.token]:
                    return self.send_json(
                        403, panel_error(403, "AccessDeniedHttpException", "You are not authorized to access this resource.")
                    )
                if panel.down or status:
                    status = status or 500
                    return self.send_json(
                        status,
                        panel_error(
                            status, "HttpException", "An unexpected error was encountered while processing this request, please try again."
                        ),
                    )
                if any(path.startswith(g) for g in panel.garbage):
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                return panel.route(self, method, path, query, body)

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, doc: dict) -> str:
        uuid = doc["settings"]["uuid"]
        self.servers[uuid] = doc
        return uuid

    def route(self, h, method, path, query, body):
        if method == "GET" and path == "/api/remote/servers":
            return h.send_json(200, self.page(query))
        if method == "POST" and path == "/api/remote/servers/reset":
            return h.send_json(204)
        if method == "POST" and path == "/api/remote/sftp/auth":
            return self.sftp_auth(h, json.loads(body or b"null"))
        if method == "GET" and path.startswith("/api/remote/servers/"):
            ident = path.rsplit("/", 1)[-1]
            with self.lock:
                doc = self.servers.get(ident) or next((d for u, d in self.servers.items() if u[:8] == ident), None)
                doc = copy.deepcopy(doc)
            if doc is None:
                return h.send_json(404, panel_error(404, "RecordNotFoundException", ""))
            return h.send_json(200, doc)
        return h.send_json(404, panel_error(404, "NotFoundHttpException", f"The route {path.lstrip('/')} could not be found."))

    def page(self, query) -> dict:
        """Laravel's paginated resource (panel-contract.md §1.3): page 0 means page 1."""
        try:
            page = max(1, int(query.get("page", ["1"])[0]))
        except ValueError:
            page = 1
        per_page = int(query.get("per_page", ["50"])[0]) or 15
        with self.lock:
            items = list(self.servers.items())
        total = len(items)
        last = max(1, -(-total // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        data = [{"uuid": u, "settings": d["settings"], "process_configuration": d["process_configuration"]} for u, d in chunk]
        base = f"{self.url}/api/remote/servers"
        return {
            "data": data,
            "links": {"first": f"{base}?page=1", "last": f"{base}?page={last}", "prev": None, "next": None},
            "meta": {
                "current_page": page,
                "from": (page - 1) * per_page + 1 if chunk else None,
                "last_page": last,
                "links": [],
                "path": base,
                "per_page": per_page,
                "to": (page - 1) * per_page + len(chunk) if chunk else None,
                "total": total,
            },
        }

    def sftp_auth(self, h, body):
        username = str(body.get("username", ""))
        user, _, ident = username.rpartition(".")
        if not ident:
            return h.send_json(400, panel_error(400, "BadRequestHttpException", "No valid server identifier was included in the request."))
        server = next((u for u in self.servers if u == ident or u[:8] == ident), None)
        perms = self.sftp_users.get((user, body.get("password")))
        if server is None or perms is None:
            return h.send_json(
                403, panel_error(403, "HttpForbiddenException", "Authorization credentials were not correct, please try again.")
            )
        if self.servers[server]["settings"]["suspended"]:
            return h.send_json(
                409,
                panel_error(
                    409,
                    "ServerStateConflictException",
                    "This server is currently suspended and the functionality requested is unavailable.",
                ),
            )
        return h.send_json(200, {"server": server, "user": self.user_uuid, "permissions": perms})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def panel():
    p = FakePanel()
    yield p
    p.close()


def node_config(tmp_path: Path, panel_url: str, **overrides) -> dict:
    """A node config.yml as the Panel generates it, pointed at tmp_path, plus overrides (a__b=c)."""
    raw = {
        "debug": False,
        "uuid": "5c5bd1c2-6a3e-4a4f-9d0e-1f0f6e2d8b47",
        "token_id": TOKEN_ID,
        "token": TOKEN,
        "api": {"host": "127.0.0.1", "port": 8080, "ssl": {"enabled": False, "cert": "", "key": ""}, "upload_limit": 100},
        "system": {"root_directory": str(tmp_path / "root"), "data": str(tmp_path / "volumes"), "sftp": {"bind_port": 2022}},
        "allowed_mounts": [],
        "remote": panel_url,
        "remote_query": {"timeout": 3},
        "wingslite": {"panel_retry_initial_ms": 20, "sftp_enabled": False, "disk_quota": "soft"},
    }
    raw["api"]["port"] = 0
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


class DaemonFactory:
    """Start daemons on port 0 against a panel; every one is stopped at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.daemons: list[w.Daemon] = []

    def __call__(self, panel: FakePanel, *, boot: bool = True, **overrides) -> w.Daemon:
        daemon = w.Daemon(w.Config(node_config(self.tmp_path, panel.url, **overrides), "test"))
        daemon.start()
        self.daemons.append(daemon)
        if boot:
            assert daemon.wait_booted(10), "the daemon did not finish loading servers from the Panel"
        return daemon

    def stop_all(self):
        for daemon in self.daemons:
            daemon.stop()


@pytest.fixture
def make_daemon(tmp_path):
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()


def api(daemon_or_port, method: str, path: str, body=None, token: str | None = TOKEN, headers=None, raw: bytes | None = None):
    """One HTTP request over loopback: (status, headers, decoded JSON body or None)."""
    port = daemon_or_port if isinstance(daemon_or_port, int) else daemon_or_port.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    all_headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=all_headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    parsed = json.loads(payload) if payload else None
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed


def wait_for(predicate, timeout_s: float = 10, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def saved_document(daemon: w.Daemon, uuid: str) -> dict:
    return json.loads((daemon.config.root_dir / "wingslite" / "servers" / f"{uuid}.json").read_text())


##############################################################################
# config
##############################################################################


PANEL_GENERATED_YAML = """\
debug: false
uuid: 5c5bd1c2-6a3e-4a4f-9d0e-1f0f6e2d8b47
token_id: Xq3LZ0a9bP2kR7tW
token: 7hK2mQ9vX4cB8nZ1pL6sD3fG5jW0rT2yU8iO4eA1qS7dF9gH3jK6lZ2xC5vB8nM0
api:
  host: 0.0.0.0
  port: 8080
  ssl:
    enabled: true
    cert: /etc/letsencrypt/live/node1.example.com/fullchain.pem
    key: /etc/letsencrypt/live/node1.example.com/privkey.pem
  upload_limit: 100
system:
  data: /var/lib/pterodactyl/volumes
  sftp:
    bind_port: 2022
allowed_mounts: []
remote: 'https://panel.example.com'
"""


class TestConfig:
    def test_panel_generated_config_loads_with_wings_defaults(self, tmp_path):
        path = tmp_path / "config.yml"
        path.write_text(PANEL_GENERATED_YAML + "some_future_key: {nested: 1}\n")
        config = w.load_config(path)
        assert config.token_id == "Xq3LZ0a9bP2kR7tW"
        assert config.remote == "https://panel.example.com"
        assert config.get("system.root_directory") == "/var/lib/pterodactyl"
        assert config.get("remote_query.timeout") == 30
        assert config.get("docker.container_pid_limit") == 512
        assert config.get("wingslite.disk_quota") == "auto"
        assert config.raw["some_future_key"] == {"nested": 1}  # unknown keys are kept

    def test_shipped_example_config_is_valid_and_documents_every_wingslite_key(self):
        config = w.load_config(HERE / "wingslite.yml")
        text = (HERE / "wingslite.yml").read_text()
        for key, _, default in w._CONFIG_SCHEMA:
            if key.startswith("wingslite."):
                leaf = key.split(".", 1)[1]
                assert f"  {leaf}:" in text, f"{key} is not documented in wingslite.yml"
                assert config.get(key) == default, f"wingslite.yml shows {key} with a value other than its default"

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("token: [1, 2]\n", "token: expected str"),
            ("api: {port: eighty}\n", "api.port: expected int"),
            ("system: {disk_check_interval: -5}\n", "system.disk_check_interval: must not be negative"),
            ("remote_query: 7\n", "remote_query.timeout"),
            ("remote: 'ftp://panel'\n", "remote: expected the Panel's http(s) URL"),
        ],
    )
    def test_wrong_values_name_the_file_and_the_key(self, tmp_path, text, expected):
        base = yaml.safe_load(PANEL_GENERATED_YAML)
        base.update(yaml.safe_load(text))
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(base))
        with pytest.raises(w.ConfigError) as info:
            w.load_config(path)
        assert str(path) in info.value.message and expected in info.value.message

    def test_missing_required_key_is_named(self, tmp_path):
        path = tmp_path / "config.yml"
        path.write_text(PANEL_GENERATED_YAML.replace("token_id: Xq3LZ0a9bP2kR7tW\n", ""))
        with pytest.raises(w.ConfigError, match="token_id: required key is missing"):
            w.load_config(path)

    @pytest.mark.parametrize(
        "content, expected",
        [(None, "no such file"), ("api: [unclosed\n", "not valid YAML at line"), ("api:\n  port: 8080\n", "token_id: required")],
    )
    def test_cli_exits_2_with_one_line_naming_the_file(self, tmp_path, content, expected):
        path = tmp_path / "config.yml"
        if content is not None:
            path.write_text(content)
        proc = subprocess.run(
            [sys.executable, str(HERE / "wingslite.py"), "--config", str(path)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], proc.stderr

    def test_cli_version_and_help(self):
        out = subprocess.run([sys.executable, str(HERE / "wingslite.py"), "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == f"wingslite {w.VERSION}"
        out = subprocess.run([sys.executable, str(HERE / "wingslite.py"), "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "--config" in out.stdout and "--demo" in out.stdout

    def test_cli_runs_and_stops_cleanly_on_sigterm(self, tmp_path, panel):
        panel.add(panel_document())
        raw = node_config(tmp_path, panel.url)
        port = _free_port()
        raw["api"]["port"] = port
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(raw))
        proc = subprocess.Popen([sys.executable, str(HERE / "wingslite.py"), "--config", str(path)], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: _answers(port), what="the CLI daemon to answer")
            wait_for(lambda: len(api(port, "GET", "/api/servers")[2]) == 1, what="the server to be loaded from the Panel")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        return api(port, "GET", "/api/system")[0] == 200
    except OSError:
        return False


##############################################################################
# Panel client
##############################################################################


class TestPanelClient:
    def client(self, panel, budget_s=2.0):
        return w.PanelClient(panel.url, TOKEN_ID, TOKEN, budget_s=budget_s, retry_initial_s=0.01)

    def test_sends_wings_headers(self, panel):
        uuid = panel.add(panel_document())
        self.client(panel).get_server(uuid)
        _, _, headers = panel.requests[-1]
        assert headers["Authorization"] == f"Bearer {TOKEN_ID}.{TOKEN}"
        assert headers["Accept"] == "application/vnd.pterodactyl.v1+json"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == f"Pterodactyl Wings/v{w.VERSION} (id:{TOKEN_ID})"

    def test_pagination_reads_every_page(self, panel):
        uuids = {panel.add(panel_document()) for _ in range(7)}
        items = self.client(panel).list_servers(per_page=3, concurrency=2)
        assert {i["settings"]["uuid"] for i in items} == uuids
        assert panel.calls["/api/remote/servers"] == 3

    def test_4xx_is_final_and_parsed(self, panel):
        with pytest.raises(w.PanelError) as info:
            self.client(panel).get_server("nope")
        assert info.value.http_status == 404 and info.value.code == "RecordNotFoundException"
        assert panel.calls["/api/remote/servers/nope"] == 1

    def test_wrong_credentials_are_a_403_with_the_panels_detail(self, panel):
        client = w.PanelClient(panel.url, TOKEN_ID, "wrong", budget_s=1)
        with pytest.raises(w.PanelError) as info:
            client.get_server("x")
        assert info.value.http_status == 403 and "You are not authorized" in info.value.detail

    def test_5xx_is_retried_then_succeeds(self, panel):
        uuid = panel.add(panel_document())
        panel.fail["/api/remote/servers/"] = [500, 502, 503]
        assert self.client(panel).get_server(uuid)["settings"]["uuid"] == uuid
        assert panel.calls[f"/api/remote/servers/{uuid}"] == 4

    def test_5xx_forever_gives_up_inside_the_budget(self, panel):
        panel.down = True
        started = time.monotonic()
        with pytest.raises(w.PanelError) as info:
            self.client(panel, budget_s=0.6).get_server("x")
        elapsed = time.monotonic() - started
        assert info.value.http_status == 500 and elapsed < 1.5
        assert panel.calls["/api/remote/servers/x"] > 2

    def test_connection_refused_is_retried_then_named(self):
        port = _free_port()
        client = w.PanelClient(f"http://127.0.0.1:{port}", TOKEN_ID, TOKEN, budget_s=0.3, retry_initial_s=0.01)
        with pytest.raises(w.PanelError, match="could not reach the Panel"):
            client.get_server("x")

    def test_a_hanging_panel_is_cut_off_by_the_budget(self, panel):
        uuid = panel.add(panel_document())
        panel.hang_s["/api/remote/servers/"] = 3
        started = time.monotonic()
        with pytest.raises(w.PanelError, match="did not answer"):
            self.client(panel, budget_s=0.5).get_server(uuid)
        assert time.monotonic() - started < 2

    def test_garbage_body_is_an_error_naming_json(self, panel):
        panel.garbage.add("/api/remote/servers/")
        with pytest.raises(w.PanelError, match="not valid JSON"):
            self.client(panel).get_server("x")

    def test_oversized_document_is_refused(self, panel):
        uuid = panel.add(panel_document(environment={f"K{i}": "x" * 1000 for i in range(200)}))
        client = w.PanelClient(panel.url, TOKEN_ID, TOKEN, budget_s=1, max_document_bytes=100_000)
        with pytest.raises(w.PanelError, match="larger than 100000 bytes"):
            client.get_server(uuid)


##############################################################################
# server model
##############################################################################


class TestServerModel:
    def test_panel_example_parses(self):
        doc = panel_document()
        cfg = w.parse_server_document(doc)
        assert cfg.build == w.Build(4096, 0, 500, 200, "", 20480, True)
        assert cfg.allocations.mappings == (("203.0.113.10", (25565, 25575)),)
        assert cfg.process.stop_type == "command" and cfg.process.stop_value == "stop"
        assert cfg.process.configs[0].replace[0] == w.Replacement("server-port", "25565")

    @pytest.mark.parametrize(
        "mb, expected",
        [(1024, 1_177_600_000), (2048, 2_355_200_000), (2049, 2_253_900_000), (4096, 4_505_600_000), (4097, 4_301_850_000), (0, 0)],
    )
    def test_memory_bytes_follow_wings_overhead_thresholds(self, mb, expected):
        assert w.memory_limit_bytes(mb) == expected

    def test_rounding_is_half_away_from_zero(self):
        assert w.round_half_away(2.5) == 3 and w.round_half_away(3.5) == 4 and w.round_half_away(-2.5) == -3
        # 1 MB x 1.15 x 1e6 = 1150000.0000000002 in floats; stays an exact integer
        assert w.memory_limit_bytes(1) == 1_150_000

    def test_container_resources_as_wings(self):
        cfg = w.parse_server_document(panel_document(build__memory_limit=1024, build__swap=512, build__threads="0-1,3"))
        res = w.container_resources(cfg.build)
        assert res["Memory"] == 1_177_600_000 and res["MemoryReservation"] == 1_024_000_000
        assert res["MemorySwap"] == 512_000_000 + 1_177_600_000
        assert res["CpuQuota"] == 200_000 and res["CpuPeriod"] == 100_000 and res["CpusetCpus"] == "0-1,3"
        assert res["PidsLimit"] == 512 and res["BlkioWeight"] == 500
        unlimited = w.container_resources(w.Build(memory_mb=0, swap_mb=-1, cpu_percent=0))
        assert "CpuQuota" not in unlimited and "CpusetCpus" not in unlimited and unlimited["MemorySwap"] == -1

    def test_disk_is_mebibytes(self):
        assert w.disk_limit_bytes(1024) == 1_073_741_824

    def test_environment_as_wings_builds_it_with_plain_numbers(self):
        doc = panel_document(environment={"SERVER_PORT": "1", "P_SERVER_ALLOCATION_LIMIT": 0, "RATE": 1.5, "flag": True, "EMPTY": None})
        env = w.container_environment(w.parse_server_document(doc), "Europe/Berlin")
        assert env[:5] == [
            "TZ=Europe/Berlin",
            "STARTUP=java -jar {{SERVER_JARFILE}}",
            "SERVER_MEMORY=4096",
            "SERVER_IP=203.0.113.10",
            "SERVER_PORT=25565",
        ]
        assert "P_SERVER_ALLOCATION_LIMIT=0" in env and "RATE=1.5" in env and "FLAG=true" in env and "EMPTY=" in env
        assert sum(line.startswith("SERVER_PORT=") for line in env) == 1  # the Panel's clash is skipped

    def test_panel_quirks_are_accepted(self):
        doc = panel_document()
        s = doc["settings"]
        s["build"].update(memory_limit=1024.0, disk_space=10240.0, threads=None)
        s["allocations"]["mappings"] = []  # PHP's empty array for a server with no allocations
        s["environment"]["NULLED"] = None
        s["egg"]["file_denylist"] = None
        s["unknown_future_key"] = {"x": 1}
        del s["skip_egg_scripts"], s["meta"]
        doc["process_configuration"]["startup"]["done"] = "single string"
        cfg = w.parse_server_document(doc)
        assert cfg.build.memory_mb == 1024 and cfg.allocations.mappings == () and cfg.file_denylist == ()
        assert cfg.process.done == ("single string",)

    def test_signal_stop_and_regex_done(self):
        doc = panel_document()
        doc["process_configuration"]["stop"] = {"type": "signal", "value": "SIGTERM"}
        doc["process_configuration"]["startup"]["done"] = ["regex:^Done \\(\\d+s\\)", "plain"]
        cfg = w.parse_server_document(doc)
        a, b = cfg.process.done_matchers()
        assert a("Done (12s)!") and not a("xDone (1s)") and b("a plain line") and not b("nothing")

    @pytest.mark.parametrize(
        "change, field",
        [
            ({"build__memory_limit": -1}, "settings.build.memory_limit: must be >= 0"),
            ({"build__cpu_limit": -50}, "settings.build.cpu_limit"),
            ({"build__disk_space": -1}, "settings.build.disk_space"),
            ({"build__io_weight": 5}, "settings.build.io_weight: must be 10..1000"),
            ({"build__io_weight": 1001}, "settings.build.io_weight"),
            ({"build__swap": -2}, "settings.build.swap"),
            ({"build__threads": "0-a"}, "settings.build.threads"),
            ({"build__threads": "3-1"}, "runs backwards"),
            ({"build__memory_limit": "1024"}, "expected a number, got a string"),
            ({"allocations__default": {"ip": "1.2.3.4", "port": 70000}}, "settings.allocations.default.port"),
            ({"allocations__mappings": {"1.2.3.4": [0]}}, "settings.allocations.mappings.1.2.3.4[0]"),
            ({"suspended": "yes"}, "settings.suspended: expected true or false"),
            ({"environment": {"BAD KEY": "x"}}, "not a valid environment variable name"),
            ({"environment": {"K": {"nested": 1}}}, "settings.environment.K"),
            ({"mounts": [{"source": "/x"}]}, "settings.mounts[0].target"),
        ],
    )
    def test_impossible_values_are_refused_naming_the_field(self, change, field):
        with pytest.raises(w.DocumentError) as info:
            w.parse_server_document(panel_document(**change))
        assert field in info.value.message

    def test_document_for_another_server_is_refused(self):
        with pytest.raises(w.DocumentError, match=r"settings\.uuid"):
            w.parse_server_document(panel_document(), expect_uuid=str(uuidlib.uuid4()))

    @pytest.mark.parametrize("doc", [None, [], "text", {"settings": None}, {"settings": {"uuid": "x"}}])
    def test_documents_of_the_wrong_shape_are_refused(self, doc):
        with pytest.raises(w.DocumentError):
            w.parse_server_document(doc)


##############################################################################
# filesystem and disk
##############################################################################


class TestFilesystem:
    def test_atomic_write_interrupted_before_rename_leaves_the_old_file(self, tmp_path, monkeypatch):
        target = tmp_path / "server.json"
        w.atomic_write(target, b'{"old": true}')

        def crash(*args, **kwargs):
            raise OSError("power cut")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            w.atomic_write(target, b'{"new": true}' * 1000)
        assert target.read_bytes() == b'{"old": true}'
        assert [p.name for p in tmp_path.iterdir()] == ["server.json"]  # no temp file left behind

    def test_usage_counts_regular_files_only(self, tmp_path):
        root = tmp_path / "srv"
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "b" / "f").write_bytes(b"x" * 1000)
        (root / "g").write_bytes(b"x" * 24)
        (root / "link").symlink_to("/etc/passwd")
        fs = w.Filesystem(root, 1024, check_interval_s=60)
        assert fs.recalculate() == 1024
        assert fs.has_space(0) and not fs.has_space(1)

    def test_reserve_books_bytes_and_refuses_past_the_limit(self, tmp_path):
        fs = w.Filesystem(tmp_path, 100, check_interval_s=60)
        fs.recalculate()
        assert fs.reserve(60) and fs.reserve(40) and not fs.reserve(1)
        fs.add_usage(-50)
        assert fs.reserve(50) and not fs.reserve(1)
        fs.set_limit(0)
        assert fs.reserve(10**12)

    def test_lowering_the_limit_below_usage_is_reported(self, tmp_path):
        (tmp_path / "f").write_bytes(b"x" * 5000)
        fs = w.Filesystem(tmp_path, 0, check_interval_s=60)
        fs.recalculate()
        notes = fs.set_limit(1000)
        assert any("over the new limit" in n for n in notes) and not fs.has_space()

    def test_denylist_matches_like_gitignore(self, tmp_path):
        fs = w.Filesystem(tmp_path)
        fs.set_denylist(["*.jar", "/config/secret.yml", "logs/"])
        assert fs.is_denied("server.jar") and fs.is_denied("plugins/x.jar")
        assert fs.is_denied("config/secret.yml") and not fs.is_denied("other/config/secret.yml")
        assert fs.is_denied("logs/latest.log") and not fs.is_denied("mylogs/x")


##############################################################################
# session table
##############################################################################


class TestSessionTable:
    def test_close_server_closes_exactly_that_servers_sessions(self):
        table = w.SessionTable()
        closed = []
        for server, user, kind in [("s1", "u1", "websocket"), ("s1", "u2", "sftp"), ("s2", "u1", "websocket")]:
            table.register(server, user, kind, lambda code, reason, t=(server, user, kind): closed.append((t, code)))
        assert table.close_server("s1", 4409, "suspended") == 2
        assert sorted(closed) == [(("s1", "u1", "websocket"), 4409), (("s1", "u2", "sftp"), 4409)]
        assert table.count() == 1 and table.count("s2") == 1

    def test_close_user_by_servers_and_everywhere(self):
        table = w.SessionTable()
        for server in ("s1", "s2", "s3"):
            table.register(server, "u1", "websocket", lambda c, r: None)
        table.register("s1", "u2", "sftp", lambda c, r: None)
        assert table.close_user("u1", ["s1", "s2"]) == 2
        assert table.close_user("u1") == 1
        assert table.count() == 1

    def test_a_failing_closer_does_not_stop_the_others(self):
        table = w.SessionTable()
        closed = []

        def broken(code, reason):
            raise RuntimeError("socket already gone")

        table.register("s", "u", "websocket", broken)
        table.register("s", "u", "sftp", lambda c, r: closed.append(c))
        assert table.close_server("s", 4409, "x") == 2 and closed == [4409] and table.count() == 0

    def test_revocations_refuse_older_tokens_only(self):
        rev = w.Revocations()
        now = int(time.time()) + 1
        assert rev.check("j", "u", "s", now) is None
        assert rev.check("j", "u", "s", rev.boot_time - 10) == "jwt: created too far in past (denylist)"
        rev.deny_jtis(["j"])
        assert rev.check("j", "u", "s", int(time.time())) is not None
        assert rev.check("other", "u", "s", int(time.time())) is None
        rev.revoke_user("u", ["s"])
        assert rev.check("x", "u", "s", int(time.time())) is not None
        assert rev.check("x", "u", "s2", int(time.time())) is None
        assert rev.check("x", "u", "s", int(time.time()) + 2) is None


##############################################################################
# HTTP API
##############################################################################


class TestHttpApi:
    def test_missing_or_malformed_auth_is_401_with_www_authenticate(self, panel, make_daemon):
        daemon = make_daemon(panel)
        for token_header in (None, "Basic abc", f"bearer {TOKEN}", "Bearer", f"Bearer {TOKEN} extra"):
            headers = {"Authorization": token_header} if token_header else {}
            status, hdrs, body = api(daemon, "GET", "/api/servers", token=None, headers=headers)
            assert status == 401 and hdrs["www-authenticate"] == "Bearer", token_header
            assert body["error"] == "The required authorization heads were not present in the request."
            assert body["request_id"] == hdrs["x-request-id"]

    def test_wrong_token_is_403(self, panel, make_daemon):
        status, _, body = api(make_daemon(panel), "GET", "/api/system", token="nope")
        assert status == 403 and body["error"] == "You are not authorized to access this endpoint."

    def test_options_is_204_with_cors_and_no_auth(self, panel, make_daemon):
        daemon = make_daemon(panel, allowed_origins=["https://other.example"])
        status, hdrs, body = api(daemon, "OPTIONS", "/api/servers/x/sync", token=None, headers={"Origin": "https://other.example"})
        assert status == 204 and body is None
        assert hdrs["access-control-allow-origin"] == "https://other.example"
        assert "POST" in hdrs["access-control-allow-methods"] and hdrs["access-control-max-age"] == "7200"
        status, hdrs, _ = api(daemon, "GET", "/api/system", headers={"Origin": "https://evil.example"})
        assert hdrs["access-control-allow-origin"] == panel.url

    def test_system_info(self, panel, make_daemon):
        status, _, body = api(make_daemon(panel), "GET", "/api/system")
        assert status == 200 and body["os"] == "linux" and body["version"] == w.VERSION and body["cpu_count"] >= 1
        assert body["wingslite"]["disk_quota"]["backend"]

    def test_unknown_route_and_wrong_method_are_json_errors(self, panel, make_daemon):
        daemon = make_daemon(panel)
        status, _, body = api(daemon, "GET", "/api/nothing/here")
        assert status == 404 and "no route" in body["error"] and body["request_id"]
        status, _, _ = api(daemon, "GET", "/api/nothing/here", token=None)
        assert status == 401  # strangers learn nothing about routes
        status, hdrs, body = api(daemon, "PUT", "/api/servers")
        assert status == 405 and "GET" in hdrs["allow"] and "not allowed" in body["error"]

    def test_oversized_and_unparsable_bodies(self, panel, make_daemon):
        daemon = make_daemon(panel, wingslite__max_request_bytes=1000)
        status, _, body = api(daemon, "POST", "/api/servers", raw=b"{" + b" " * 2000 + b"}")
        assert status == 413 and "limit is 1000" in body["error"]
        status, _, body = api(daemon, "POST", "/api/servers", raw=b"{not json")
        assert status == 400 and "parsable" in body["error"]
        status, _, body = api(daemon, "POST", "/api/servers", body={"uuid": "not-a-uuid"})
        assert status == 422

    def test_keep_alive_connection_serves_many_requests(self, panel, make_daemon):
        daemon = make_daemon(panel)
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        for _ in range(20):
            conn.request("GET", "/api/system", headers={"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["os"] == "linux"
        conn.close()

    def test_malformed_request_line_gets_json_not_html(self, panel, make_daemon):
        daemon = make_daemon(panel)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 400") and b'"error"' in data and b"<html" not in data.lower()

    def test_server_routes_404_for_unknown_servers(self, panel, make_daemon):
        daemon = make_daemon(panel)
        for method, path in [("GET", "/api/servers/x"), ("POST", "/api/servers/x/sync"), ("DELETE", "/api/servers/x")]:
            status, _, body = api(daemon, method, path)
            assert status == 404 and body["error"] == "The requested resource does not exist on this instance."

    def test_create_get_list_and_delete_a_server(self, panel, make_daemon):
        daemon = make_daemon(panel)
        uuid = panel.add(panel_document())
        status, _, _ = api(daemon, "POST", "/api/servers", body={"uuid": uuid, "start_on_completion": False})
        assert status == 202
        assert (daemon.config.data_dir / uuid).is_dir()
        status, _, body = api(daemon, "GET", f"/api/servers/{uuid}")
        assert status == 200 and body["state"] == "offline" and body["configuration"]["uuid"] == uuid
        assert body["utilization"]["network"] == {"rx_bytes": 0, "tx_bytes": 0}
        status, _, body = api(daemon, "POST", "/api/servers", body={"uuid": uuid})
        assert status == 409
        assert [s["configuration"]["uuid"] for s in api(daemon, "GET", "/api/servers")[2]] == [uuid]
        status, _, _ = api(daemon, "DELETE", f"/api/servers/{uuid}")
        assert status == 204 and uuid not in daemon.servers
        wait_for(lambda: not (daemon.config.data_dir / uuid).exists(), what="the data directory to be removed")
        assert not (daemon.config.root_dir / "wingslite" / "servers" / f"{uuid}.json").exists()

    def test_create_of_a_server_the_panel_does_not_know_is_404(self, panel, make_daemon):
        status, _, body = api(make_daemon(panel), "POST", "/api/servers", body={"uuid": str(uuidlib.uuid4())})
        assert status == 404 and "does not know" in body["error"]


##############################################################################
# daemon: the sync
##############################################################################


class TestSync:
    def booted(self, panel, make_daemon, **changes):
        uuid = panel.add(panel_document(**changes))
        daemon = make_daemon(panel)
        assert uuid in daemon.servers
        return daemon, uuid

    def snapshot(self, daemon, uuid):
        server = daemon.servers[uuid]
        return (server.config.document, server.fs.limit_bytes, saved_document(daemon, uuid), server.last_sync)

    def test_sync_applies_the_panels_configuration_and_answers_204(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        panel.servers[uuid]["settings"]["build"].update(memory_limit=8192, disk_space=100)
        panel.servers[uuid]["settings"]["environment"]["NEW_VAR"] = "hello"
        status, hdrs, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 204 and body is None and hdrs["x-request-id"]
        server = daemon.servers[uuid]
        assert server.config.build.memory_mb == 8192 and server.config.environment["NEW_VAR"] == "hello"
        assert server.fs.limit_bytes == 100 * 1_048_576
        assert saved_document(daemon, uuid)["settings"]["build"]["memory_limit"] == 8192
        _, _, view = api(daemon, "GET", f"/api/servers/{uuid}")
        record = view["wingslite"]["last_sync"]
        assert record["result"] == "ok" and any("disk limit 104857600" in a for a in record["applied"])
        assert any("resource limits" in p for p in record["pending"])  # no container on this node
        assert any("environment variables (next start)" in p for p in record["pending"])
        assert view["configuration"]["build"]["memory_limit"] == 8192

    def test_sync_of_a_server_unknown_here_is_404(self, panel, make_daemon):
        daemon, _ = self.booted(panel, make_daemon)
        assert api(daemon, "POST", f"/api/servers/{uuidlib.uuid4()}/sync")[0] == 404

    @pytest.mark.parametrize("token, expected", [(None, 401), ("wrong", 403)])
    def test_sync_needs_the_node_token(self, panel, make_daemon, token, expected):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 1
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync", token=token)[0] == expected
        assert self.snapshot(daemon, uuid) == before

    def test_server_gone_from_the_panel_is_404_and_changes_nothing(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        del panel.servers[uuid]
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 404 and "no longer knows" in body["error"] and body["request_id"]
        assert self.snapshot(daemon, uuid) == before and uuid in daemon.servers

    def test_panel_5xx_is_retried_then_500_and_changes_nothing(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 1
        calls_before = panel.calls.get(f"/api/remote/servers/{uuid}", 0)
        panel.down = True
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        panel.down = False
        retries = panel.calls[f"/api/remote/servers/{uuid}"] - calls_before
        assert status == 500 and "HTTP 500" in body["error"] and "nothing on this node was changed" in body["error"]
        assert retries >= 3, f"the Panel was asked only {retries} times"
        assert self.snapshot(daemon, uuid) == before

    def test_panel_5xx_then_recovery_within_the_budget_is_204(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 1234
        panel.fail[f"/api/remote/servers/{uuid}"] = [500, 503]
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert daemon.servers[uuid].config.build.memory_mb == 1234

    def test_body_that_is_not_json_is_500_and_changes_nothing(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        panel.garbage.add(f"/api/remote/servers/{uuid}")
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and "not valid JSON" in body["error"]
        assert self.snapshot(daemon, uuid) == before

    @pytest.mark.parametrize(
        "mutate, field",
        [
            (lambda s: s["build"].update(memory_limit=-512), "settings.build.memory_limit"),
            (lambda s: s["build"].update(io_weight=5000), "settings.build.io_weight"),
            (lambda s: s["allocations"]["default"].update(port=99999), "settings.allocations.default.port"),
            (lambda s: s.update(uuid=str(uuidlib.uuid4())), "settings.uuid"),
        ],
    )
    def test_invalid_document_is_500_naming_the_field_and_changes_nothing(self, panel, make_daemon, mutate, field):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        panel.servers[uuid]["settings"]["build"]["disk_space"] = 1  # would change the disk limit if applied
        mutate(panel.servers[uuid]["settings"])
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and field in body["error"], body
        assert self.snapshot(daemon, uuid) == before

    def test_50_concurrent_syncs_on_one_server_end_in_the_panels_final_state(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        counter = iter(range(1, 10_000))
        lock = threading.Lock()

        def bump_then_sync(_):
            with lock:  # the Panel changes while syncs are in flight
                panel.servers[uuid]["settings"]["build"]["memory_limit"] = next(counter)
            return api(daemon, "POST", f"/api/servers/{uuid}/sync")[0]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(bump_then_sync, range(50)))
        assert statuses == [204] * 50
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204  # one more after the last change
        final = panel.servers[uuid]["settings"]["build"]["memory_limit"]
        assert daemon.servers[uuid].config.build.memory_mb == final
        assert saved_document(daemon, uuid)["settings"]["build"]["memory_limit"] == final

    def test_syncs_of_different_servers_run_in_parallel(self, panel, make_daemon):
        a = panel.add(panel_document())
        b = panel.add(panel_document())
        daemon = make_daemon(panel)
        panel.hang_s[f"/api/remote/servers/{a}"] = 1.0
        panel.hang_s[f"/api/remote/servers/{b}"] = 1.0
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(lambda u: api(daemon, "POST", f"/api/servers/{u}/sync")[0], [a, b]))
        assert statuses == [204, 204] and time.monotonic() - started < 1.9

    def test_suspension_closes_every_session_before_the_204(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        other = panel.add(panel_document())
        daemon.load_from_panel()
        closed = []
        for i in range(5):
            daemon.sessions.register(uuid, f"user{i}", "websocket", lambda code, reason: closed.append(code))
        daemon.sessions.register(uuid, "user9", "sftp", lambda code, reason: closed.append(code))
        daemon.sessions.register(other, "user0", "websocket", lambda code, reason: closed.append(("other", code)))
        panel.servers[uuid]["settings"]["suspended"] = True
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert closed == [4409] * 6 and daemon.sessions.count(uuid) == 0 and daemon.sessions.count(other) == 1
        _, _, view = api(daemon, "GET", f"/api/servers/{uuid}")
        assert view["is_suspended"] is True and "suspended: 6 session(s) closed" in view["wingslite"]["last_sync"]["applied"]
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/power", body={"action": "start"})
        assert status == 400 and body["error"] == "Cannot start or restart a server that is suspended."

    def test_a_failing_disk_quota_keeps_the_new_configuration_and_answers_500(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)

        class BrokenQuota(w.QuotaBackend):
            name = "broken"

            def set_limit(self, root, limit_bytes):
                raise OSError("qgroup limit refused")

        daemon.servers[uuid].fs.ensure()
        daemon.servers[uuid].fs.quota = BrokenQuota()
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 777
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and "disk limit: qgroup limit refused" in body["error"]
        assert daemon.servers[uuid].config.build.memory_mb == 777  # the Panel is the source of truth
        assert daemon.servers[uuid].last_sync["failed"] == ["disk limit: qgroup limit refused"]

    def test_power_with_an_unknown_action_is_422(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/power", body={"action": "explode"})
        assert status == 422 and "power action" in body["error"]

    def test_commands_to_a_stopped_server_are_502(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/commands", body={"commands": ["say hi"]})
        assert status == 502 and body["error"] == "Cannot send commands to a stopped server instance."

    def test_deauthorize_user_closes_that_users_sessions(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        closed = []
        daemon.sessions.register(uuid, "alice", "websocket", lambda c, r: closed.append(("alice", c)))
        daemon.sessions.register(uuid, "bob", "sftp", lambda c, r: closed.append(("bob", c)))
        assert api(daemon, "POST", "/api/deauthorize-user", body={"user": "alice", "servers": [uuid]})[0] == 204
        assert closed == [("alice", w.CLOSE_REVOKED)] and daemon.sessions.count(uuid) == 1
        assert api(daemon, "POST", "/api/deauthorize-user", body={"servers": "x"})[0] == 422


##############################################################################
# daemon: boot
##############################################################################


class TestBoot:
    def test_boot_loads_every_page(self, panel, make_daemon):
        uuids = {panel.add(panel_document()) for _ in range(7)}
        daemon = make_daemon(panel, remote_query__boot_servers_per_page=3)
        assert set(daemon.servers) == uuids
        assert panel.calls["/api/remote/servers"] == 3
        assert panel.calls.get("/api/remote/servers/reset") == 1
        for uuid in uuids:
            assert saved_document(daemon, uuid)["settings"]["uuid"] == uuid

    def test_one_bad_server_in_the_list_does_not_stop_the_boot(self, panel, make_daemon):
        good = panel.add(panel_document())
        bad = panel.add(panel_document(build__memory_limit=-1))
        daemon = make_daemon(panel)
        assert good in daemon.servers and bad not in daemon.servers

    def test_panel_down_at_boot_serves_saved_configurations_then_catches_up(self, panel, make_daemon, tmp_path):
        uuid = panel.add(panel_document())
        first = make_daemon(panel)
        first.stop()
        panel.down = True
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 2222
        newcomer = panel.add(panel_document())
        second = make_daemon(panel, boot=False)
        status, _, body = api(second, "GET", "/api/servers")
        assert status == 200 and [s["configuration"]["uuid"] for s in body] == [uuid]
        assert body[0]["configuration"]["build"]["memory_limit"] == 4096  # the saved one
        assert not second.wait_booted(0.5)
        panel.down = False
        assert second.wait_booted(10)
        assert second.servers[uuid].config.build.memory_mb == 2222 and newcomer in second.servers

    def test_boot_drops_servers_the_panel_no_longer_lists(self, panel, make_daemon):
        keep = panel.add(panel_document())
        gone = panel.add(panel_document())
        make_daemon(panel).stop()
        del panel.servers[gone]
        daemon = make_daemon(panel)
        assert set(daemon.servers) == {keep}

    def test_a_torn_saved_file_is_ignored_not_fatal(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        make_daemon(panel).stop()
        saved = Path(make_daemon.tmp_path / "root" / "wingslite" / "servers" / f"{uuid}.json")
        saved.write_bytes(saved.read_bytes()[:50])
        panel.down = True
        daemon = make_daemon(panel, boot=False)
        assert api(daemon, "GET", "/api/servers")[2] == []
        panel.down = False
        assert daemon.wait_booted(10) and uuid in daemon.servers

    def test_two_daemons_in_one_process_do_not_collide(self, panel, tmp_path):
        a, b = panel.add(panel_document()), panel.add(panel_document())
        d1 = DaemonFactory(tmp_path / "one")
        d2 = DaemonFactory(tmp_path / "two")
        try:
            one, two = d1(panel), d2(panel)
            assert one.port != two.port and set(one.servers) == set(two.servers) == {a, b}
            assert api(one, "POST", f"/api/servers/{a}/sync")[0] == 204
            assert one.servers[a].last_sync and two.servers[a].last_sync is None
        finally:
            d1.stop_all()
            d2.stop_all()


##############################################################################
# CLI: --demo
##############################################################################


class TestDemo:
    def test_demo_prints_token_and_curl_lines_and_its_sync_works(self):
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "wingslite.py"), "--demo", "--port", str(port), "--sftp-port", str(_free_port())],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            lines = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
                lines.append(proc.stdout.readline())
            text = "".join(lines)
            token = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("node token:"))
            assert f"http://127.0.0.1:{port}" in text and "/sync" in text
            _, _, servers = api(port, "GET", "/api/servers", token=token)
            uuid = servers[0]["configuration"]["uuid"]
            assert api(port, "POST", f"/api/servers/{uuid}/sync", token=token)[0] == 204
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)


##############################################################################
# environments: Docker (issue 3) -- tests go below this marker
##############################################################################

# -- marker: docker tests --


##############################################################################
# websocket (issue 4) -- tests go below this marker
##############################################################################

# -- marker: websocket tests --


##############################################################################
# SFTP (issue 5) -- tests go below this marker
##############################################################################

# -- marker: sftp tests --


##############################################################################
# disk quotas (issue 6) -- tests go below this marker
##############################################################################

# -- marker: quota tests --


##############################################################################
# fault drills (issue 7) -- tests go below this marker
##############################################################################

# -- marker: fault drill tests --
