"""Tests for wingslite, through its real interfaces: HTTP over loopback, a fake Panel that answers
as the Panel does (``wingslite.PanelStandIn``), real websocket and SFTP clients, a real Docker
engine.

Shared fixtures come first (fake Panel, daemon factory, HTTP helper); then one class per area in
the order of the sections of wingslite.py; after them the tests that cross areas: the Panel's
buttons end to end, hostile input to the Panel features, and the fault drills (the Docker engine
drill last of all).

Tests that need the Docker engine (and the ``wingslite-test`` image) are marked ``docker``:
``pytest -m 'not docker'`` runs the others on a machine without one. A test that uses the
``docker_servers`` fixture without the mark fails, so the mark cannot be forgotten there.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
import ctypes
import errno
import functools
import gzip
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import lzma
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
import urllib.parse
import uuid as uuidlib
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wingslite as w

HERE = Path(__file__).resolve().parent
TOKEN_ID = "Xq3LZ0a9bP2kR7tW"
TOKEN = "7hK2mQ9vX4cB8nZ1pL6sD3fG5jW0rT2yU8iO4eA1qS7dF9gH3jK6lZ2xC5vB8nM0"


# shared fixtures: the fake Panel, the daemon, an HTTP client ######################################


def panel_document(uuid: str | None = None, **settings_changes) -> dict:
    """A server document shaped exactly as the Panel sends it for the Paper egg (Panel:
    ``ServerConfigurationStructureService`` and ``EggConfigurationService``)."""
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
            "container": {
                "image": "ghcr.io/pterodactyl/yolks:java_21",
                "oom_disabled": True,
                "requires_rebuild": False,
            },
            "allocations": {
                "force_outgoing_ip": False,
                "default": {"ip": "203.0.113.10", "port": 25565},
                "mappings": {"203.0.113.10": [25565, 25575]},
            },
            "mounts": [],
            "egg": {"id": "5a0f2c1e-7b3d-4c8e-9f60-2d1e3a4b5c6d", "file_denylist": []},
        },
        "process_configuration": {
            "startup": {
                "done": [")! For help, type "],
                "user_interaction": [],
                "strip_ansi": False,
            },
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


class FakePanel(w.PanelStandIn):
    """The module's Panel stand-in with the tests' node token, serving from construction, its
    errors pretty-printed as the Panel's are (``app/Exceptions/Handler.php``).

    ``servers`` maps uuid -> document; ``requests`` holds every ``w.PanelRequest`` (method, path,
    headers, query, parsed JSON body, raw bytes); ``calls`` counts requests per path. Failure
    switches: ``fail[path_prefix] = [status, ...]``, ``garbage``, ``hang_s``, ``down``.
    """

    json_indent = 4

    def __init__(self, token_id: str = TOKEN_ID, token: str = TOKEN):
        super().__init__(token_id, token)
        self.start()


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
        "api": {
            "host": "127.0.0.1",
            "port": 8080,
            "ssl": {"enabled": False, "cert": "", "key": ""},
            "upload_limit": 100,
        },
        "system": {
            "root_directory": str(tmp_path / "root"),
            "data": str(tmp_path / "volumes"),
            "log_directory": str(tmp_path / "logs"),
            "tmp_directory": str(tmp_path / "tmp"),
            "backup_directory": str(tmp_path / "backups"),
            "sftp": {"bind_port": 2022},
        },
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
            assert daemon.wait_booted(10), (
                "the daemon did not finish loading servers from the Panel"
            )
        return daemon

    def stop_all(self):
        for daemon in self.daemons:
            daemon.stop()


@pytest.fixture
def make_daemon(tmp_path):
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()


def api(
    daemon_or_port,
    method: str,
    path: str,
    body=None,
    token: str | None = TOKEN,
    headers=None,
    raw: bytes | None = None,
):
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


def wait_for(
    predicate, timeout_s: float = 10, *, what: str = "condition", interval_s: float = 0.02
):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout_s``
    (it is asked once more at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_document(daemon: w.Daemon, uuid: str) -> dict:
    return json.loads(
        (daemon.config.root_dir / "wingslite" / "servers" / f"{uuid}.json").read_text()
    )


# config ###########################################################################################


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
                assert config.get(key) == default, (
                    f"wingslite.yml shows {key} with a value other than its default"
                )

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("token: [1, 2]\n", "token: expected str"),
            ("api: {port: eighty}\n", "api.port: expected int"),
            (
                "system: {disk_check_interval: -5}\n",
                "system.disk_check_interval: must not be negative",
            ),
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
        [
            (None, "no such file"),
            ("api: [unclosed\n", "not valid YAML at line"),
            ("api:\n  port: 8080\n", "token_id: required"),
        ],
    )
    def test_cli_exits_2_with_one_line_naming_the_file(self, tmp_path, content, expected):
        path = tmp_path / "config.yml"
        if content is not None:
            path.write_text(content)
        proc = subprocess.run(
            [sys.executable, str(HERE / "wingslite.py"), "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], proc.stderr

    def test_cli_version_and_help(self):
        out = subprocess.run(
            [sys.executable, str(HERE / "wingslite.py"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and out.stdout.strip() == f"wingslite {w.VERSION}"
        out = subprocess.run(
            [sys.executable, str(HERE / "wingslite.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and "--config" in out.stdout and "--demo" in out.stdout

    def test_cli_runs_and_stops_cleanly_on_sigterm(self, tmp_path, panel):
        panel.add(panel_document())
        raw = node_config(tmp_path, panel.url)
        port = free_port()
        raw["api"]["port"] = port
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(raw))
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "wingslite.py"), "--config", str(path)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: _answers(port), what="the CLI daemon to answer")
            wait_for(
                lambda: len(api(port, "GET", "/api/servers")[2]) == 1,
                what="the server to be loaded from the Panel",
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=5)


def _answers(port: int) -> bool:
    try:
        return api(port, "GET", "/api/system")[0] == 200
    except OSError:
        return False


# Panel client #####################################################################################


class TestPanelClient:
    def client(self, panel, budget_s=2.0):
        return w.PanelClient(panel.url, TOKEN_ID, TOKEN, budget_s=budget_s, retry_initial_s=0.01)

    def test_sends_wings_headers(self, panel):
        uuid = panel.add(panel_document())
        self.client(panel).get_server(uuid)
        headers = panel.requests[-1].headers
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
        port = free_port()
        client = w.PanelClient(
            f"http://127.0.0.1:{port}", TOKEN_ID, TOKEN, budget_s=0.3, retry_initial_s=0.01
        )
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


class ScriptedHttp:
    """A loopback HTTP peer whose every connection is handed to ``script(sock, request_bytes)``:
    for answers no well-behaved server gives (redirects, trickles, lies). ``requests`` keeps the
    raw request heads it received."""

    def __init__(self, script):
        self.script = script
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        with self.listener:  # closed here, by the only thread that accepts on it (see close())
            while True:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    return
                if self.stopping:
                    sock.close()
                    return
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        with sock:
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    head += chunk
            self.requests.append(head)
            with contextlib.suppress(OSError):
                self.script(sock, head)

    def close(self):
        # Closing the listener from here raced with the accepting thread: it could read the
        # descriptor number just before, then accept on whatever socket reused that number next
        # (the next test's daemon API) and answer one of its requests with this script (a 302).
        # Instead, wake the accepting thread with a connection and let it close the listener.
        self.stopping = True
        with contextlib.suppress(OSError):
            socket.create_connection(self.listener.getsockname(), timeout=5).close()
        self._acceptor.join(10)


@pytest.fixture
def scripted():
    peers = []

    def make(script):
        peers.append(ScriptedHttp(script))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


class TestPanelClientHostile:
    """A Panel (or whatever answers in its place) that lies, redirects or trickles."""

    def client(self, url, budget_s=2.0, **kwargs):
        return w.PanelClient(
            url, TOKEN_ID, TOKEN, budget_s=budget_s, retry_initial_s=0.01, **kwargs
        )

    def lying_pages(self, panel, **meta_changes):
        honest = panel.page

        def page(query):
            doc = honest(query)
            doc["meta"].update(meta_changes)
            if "total" in meta_changes and meta_changes["total"] is None:
                del doc["meta"]["total"]
            return doc

        panel.page = page

    def test_a_last_page_that_does_not_fit_the_total_is_refused_before_any_page_is_queued(
        self, panel
    ):
        for _ in range(4):
            panel.add(panel_document())
        self.lying_pages(panel, last_page=500)
        with pytest.raises(w.PanelError, match=r"meta\.last_page 500 does not fit meta\.total 4"):
            self.client(panel.url).list_servers(per_page=50)
        assert panel.calls["/api/remote/servers"] == 1

    def test_more_pages_than_max_panel_pages_is_a_clear_error(self, panel):
        panel.add(panel_document())
        self.lying_pages(panel, last_page=3_000_000, total=None)
        with pytest.raises(w.PanelError, match=r"3000000 pages.*at most 1000 \(wingslite.max"):
            self.client(panel.url).list_servers(per_page=50)
        assert panel.calls["/api/remote/servers"] == 1

    def test_the_first_empty_page_ends_the_list_and_only_a_few_pages_are_in_flight(self, panel):
        uuids = {panel.add(panel_document()) for _ in range(4)}
        self.lying_pages(panel, last_page=900, total=None)
        items = self.client(panel.url).list_servers(per_page=2, concurrency=3)
        assert {i["settings"]["uuid"] for i in items} == uuids
        # pages 1-2 hold the servers, page 3 is empty: at most `concurrency` asked beyond it
        assert 3 <= panel.calls["/api/remote/servers"] <= 3 + 3

    def test_max_panel_pages_comes_from_the_config(self, panel, tmp_path):
        config = w.Config(node_config(tmp_path, panel.url, wingslite__max_panel_pages=2), "t")
        client = w.PanelClient.from_config(config)
        for _ in range(5):
            panel.add(panel_document())
        with pytest.raises(w.PanelError, match="3 pages; wingslite reads at most 2"):
            client.list_servers(per_page=2)

    def test_a_redirect_to_another_origin_is_refused_and_never_carries_the_token(self, scripted):
        elsewhere = scripted(
            lambda sock, head: sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        )
        redirect = (
            f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url}/steal\r\nContent-Length: 0\r\n\r\n"
        )
        panel = scripted(lambda sock, head: sock.sendall(redirect.encode()))
        with pytest.raises(w.PanelError) as info:
            self.client(panel.url).get_server("x")
        assert info.value.http_status == 302 and f"{elsewhere.url}/steal" in info.value.message
        assert "redirect" in info.value.message
        assert len(panel.requests) == 1, "a redirect is final, not retried"
        assert elsewhere.requests == []

    def test_a_trickled_body_is_cut_at_the_budget(self, scripted):
        def trickle(sock, head):
            body = b'{"settings": {}}' + b" " * 200
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)  # each read is far inside any per-read timeout

        panel = scripted(trickle)
        started = time.monotonic()
        with pytest.raises(w.PanelError, match="did not answer within"):
            self.client(panel.url, budget_s=1.0).get_server("x")
        # 21 s of trickle; the budget (retries included) ends the call long before
        assert time.monotonic() - started < 10

    def test_trickled_headers_are_cut_at_the_budget(self, scripted):
        def trickle(sock, head):
            for line in [b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad-%d: y\r\n" % i for i in range(60)]:
                sock.sendall(line)
                time.sleep(0.25)
            sock.sendall(b"Content-Length: 2\r\n\r\n{}")

        panel = scripted(trickle)
        started = time.monotonic()
        with pytest.raises(w.PanelError, match="did not answer within"):
            self.client(panel.url, budget_s=1.0).get_server("x")
        assert time.monotonic() - started < 10


# server model #####################################################################################


class TestServerModel:
    def test_panel_example_parses(self):
        doc = panel_document()
        cfg = w.parse_server_document(doc)
        assert cfg.build == w.Build(4096, 0, 500, 200, "", 20480, True)
        assert cfg.allocations.mappings == (("203.0.113.10", (25565, 25575)),)
        assert cfg.process.stop_type == "command" and cfg.process.stop_value == "stop"
        assert cfg.process.configs[0].replace[0] == w.Replacement("server-port", "25565")

    def test_a_null_object_gives_its_fields_defaults_and_a_wrong_type_is_named(self):
        doc = panel_document(meta=None, container=None, allocations=None, egg=None, labels=None)
        doc["process_configuration"] = {"startup": None, "stop": None, "configs": None}
        cfg = w.parse_server_document(doc)
        assert (cfg.name, cfg.image, cfg.egg_id, cfg.file_denylist) == ("", "", "", ())
        assert cfg.allocations == w.Allocations("0.0.0.0", 0, (), False)
        assert cfg.process.done == () and cfg.process.stop_value == "SIGKILL"
        with pytest.raises(w.DocumentError, match=r"settings\.allocations: expected an object"):
            w.parse_server_document(panel_document(allocations=[1]))
        with pytest.raises(
            w.DocumentError, match=r"mappings\.10\.0\.0\.1\[1\]: must be 1\.\.65535"
        ):
            w.parse_server_document(panel_document(allocations__mappings={"10.0.0.1": [1, 0]}))

    @pytest.mark.parametrize(
        "mb, expected",
        [
            (1024, 1_177_600_000),
            (2048, 2_355_200_000),
            (2049, 2_253_900_000),
            (4096, 4_505_600_000),
            (4097, 4_301_850_000),
            (0, 0),
        ],
    )
    def test_memory_bytes_follow_wings_overhead_thresholds(self, mb, expected):
        assert w.memory_limit_bytes(mb) == expected

    def test_rounding_is_half_away_from_zero(self):
        assert (
            w.round_half_away(2.5) == 3
            and w.round_half_away(3.5) == 4
            and w.round_half_away(-2.5) == -3
        )
        # 1 MB x 1.15 x 1e6 = 1150000.0000000002 in floats; stays an exact integer
        assert w.memory_limit_bytes(1) == 1_150_000

    def test_container_resources_as_wings(self):
        cfg = w.parse_server_document(
            panel_document(build__memory_limit=1024, build__swap=512, build__threads="0-1,3")
        )
        res = w.container_resources(cfg.build)
        assert res["Memory"] == 1_177_600_000 and res["MemoryReservation"] == 1_024_000_000
        assert res["MemorySwap"] == 512_000_000 + 1_177_600_000
        assert (
            res["CpuQuota"] == 200_000
            and res["CpuPeriod"] == 100_000
            and res["CpusetCpus"] == "0-1,3"
        )
        assert res["PidsLimit"] == 512 and res["BlkioWeight"] == 500
        unlimited = w.container_resources(w.Build(memory_mb=0, swap_mb=-1, cpu_percent=0))
        assert (
            "CpuQuota" not in unlimited
            and "CpusetCpus" not in unlimited
            and unlimited["MemorySwap"] == -1
        )

    def test_disk_is_mebibytes(self):
        assert w.disk_limit_bytes(1024) == 1_073_741_824

    def test_environment_as_wings_builds_it_with_plain_numbers(self):
        doc = panel_document(
            environment={
                "SERVER_PORT": "1",
                "P_SERVER_ALLOCATION_LIMIT": 0,
                "RATE": 1.5,
                "flag": True,
                "EMPTY": None,
            }
        )
        env = w.container_environment(w.parse_server_document(doc), "Europe/Berlin")
        assert env[:5] == [
            "TZ=Europe/Berlin",
            "STARTUP=java -jar {{SERVER_JARFILE}}",
            "SERVER_MEMORY=4096",
            "SERVER_IP=203.0.113.10",
            "SERVER_PORT=25565",
        ]
        assert (
            "P_SERVER_ALLOCATION_LIMIT=0" in env
            and "RATE=1.5" in env
            and "FLAG=true" in env
            and "EMPTY=" in env
        )
        assert (
            sum(line.startswith("SERVER_PORT=") for line in env) == 1
        )  # the Panel's clash is skipped

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
        assert (
            cfg.build.memory_mb == 1024
            and cfg.allocations.mappings == ()
            and cfg.file_denylist == ()
        )
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
            # Sizes beyond 2^53 bytes after conversion (1e308 MB once wedged a start).
            ({"build__memory_limit": 1e308}, "settings.build.memory_limit: 1e+308 MB is more"),
            ({"build__disk_space": 2**33 + 1}, "settings.build.disk_space"),
            ({"build__swap": 2**60}, "settings.build.swap"),
            ({"build__threads": "0," * 600}, "settings.build.threads: longer than 1024"),
            ({"uuid": "-"}, "settings.uuid: not a server uuid"),
            ({"uuid": "../../etc"}, "settings.uuid: not a server uuid"),
            ({"build__memory_limit": "1024"}, "expected a number, got a string"),
            (
                {"allocations__default": {"ip": "1.2.3.4", "port": 70000}},
                "settings.allocations.default.port",
            ),
            (
                {"allocations__mappings": {"1.2.3.4": [0]}},
                "settings.allocations.mappings.1.2.3.4[0]",
            ),
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

    @pytest.mark.parametrize(
        "doc", [None, [], "text", {"settings": None}, {"settings": {"uuid": "x"}}]
    )
    def test_documents_of_the_wrong_shape_are_refused(self, doc):
        with pytest.raises(w.DocumentError):
            w.parse_server_document(doc)


# filesystem and disk ##############################################################################


class TestFilesystem:
    def test_atomic_write_interrupted_before_rename_leaves_the_old_file(
        self, tmp_path, monkeypatch
    ):
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


def held_bytes(root: Path) -> int:
    """What the files of ``root`` really hold: every regular file under it, plus the removed files
    this process (the daemon under test) still holds open there."""
    total = sum(
        os.lstat(os.path.join(d, f)).st_size
        for d, _, files in os.walk(root)
        for f in files
        if not os.path.islink(os.path.join(d, f))
    )
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{root}/") and target.endswith(" (deleted)"):
                total += os.stat(f"/proc/self/fd/{fd}").st_size
    return total


class TestMetering:
    """``Filesystem.open_metered`` / ``remove`` / ``rename``: the figure counts what is held."""

    MIB = 1 << 20

    @pytest.fixture
    def fs(self, tmp_path):
        root = tmp_path / "srv"
        root.mkdir()
        fs = w.Filesystem(root, 4 * self.MIB, check_interval_s=3600)
        fs.recalculate()
        with fs.jail() as jail:
            yield fs, jail, root

    def test_a_removed_file_counts_until_its_last_handle_closes(self, fs):
        fs, jail, root = fs
        handles = []
        with pytest.raises(w.DiskLimitExceeded):
            for i in range(8):
                handle = fs.open_metered(jail, f"f{i}", os.O_WRONLY | os.O_CREAT)
                handles.append(handle)
                handle.write(b"x" * self.MIB)
                fs.remove(jail, f"f{i}")
        assert held_bytes(root) <= 4 * self.MIB and fs.usage_bytes() >= 4 * self.MIB - 1
        assert fs.recalculate() >= 4 * self.MIB - 1  # the walk adds what the handles hold
        for handle in handles:
            handle.close()
        assert fs.usage_bytes() == 0 and held_bytes(root) == 0
        with fs.open_metered(jail, "after", os.O_WRONLY | os.O_CREAT) as handle:
            handle.write(b"y" * 4 * self.MIB)

    def test_a_file_replaced_under_a_writer_counts_until_it_closes(self, fs):
        fs, jail, root = fs
        writer = fs.open_metered(jail, "live", os.O_WRONLY | os.O_CREAT)
        writer.write(b"a" * 3 * self.MIB)
        with fs.open_metered(jail, "next", os.O_WRONLY | os.O_CREAT) as handle:
            handle.write(b"b" * 10)
        fs.rename(jail, "next", "live")
        with pytest.raises(w.DiskLimitExceeded):
            writer.write(b"a" * 2 * self.MIB)  # still held: 3 MiB + 10 bytes + 2 MiB > 4 MiB
        writer.close()
        assert fs.usage_bytes() == 10 == held_bytes(root)

    def test_removing_a_file_nothing_booked_gives_back_nothing(self, fs):
        fs, jail, root = fs
        (root / "old.bin").write_bytes(b"o" * 3 * self.MIB)
        fs.recalculate()
        (root / "game.bin").write_bytes(b"g" * 3 * self.MIB)  # the game, since the walk
        fs.remove(jail, "game.bin")
        assert fs.usage_bytes() == 3 * self.MIB  # not 0: those bytes were never counted
        with pytest.raises(w.DiskLimitExceeded):
            with fs.open_metered(jail, "up", os.O_WRONLY | os.O_CREAT) as handle:
                handle.write(b"u" * 2 * self.MIB)
        fs.remove(jail, "old.bin")  # counted by the walk: given back whole
        assert fs.usage_bytes() == 0

    def test_remove_tree_gives_back_what_was_counted_and_follows_no_link(self, fs, tmp_path):
        fs, jail, root = fs
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "keep").write_bytes(b"k")
        jail.mkdir("d")
        jail.mkdir("d/e")
        with fs.open_metered(jail, "d/e/f", os.O_WRONLY | os.O_CREAT) as handle:
            handle.write(b"f" * self.MIB)
        os.symlink(tmp_path / "outside", root / "d" / "out")
        (root / "d" / "game.bin").write_bytes(b"g" * self.MIB)  # nothing booked this one
        held = fs.open_metered(jail, "d/e/f")  # a client still reads it
        assert fs.remove_tree(jail, "d") == 0 and fs.usage_bytes() == self.MIB
        held.close()
        assert fs.usage_bytes() == 0 and not (root / "d").exists()
        assert (tmp_path / "outside" / "keep").read_bytes() == b"k"

    def test_truncation_and_append_are_metered(self, fs):
        fs, jail, root = fs
        with fs.open_metered(jail, "f", os.O_WRONLY | os.O_CREAT) as handle:
            handle.truncate(2 * self.MIB)
            assert fs.usage_bytes() == 2 * self.MIB
            with pytest.raises(w.DiskLimitExceeded):
                handle.truncate(5 * self.MIB)
            handle.truncate(self.MIB)
        assert fs.usage_bytes() == self.MIB
        with fs.open_metered(jail, "f", os.O_WRONLY | os.O_APPEND) as handle:
            handle.pwrite(b"z" * 10, 0)  # appended, whatever the offset
        assert (root / "f").stat().st_size == self.MIB + 10 == fs.usage_bytes()
        with fs.open_metered(jail, "f", os.O_WRONLY | os.O_TRUNC):
            pass
        assert fs.usage_bytes() == 0


# disk quotas ######################################################################################


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory):
    """A loop-mounted btrfs image (under /tmp) for the whole session; unmounted and deleted at
    the end."""
    if os.geteuid() != 0:
        print("SKIP btrfs quota tests: not root (a loop mount needs root)")
        pytest.skip("btrfs quota tests need root (loop mount)")
    if not (shutil.which("mkfs.btrfs") and shutil.which("btrfs")):
        print("SKIP btrfs quota tests: btrfs-progs (mkfs.btrfs, btrfs) is not installed")
        pytest.skip("btrfs quota tests need btrfs-progs (mkfs.btrfs, btrfs)")
    base = tmp_path_factory.mktemp("btrfs")
    image, mnt = base / "disk.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(400 * 1024 * 1024)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink()


def write_until_refused(
    path: Path, chunk: int = 1024 * 1024, most: int = 64
) -> tuple[int, int | None]:
    """Append ``chunk``-byte blocks (fsynced) until the kernel refuses; (bytes written, errno or
    None)."""
    written = 0
    try:
        fh = open(path, "ab")  # creating the file may be what is refused
    except OSError as exc:
        return 0, exc.errno
    with fh:
        for _ in range(most):
            try:
                fh.write(b"\0" * chunk)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:
                return written, exc.errno
            written += chunk
    return written, None


class FakeQuotaCalls:
    """Records the ioctls and quotactls the project backend builds; keeps project ids per inode."""

    def __init__(self, quotactl_errno: int | None = None):
        self.calls: list[tuple] = []
        self.projids: dict[int, int] = {}
        self.space: dict[int, int] = {}
        self.quotactl_errno = quotactl_errno

    def ioctl(self, fd, request, buf):
        ino = os.fstat(fd).st_ino
        if request == w.FS_IOC_FSGETXATTR:
            buf[:] = w.FSXATTR.pack(0, 0, 0, self.projids.get(ino, 0), 0)
        elif request == w.FS_IOC_FSSETXATTR:
            xflags, _, _, projid, _ = w.FSXATTR.unpack(buf)
            self.projids[ino] = projid
            self.calls.append(("setxattr", ino, xflags, projid))
        else:
            raise AssertionError(f"unexpected ioctl {request:#x}")

    def quotactl(self, cmd, device, ident, buf):
        if self.quotactl_errno:
            raise OSError(self.quotactl_errno, os.strerror(self.quotactl_errno))
        self.calls.append(("quotactl", cmd, device, ident, bytes(buf)))
        if cmd == w.qcmd(w.Q_GETQUOTA, w.PRJQUOTA):
            buf[:] = w.IF_DQBLK.pack(0, 0, self.space.get(ident, 0), 0, 0, 0, 0, 0, 0x1FF)


class TestQuotaSelection:
    MOUNTINFO = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "44 27 0:39 / /srv/data\\040disk rw,relatime - btrfs /dev/loop0 rw,subvolid=5\n"
        "45 27 0:40 / /srv rw - xfs /dev/sdb1 rw\n"
    )

    def test_mount_of_takes_the_longest_mount_point_and_decodes_escapes(self):
        assert w.mount_of("/srv/data disk/x", self.MOUNTINFO) == (
            "/srv/data disk",
            "btrfs",
            "/dev/loop0",
        )
        assert w.mount_of("/srv/other", self.MOUNTINFO) == ("/srv", "xfs", "/dev/sdb1")
        assert w.mount_of("/srvx", self.MOUNTINFO) == ("/", "ext4", "/dev/vda")

    def test_qgroup_show_output_is_parsed_for_referenced_bytes(self):
        out = (
            "Qgroupid    Referenced    Exclusive   Path\n--------    ----------    ---------   "
            "----\n1/100  999 999 x\n0/257   10469376   10469376   data/s\n"
        )
        assert w.parse_qgroup_referenced(out) == 10469376
        assert w.parse_qgroup_referenced(out, "1/100") == 999
        with pytest.raises(ValueError):
            w.parse_qgroup_referenced("Qgroupid Referenced\n")

    def test_auto_takes_project_quotas_on_ext4_when_the_kernel_has_them_else_soft_with_the_reason(
        self, tmp_path
    ):
        mi = "27 1 254:0 / / rw - ext4 /dev/sdz rw\n"
        assert (
            w.select_quota_backend("auto", tmp_path, mountinfo=mi, calls=FakeQuotaCalls()).name
            == "project"
        )
        soft = w.select_quota_backend(
            "auto", tmp_path, mountinfo=mi, calls=FakeQuotaCalls(errno.ENOSYS)
        )
        assert (
            soft.name == "soft" and "no quota support" in soft.reason and soft.stops_running_servers
        )
        tmpfs = w.select_quota_backend(
            "project", tmp_path, mountinfo="1 1 0:1 / / rw - tmpfs tmpfs rw\n"
        )
        assert tmpfs.name == "soft" and "not ext4 or xfs" in tmpfs.reason

    def test_btrfs_requested_on_ext4_falls_back_to_soft_and_says_why(self, tmp_path):
        backend = w.select_quota_backend(
            "btrfs", tmp_path, mountinfo="27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        )
        assert backend.name == "soft" and "not btrfs" in backend.reason

    def test_off_never_stops_a_server_and_bad_modes_are_refused(self, tmp_path):
        off = w.select_quota_backend("off", tmp_path)
        assert off.name == "off" and not off.stops_running_servers
        with pytest.raises(w.ConfigError):
            w.select_quota_backend("zfs", tmp_path)
        with pytest.raises(
            w.ConfigError, match=r"node\.yml: wingslite\.disk_quota: must be one of auto, btrfs"
        ):
            w.Config(
                node_config(tmp_path, "http://127.0.0.1:9", wingslite__disk_quota="zfs"), "node.yml"
            )  # CLI: exit 2

    def test_system_reports_the_backend_in_force_and_why(self, panel, make_daemon):
        daemon = make_daemon(panel, wingslite__disk_quota="off")
        status, _, body = api(daemon, "GET", "/api/system")
        assert status == 200
        assert body["wingslite"]["disk_quota"]["configured"] == "off"
        assert (
            body["wingslite"]["disk_quota"]["backend"] == "off"
            and "off" in body["wingslite"]["disk_quota"]["reason"]
        )


class TestProjectQuota:
    def test_request_numbers_match_the_kernel_headers(self):
        # linux/fs.h and linux/quota.h on every architecture with the generic ioctl layout
        assert (w.FS_IOC_FSGETXATTR, w.FS_IOC_FSSETXATTR) == (0x801C581F, 0x401C5820)
        assert (
            w.qcmd(w.Q_SETQUOTA, w.PRJQUOTA) == 0x80000802
            and w.qcmd(w.Q_GETQUOTA, w.PRJQUOTA) == 0x80000702
        )
        assert (w.IF_DQBLK.size, w.FSXATTR.size, w.IF_DQINFO.size) == (72, 28, 24)

    def test_block_limit_rounds_up_to_whole_kib_and_zero_removes_it(self):
        hard, soft, *_, valid = w.IF_DQBLK.unpack(w.setquota_block(10 * 1024 * 1024 + 1))
        assert (hard, soft, valid) == (10241, 10241, w.QIF_BLIMITS)
        assert w.IF_DQBLK.unpack(w.setquota_block(0))[:2] == (0, 0)

    def test_prepare_tags_the_directory_to_inherit_and_tags_what_is_already_there_once(
        self, tmp_path
    ):
        calls = FakeQuotaCalls()
        backend = w.ProjectQuota(tmp_path, "/dev/sdz", calls=calls)
        root = tmp_path / "3f1c8a"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "file").write_bytes(b"x")
        (root / "link").symlink_to("/etc/passwd")
        backend.prepare(root)
        pid = backend.project_id(root)
        assert pid != 0 and backend.enforced(root)
        tagged = {
            ino: (flags, projid)
            for _, ino, flags, projid in (c for c in calls.calls if c[0] == "setxattr")
        }
        assert tagged == {
            root.stat().st_ino: (w.FS_XFLAG_PROJINHERIT, pid),
            (root / "sub").stat().st_ino: (w.FS_XFLAG_PROJINHERIT, pid),
            (root / "sub" / "file").stat().st_ino: (0, pid),
        }
        calls.calls.clear()
        backend.prepare(root)
        assert calls.calls == []

    def test_prepare_does_not_hang_on_a_fifo_the_game_server_made(self, tmp_path):
        backend = w.ProjectQuota(tmp_path, "/dev/sdz", calls=FakeQuotaCalls())
        root = tmp_path / "srv"
        root.mkdir()
        os.mkfifo(
            root / "pipe"
        )  # no writer: a blocking open would wait forever, holding the server's lock
        worker = threading.Thread(target=backend.prepare, args=(root,), daemon=True)
        worker.start()
        worker.join(5)
        assert not worker.is_alive() and backend.enforced(root)

    def test_project_ids_are_stable_and_never_shared(self, tmp_path):
        calls = FakeQuotaCalls()
        backend = w.ProjectQuota(tmp_path, "/dev/sdz", calls=calls)
        a, b = tmp_path / "a", tmp_path / "b"
        backend.prepare(a)
        calls.projids[a.stat().st_ino] = backend.choose_project_id(
            b
        )  # b's natural id is taken by a
        backend.prepare(b)
        assert backend.project_id(a) != backend.project_id(b) != 0
        assert backend.choose_project_id(tmp_path / "c") == backend.choose_project_id(
            tmp_path / "c"
        )

    def test_set_limit_builds_setquota_for_the_directory_project_and_usage_comes_from_getquota(
        self, tmp_path
    ):
        calls = FakeQuotaCalls()
        backend = w.ProjectQuota(tmp_path, "/dev/sdz", calls=calls)
        root = tmp_path / "srv"
        root.mkdir()
        notes = backend.set_limit(root, 5 * 1024 * 1024)  # an untagged directory is tagged first
        pid = backend.project_id(root)
        _, cmd, device, ident, buf = calls.calls[-1]
        assert (cmd, device, ident, w.IF_DQBLK.unpack(buf)[0]) == (
            0x80000802,
            "/dev/sdz",
            pid,
            5120,
        )
        assert "5242880 bytes" in notes[0]
        assert (
            "removed" in backend.set_limit(root, 0)[0]
            and w.IF_DQBLK.unpack(calls.calls[-1][4])[0] == 0
        )
        calls.space[pid] = 12345
        assert backend.usage_bytes(root) == 12345

    @pytest.mark.parametrize(
        "err, text",
        [(errno.ENOSYS, "no quota support"), (errno.ESRCH, "prjquota"), (errno.EPERM, "root")],
    )
    def test_probe_explains_why_project_quotas_are_unavailable(self, tmp_path, err, text):
        backend, why = w.ProjectQuota.probe(tmp_path, "ext4", "/dev/sdz", FakeQuotaCalls(err))
        assert backend is None and text in why

    def test_filesystem_reads_usage_from_the_quota_not_the_walk(self, tmp_path):
        calls = FakeQuotaCalls()
        backend = w.ProjectQuota(tmp_path, "/dev/sdz", calls=calls)
        fs = w.Filesystem(tmp_path / "srv", 10_000, check_interval_s=60, quota=backend)
        fs.ensure()
        (fs.root / "f").write_bytes(b"x" * 9000)
        calls.space[backend.project_id(fs.root)] = 4096
        assert (
            fs.usage_bytes() == 4096 and fs.reserve(5904) and not fs.reserve(5905)
        )  # checked against the kernel's figure
        assert not w.must_stop_for_disk(fs)  # the kernel holds it: no stop

    def test_kernel_project_quota_refuses_a_write_past_the_limit(self, tmp_path):
        _, fstype, device = w.mount_of(tmp_path)
        backend, why = w.ProjectQuota.probe(tmp_path, fstype, device)
        if backend is None:
            print(f"SKIP kernel project quota test: {why}")
            pytest.skip(f"no kernel project quotas here: {why}")
        root = tmp_path / "srv"
        backend.prepare(root)
        backend.set_limit(root, 1024 * 1024)
        written, err = write_until_refused(root / "f", 256 * 1024, 16)
        assert err == errno.EDQUOT and written <= 1024 * 1024


class TestBtrfsQuota:
    def test_limit_holds_any_writer_and_follows_raise_lower_and_removal(self, btrfs_mount):
        data = btrfs_mount / f"data-{uuidlib.uuid4().hex[:8]}"
        backend = w.select_quota_backend("auto", data)
        assert backend.name == "btrfs", backend.reason
        backend.usage_ttl_s = 0
        root = data / "srv"
        backend.prepare(root)
        assert backend.enforced(root)
        assert "4194304 bytes" in backend.set_limit(root, 4 * 1024 * 1024)[0]
        written, err = write_until_refused(root / "a")
        assert err == errno.EDQUOT and 3 * 1024 * 1024 <= written <= 4 * 1024 * 1024
        os.sync()
        assert 3 * 1024 * 1024 <= backend.usage_bytes(root) <= 4 * 1024 * 1024
        backend.set_limit(root, 8 * 1024 * 1024)
        written, err = write_until_refused(root / "b")
        assert err == errno.EDQUOT and 3 * 1024 * 1024 <= written <= 5 * 1024 * 1024
        backend.set_limit(root, 1024 * 1024)  # far below usage: accepted, and nothing more fits
        assert write_until_refused(root / "c", 4096, 4) == (0, errno.EDQUOT)
        assert "removed" in backend.set_limit(root, 0)[0]
        assert write_until_refused(root / "d", most=16) == (16 * 1024 * 1024, None)
        os.sync()
        assert backend.usage_bytes(root) > 20 * 1024 * 1024

    def test_plain_directory_is_soft_for_that_server_and_stopped_when_over(self, btrfs_mount):
        data = btrfs_mount / f"data-{uuidlib.uuid4().hex[:8]}"
        backend = w.select_quota_backend("btrfs", data)
        root = data / "plain"
        root.mkdir(parents=True)
        backend.prepare(root)  # cannot make it a subvolume: logs, does not fail
        assert not backend.enforced(root) and backend.usage_bytes(root) is None
        fs = w.Filesystem(root, 0, check_interval_s=60, quota=backend)
        (root / "f").write_bytes(b"x" * 5000)
        fs.recalculate()
        notes = fs.set_limit(1000)
        assert any("soft for this server" in n for n in notes) and any(
            "over the new limit" in n for n in notes
        )
        assert w.must_stop_for_disk(fs)


class _RunningEnvironment(w.Environment):
    """A process that is running until stopped; the test publishes its stats ticks."""

    kind = "test"

    def __init__(self, server_uuid, events):
        super().__init__(server_uuid, events)
        self._state = w.OFFLINE
        self.stops: list[float] = []

    @property
    def state(self):
        return self._state

    def start(self, config):
        for state in (w.STARTING, w.RUNNING):
            self._state = state
            self.events.publish("status", state)

    def stop(self, config, timeout_s):
        self.stops.append(timeout_s)
        for state in (w.STOPPING, w.OFFLINE):
            self._state = state
            self.events.publish("status", state)

    def tick(self):
        self.events.publish("stats", json.dumps({"state": self._state}))


class TestQuotaDaemon:
    def _daemon(self, make_daemon, panel, **overrides) -> w.Daemon:
        daemon = w.Daemon(
            w.Config(node_config(make_daemon.tmp_path, panel.url, **overrides), "test"),
            environment_factory=lambda server: _RunningEnvironment(server.uuid, server.events),
        )
        daemon.start()
        make_daemon.daemons.append(daemon)
        assert daemon.wait_booted(10)
        return daemon

    @pytest.mark.parametrize("mode, stops", [("soft", True), ("off", False)])
    def test_a_running_server_over_its_limit_is_stopped_with_a_console_message_unless_off(
        self, panel, make_daemon, mode, stops
    ):
        uuid = panel.add(panel_document(build__disk_space=1))
        daemon = self._daemon(make_daemon, panel, wingslite__disk_quota=mode)
        server = daemon.get_server(uuid)
        server.power("start", 5)
        server.env.tick()
        assert server.state == w.RUNNING and server.env.stops == []  # under the limit: runs on
        (server.fs.root / "world.dat").write_bytes(
            b"\0" * (2 * 1024 * 1024)
        )  # the game writes past 1 MiB
        server.fs.recalculate()
        server.env.tick()
        if stops:
            wait_for(
                lambda: server.state == w.OFFLINE, 5, what="the server over its disk limit to stop"
            )
            assert server.env.stops == [60]
            assert any(
                "exceeding the assigned disk space limit" in line
                for line in server.console.tail(20)
            )
        else:
            time.sleep(
                0.2
            )  # nothing to wait for: give a wrongly started stop thread the chance to run
            assert server.state == w.RUNNING and server.env.stops == []

    @pytest.mark.docker  # the daemon asks the engine
    def test_sync_sets_the_btrfs_limit_at_once_and_disk_bytes_comes_from_the_quota(
        self, panel, make_daemon, btrfs_mount
    ):
        data = btrfs_mount / f"volumes-{uuidlib.uuid4().hex[:8]}"
        daemon = make_daemon(panel, system__data=str(data), wingslite__disk_quota="auto")
        _, _, info = api(daemon, "GET", "/api/system")
        assert info["wingslite"]["disk_quota"]["backend"] == "btrfs", info["wingslite"][
            "disk_quota"
        ]
        assert "subvolume" in info["wingslite"]["disk_quota"]["reason"]
        new = panel_document(build__disk_space=4)
        new_uuid = panel.add(new)
        assert (
            api(daemon, "POST", "/api/servers", {"uuid": new_uuid, "start_on_completion": False})[0]
            == 202
        )
        root = data / new_uuid
        wait_for(
            lambda: daemon.quota.enforced(root), 5, what="the server directory to be a subvolume"
        )
        assert (
            write_until_refused(root / "a")[1] == errno.EDQUOT
        )  # created with its limit already set

        new["settings"]["build"]["disk_space"] = 8
        assert api(daemon, "POST", f"/api/servers/{new_uuid}/sync")[0] == 204
        assert write_until_refused(root / "b")[1] == errno.EDQUOT
        _, _, view = api(daemon, "GET", f"/api/servers/{new_uuid}")
        assert any(
            "btrfs qgroup 0/" in n and "8388608 bytes" in n
            for n in view["wingslite"]["last_sync"]["applied"]
        )
        assert view["wingslite"]["disk"]["quota"] == "btrfs"

        new["settings"]["build"]["disk_space"] = (
            1  # below usage: accepted, reported, writes refused
        )
        assert api(daemon, "POST", f"/api/servers/{new_uuid}/sync")[0] == 204
        _, _, view = api(daemon, "GET", f"/api/servers/{new_uuid}")
        assert any("over the new limit" in n for n in view["wingslite"]["last_sync"]["applied"])
        assert write_until_refused(root / "c", 4096, 4) == (0, errno.EDQUOT)

        new["settings"]["build"]["disk_space"] = 0
        assert api(daemon, "POST", f"/api/servers/{new_uuid}/sync")[0] == 204
        assert write_until_refused(root / "d", most=12)[1] is None
        with open(
            root / "sparse", "wb"
        ) as fh:  # 1 GiB apparent, no blocks: the walk and the quota disagree
            fh.truncate(1 << 30)
        os.sync()
        disk_bytes = wait_for(
            lambda: (
                (
                    b := api(daemon, "GET", f"/api/servers/{new_uuid}")[2]["utilization"][
                        "disk_bytes"
                    ]
                )
                > 16 * 1024 * 1024
                and b
            ),
            5,
            what="disk_bytes to follow the qgroup",
        )
        assert (
            disk_bytes < 64 * 1024 * 1024
        )  # the qgroup's referenced bytes, not the 1 GiB a walk would count

    def test_an_existing_plain_directory_is_reported_as_soft_for_that_server(
        self, panel, make_daemon, btrfs_mount
    ):
        data = btrfs_mount / f"volumes-{uuidlib.uuid4().hex[:8]}"
        doc = panel_document(build__disk_space=4)
        uuid = panel.add(doc)
        (data / uuid).mkdir(parents=True)
        daemon = make_daemon(panel, system__data=str(data), wingslite__disk_quota="btrfs")
        assert daemon.quota.name == "btrfs"
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        _, _, view = api(daemon, "GET", f"/api/servers/{uuid}")
        assert any("soft for this server" in n for n in view["wingslite"]["last_sync"]["applied"])


# The game server itself writes 1 MiB files with dd, retrying a refused one every 0.1 s and printing
# the first refusal of each streak.
DD_WRITER = (
    "echo ready; n=0; b=0; while [ $n -lt 40 ]; do "
    "if dd if=/dev/zero of=f$n bs=1M count=1 2>/tmp/e; then n=$((n+1)); b=0; echo wrote $n; "
    "else [ $b = 0 ] && echo refused $n: $(cat /tmp/e); b=1; sleep 0.1; fi; done; echo finished; "
    "sleep 600"
)


@pytest.mark.docker
class TestQuotaContainer:
    def test_a_container_writing_with_dd_stops_at_the_limit_and_follows_every_sync(
        self, docker_servers, btrfs_mount
    ):
        mib = 1024 * 1024
        data = btrfs_mount / f"volumes-{uuidlib.uuid4().hex[:8]}"
        uuid = docker_servers.add(startup=DD_WRITER)
        doc = docker_servers.panel.servers[uuid]
        doc["settings"]["build"]["disk_space"] = 4
        daemon = docker_servers.boot(system__data=str(data), wingslite__disk_quota="auto")
        assert daemon.quota.name == "btrfs", daemon.quota.reason
        docker_servers.start(uuid)
        root = data / uuid

        def written() -> int:
            return sum(p.stat().st_size for p in root.glob("f*"))

        def sync(disk_mb: int) -> dict:
            doc["settings"]["build"]["disk_space"] = disk_mb
            assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
            return api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]

        assert "Disk quota exceeded" in docker_servers.wait_console(uuid, "refused")
        assert 2 * mib <= written() <= 4 * mib

        sync(12)  # raised: the same process carries on
        docker_servers.wait_console(uuid, "wrote 8")
        wait_for(
            lambda: sum("refused" in line for line in docker_servers.console(uuid)) >= 2,
            15,
            what="the second refusal",
        )
        assert 10 * mib <= written() <= 12 * mib

        record = sync(4)  # lowered below usage: accepted, reported, and nothing more is written
        assert any("over the new limit" in n for n in record["applied"]), record
        before = written()
        time.sleep(1)  # the writer retries every 0.1 s: ten chances to get a byte through
        assert written() == before and docker_servers.daemon.get_server(uuid).state == "running"

        sync(0)  # removed: it writes freely to the end
        docker_servers.wait_console(uuid, "finished", 20)
        assert written() == 40 * mib

    def test_soft_stops_a_container_that_writes_past_its_limit(self, docker_servers):
        uuid = docker_servers.add(
            startup=DD_WRITER, stop=("signal", "SIGKILL")
        )  # the writer reads no stop command
        docker_servers.panel.servers[uuid]["settings"]["build"]["disk_space"] = 2
        daemon = docker_servers.boot(system__disk_check_interval=1, wingslite__disk_quota="soft")
        docker_servers.start(uuid)
        docker_servers.wait_console(
            uuid, "exceeding the assigned disk space limit, stopping process now", 20
        )
        docker_servers.wait_state(uuid, "offline", 20)
        assert (
            daemon.get_server(uuid).fs.recalculate() > 2 * 1024 * 1024
        )  # nothing in the kernel stopped the writes


# archives #########################################################################################


def _tar_bytes(entries, compression: str = "") -> bytes:
    """A tar (``compression`` gz, bz2, xz or "") of ``(TarInfo fields, data)`` items."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w") as tar:
        for fields, data in entries:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _zip_bytes(entries) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buf.getvalue()


class TestArchives:
    @pytest.fixture
    def box(self, tmp_path):
        """A server directory, its jail and its filesystem, beside an 'outside' directory."""
        root = tmp_path / "srv"
        root.mkdir()
        (tmp_path / "outside").mkdir()
        fs = w.Filesystem(root, 0, check_interval_s=60)
        fs.recalculate()
        jail = w.Jail(root, is_denied=fs.is_denied)
        yield types.SimpleNamespace(root=root, fs=fs, jail=jail, outside=tmp_path / "outside")
        jail.close()

    def extract(self, box, data: bytes, name: str = "a.tar.gz", dest: str = "/") -> list[str]:
        import io

        seen: list[str] = []
        w.extract_archive(
            box.jail, box.fs, io.BytesIO(data), name=name, dest=dest, on_entry=seen.append
        )
        return seen

    def test_tar_gz_out_and_back_keeps_files_modes_links_and_empty_dirs(self, box, tmp_path):
        import io

        (box.root / "a" / "b").mkdir(parents=True)
        (box.root / "a" / "b" / "f.txt").write_bytes(b"hello" * 1000)
        (box.root / "run.sh").write_bytes(b"#!/bin/sh\n")
        os.chmod(box.root / "run.sh", 0o750)
        (box.root / "empty").mkdir()
        (box.root / "inside").symlink_to("a/b/f.txt")
        (box.root / "zout").symlink_to("/etc/passwd")  # archived as a link, never followed
        os.mkfifo(box.root / "pipe")
        out = w.HashingWriter(io.BytesIO())
        count = w.write_tar_gz(box.jail, out)
        data = out.out.getvalue()
        assert out.hexdigest() == hashlib.sha1(data).hexdigest() and out.bytes_written == len(data)
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = {m.name: m for m in tar.getmembers()}
        assert count == len(members)
        assert set(members) == {"a", "a/b", "a/b/f.txt", "run.sh", "empty", "inside", "zout"}
        assert members["zout"].issym() and members["zout"].linkname == "/etc/passwd"
        assert members["zout"].size == 0  # the target's bytes are not in the archive
        assert members["run.sh"].mode == 0o750

        other = tmp_path / "other"
        other.mkdir()
        fs2 = w.Filesystem(other, 0, check_interval_s=60)
        with w.Jail(other) as jail2:
            with pytest.raises(w.ArchiveError, match="would point outside"):
                w.extract_archive(jail2, fs2, io.BytesIO(data), name="x.tar.gz")
        assert (other / "a" / "b" / "f.txt").read_bytes() == b"hello" * 1000
        assert (other / "run.sh").stat().st_mode & 0o777 == 0o750
        assert (other / "empty").is_dir() and os.readlink(other / "inside") == "a/b/f.txt"
        assert not (other / "zout").is_symlink()

    def test_ignore_rules_follow_gitignore(self):
        m = w.IgnoreMatcher("# comment\n*.log\n!keep.log\n/cache/\nbuild\ndocs/**/*.tmp\n\\#hash\n")
        assert m.ignored("x.log") and m.ignored("deep/dir/y.log") and not m.ignored("keep.log")
        assert m.ignored("cache", is_dir=True) and not m.ignored("cache", is_dir=False)
        assert not m.ignored("sub/cache", is_dir=True)
        assert m.ignored("build") and m.ignored("a/build", is_dir=True)
        assert m.ignored("docs/a/b/c.tmp") and m.ignored("docs/c.tmp") and not m.ignored("c.tmp")
        assert m.ignored("#hash") and not w.IgnoreMatcher("")

    def test_write_tar_gz_leaves_out_ignored_and_denied_paths(self, box):
        import io
        import tarfile

        for rel in ("logs/a.log", "logs/keep.log", "world/level.dat", "x.log", "keep.log", "s.jar"):
            (box.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (box.root / rel).write_bytes(b"1")
        box.fs.set_denylist(["*.jar"])
        out = io.BytesIO()
        w.write_tar_gz(box.jail, out, ignore="*.log\n!keep.log\n")
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            names = set(tar.getnames())
        assert names == {"logs", "logs/keep.log", "world", "world/level.dat", "keep.log"}

    def test_write_tar_gz_of_named_files_under_a_root(self, box):
        import io
        import tarfile

        (box.root / "d" / "sub").mkdir(parents=True)
        (box.root / "d" / "one").write_bytes(b"1")
        (box.root / "d" / "sub" / "two").write_bytes(b"2")
        (box.root / "d" / "three").write_bytes(b"3")
        out = io.BytesIO()
        w.write_tar_gz(box.jail, out, root="/d", files=["one", "sub"])
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            assert set(tar.getnames()) == {"one", "sub", "sub/two"}
        with pytest.raises(w.PathEscape):
            w.write_tar_gz(box.jail, io.BytesIO(), root="/d", files=["../../etc"])

    @pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
    def test_each_tar_format_extracts(self, box, compression):
        data = _tar_bytes(
            [
                ({"name": "dir", "type": b"5", "mode": 0o700}, None),
                ({"name": "dir/f", "mode": 0o640}, b"payload"),
                ({"name": "l", "type": b"2", "linkname": "dir/f"}, None),
            ],
            compression,
        )
        seen = self.extract(box, data, name="a.tar" + (f".{compression}" if compression else ""))
        assert seen == ["dir", "dir/f", "l"]
        assert (box.root / "dir" / "f").read_bytes() == b"payload"
        assert (box.root / "dir" / "f").stat().st_mode & 0o777 == 0o640
        assert os.readlink(box.root / "l") == "dir/f"

    def test_zip_extracts_with_modes_and_directories(self, box):
        data = _zip_bytes(
            [("d/", b"", 0o40755), ("d/run.sh", b"#!", 0o100755), ("top.txt", b"t", 0)]
        )
        seen = self.extract(box, data, name="a.zip", dest="/into")
        assert seen == ["into/d", "into/d/run.sh", "into/top.txt"]
        assert (box.root / "into" / "d" / "run.sh").stat().st_mode & 0o777 == 0o755
        assert (box.root / "into" / "top.txt").read_bytes() == b"t"

    @pytest.mark.parametrize(
        "suffix,compress",
        [
            (".gz", lambda b: __import__("gzip").compress(b)),
            (".bz2", lambda b: __import__("bz2").compress(b)),
            (".xz", lambda b: __import__("lzma").compress(b)),
        ],
    )
    def test_a_single_compressed_file_becomes_its_name_without_the_suffix(
        self, box, suffix, compress
    ):
        seen = self.extract(
            box, compress(b"line\n" * 1000), name="logs/latest.log" + suffix, dest="/logs"
        )
        assert seen == ["logs/latest.log"]
        assert (box.root / "logs" / "latest.log").read_bytes() == b"line\n" * 1000

    @pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "C:\\evil"])
    def test_zip_slip_and_absolute_names_are_refused(self, box, name):
        for data, archive in (
            (_zip_bytes([(name, b"x", 0)]), "a.zip"),
            (_tar_bytes([({"name": name}, b"x")], "gz"), "a.tar.gz"),
        ):
            with pytest.raises(w.ArchiveError, match="refused archive entry"):
                self.extract(box, data, name=archive)
        assert not (box.outside.parent / "evil").exists() and list(box.root.iterdir()) == []

    def test_links_that_point_out_are_refused_and_nothing_is_written_through_them(self, box):
        for link in ("../outside", "/tmp", "a/../../outside"):
            data = _tar_bytes(
                [
                    ({"name": "l", "type": b"2", "linkname": link}, None),
                    ({"name": "l/pwned"}, b"x"),
                ],
                "gz",
            )
            with pytest.raises(w.ArchiveError, match="would point outside"):
                self.extract(box, data)
            assert list(box.outside.iterdir()) == [] and not (box.root / "l").is_symlink()
        # a hard link to a file outside: its name climbs out, refused
        data = _tar_bytes([({"name": "h", "type": b"1", "linkname": "../outside/x"}, None)])
        with pytest.raises(w.ArchiveError, match="refused archive entry"):
            self.extract(box, data, name="a.tar")

    def test_an_existing_symlink_in_the_server_is_replaced_not_written_through(self, box):
        (box.outside / "target").write_bytes(b"keep")
        (box.root / "f").symlink_to(box.outside / "target")  # the game server made this
        self.extract(box, _tar_bytes([({"name": "f"}, b"new")], "gz"))
        assert (box.outside / "target").read_bytes() == b"keep"
        assert not (box.root / "f").is_symlink() and (box.root / "f").read_bytes() == b"new"

    def test_device_files_and_fifos_are_skipped(self, box):
        data = _tar_bytes(
            [
                ({"name": "null", "type": b"3", "devmajor": 1, "devminor": 3}, None),
                ({"name": "fifo", "type": b"6"}, None),
                ({"name": "ok"}, b"1"),
            ]
        )
        assert self.extract(box, data, name="a.tar") == ["ok"]
        assert sorted(p.name for p in box.root.iterdir()) == ["ok"]

    def test_what_is_made_belongs_to_the_owner_given(self, box):
        import io

        data = _tar_bytes(
            [({"name": "d/f"}, b"1"), ({"name": "d/l", "type": b"2", "linkname": "f"}, None)]
        )
        w.extract_archive(box.jail, box.fs, io.BytesIO(data), name="a.tar", owner=(1234, 4321))
        for rel in ("d", "d/f", "d/l"):
            st = os.lstat(box.root / rel)
            assert (st.st_uid, st.st_gid) == (1234, 4321), rel

    def test_setuid_bits_are_dropped(self, box):
        self.extract(box, _tar_bytes([({"name": "s", "mode": 0o4755}, b"1")]), name="a.tar")
        assert (box.root / "s").stat().st_mode & 0o7777 == 0o755

    @pytest.mark.parametrize("kind", ["tar.gz", "zip", "gz"])
    def test_a_bomb_stops_at_the_disk_limit(self, box, kind):
        import gzip
        import io
        import zipfile

        box.fs.set_limit(3 * 1024 * 1024)
        big = bytes(20 * 1024 * 1024)  # compresses to ~20 KB
        if kind == "tar.gz":
            data = _tar_bytes([({"name": "small"}, b"x" * 1000), ({"name": "bomb"}, big)], "gz")
        elif kind == "gz":
            data = gzip.compress(big)
        else:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("bomb", big)
            data = buf.getvalue()
            # a zip that lies about its size is still stopped while it is written
            assert len(data) < 100_000
        with pytest.raises(w.ArchiveError, match="not enough disk space"):
            self.extract(box, data, name="bomb." + kind)
        assert not (box.root / "bomb").exists()  # the partial file is gone
        assert w.Filesystem(box.root).recalculate() <= 3 * 1024 * 1024
        assert box.fs.usage_bytes() == w.Filesystem(box.root).recalculate()

    def test_a_zip_whose_header_lies_about_the_size_is_stopped_while_writing(self, box):
        import zipfile

        box.fs.set_limit(1024 * 1024)
        data = bytearray(_zip_bytes([("bomb", bytes(5 * 1024 * 1024), 0)]))
        # patch the declared size (central directory and local header) down to 10 bytes
        cd = data.rindex(b"PK\x01\x02")
        struct_pos = cd + 24
        data[struct_pos : struct_pos + 4] = (10).to_bytes(4, "little")
        data[22:26] = (10).to_bytes(4, "little")
        with pytest.raises(w.ArchiveError):
            self.extract(box, bytes(data), name="a.zip")
        assert w.Filesystem(box.root).recalculate() <= 1024 * 1024
        del zipfile

    @pytest.mark.parametrize(
        "head",
        [b"7z\xbc\xaf\x27\x1c" + bytes(100), b"Rar!\x1a\x07\x00" + bytes(100), b"plain text"],
    )
    def test_7z_rar_and_unknown_data_are_unsupported(self, box, head):
        with pytest.raises(w.ArchiveError, match="unsupported archive format"):
            self.extract(box, head, name="a.7z")
        assert list(box.root.iterdir()) == []

    def test_a_damaged_archive_is_a_clear_error(self, box):
        data = _tar_bytes([({"name": "f"}, bytes(100_000))], "gz")
        with pytest.raises(w.ArchiveError, match=r"damaged|cannot extract"):
            self.extract(box, data[: len(data) // 2])

    def test_extraction_from_a_file_in_the_jail_and_the_denylist(self, box):
        (box.root / "up.zip").write_bytes(_zip_bytes([("ok.txt", b"1", 0), ("x.jar", b"2", 0)]))
        box.fs.set_denylist(["*.jar"])
        fd = box.jail.open("/up.zip", os.O_RDONLY)
        with (
            os.fdopen(fd, "rb") as src,
            pytest.raises(w.ArchiveError, match=r"refused archive entry 'x\.jar'"),
        ):
            w.extract_archive(box.jail, box.fs, src, name="up.zip")
        assert (box.root / "ok.txt").read_bytes() == b"1" and not (box.root / "x.jar").exists()


# egg configuration files ##########################################################################


PAPER_PROPERTIES = """#Minecraft server properties
#Tue Dec 01 17:00:00 UTC 2026
enable-jmx-monitoring=false
rcon.port=25575
level-seed=
motd=\\u00A7aA Minecraft Server
query.port=25565
server-ip=
# an operator's note in the middle
server-port=25565
max-players=20
"""

BUNGEE_YAML = """# BungeeCord configuration
player_limit: -1
listeners:
- query_port: 25577
  motd: '&1Another Bungee server'
  host: 0.0.0.0:25577   # where players connect
  max_players: 1
servers:
  lobby:
    motd: '&1Just another BungeeCord - Forced Host'
    address: localhost:25565
    restricted: false
  games:
    address: 10.0.0.5:25566
    restricted: false
"""

MURMUR_INI = """; Murmur configuration file.
;
; Path to database.
database=
;dbDriver=QMYSQL

; How many clients
users=100
port=64738
welcometext="<br />Welcome to this server"

[Ice]
Ice.Warn.UnknownProperties=1
Ice.MessageSizeMax=65536
"""

GAME_XML = """<?xml version="1.0" encoding="utf-8"?>
<!-- game settings -->
<Settings>
  <Server port="1">
    <Name>Old</Name>
    <!-- keep me -->
  </Server>
  <Maps>
    <Map>a</Map>
    <Map>b</Map>
  </Maps>
</Settings>
"""

GAME_JSON = """{
  "server": {"port": 1234, "bind": "127.0.0.1", "public": false},
  "worlds": [{"name": "a", "port": 1}, {"name": "b", "port": 2}],
  "tags": ["x"]
}
"""


def egg_replace(find: dict) -> list[dict]:
    """An egg's ``config.files[...].find`` as the Panel sends it (EggConfigurationService):
    a scalar gives ``{match, replace_with}``, an object one ``{match, if_value, replace_with}``
    per inner pair."""
    out = []
    for match, value in find.items():
        if isinstance(value, dict):
            out += [{"match": match, "if_value": k, "replace_with": v} for k, v in value.items()]
        else:
            out.append({"match": match, "replace_with": value})
    return out


def replacements(find: dict) -> list[w.Replacement]:
    return [
        w.Replacement(r["match"], r["replace_with"], r.get("if_value")) for r in egg_replace(find)
    ]


class TestConfigFileParsers:
    """Each parser against a realistic file of a real egg: exact bytes after the rewrite."""

    def test_paper_server_properties_keeps_comments_and_order_and_appends_missing_keys(self):
        find = {
            "server-ip": "0.0.0.0",
            "enable-query": "true",
            "server-port": "25570",
            "query.port": "25570",
        }
        out = w.rewrite_properties(PAPER_PROPERTIES, replacements(find))
        assert (
            out
            == PAPER_PROPERTIES.replace("query.port=25565", "query.port=25570")
            .replace("server-ip=\n", "server-ip=0.0.0.0\n")
            .replace("server-port=25565", "server-port=25570")
            + "enable-query=true\n"
        )

    def test_properties_values_are_escaped_as_java_writes_them(self):
        out = w.rewrite_properties("motd=x\n", replacements({"motd": "§bHi: a=b #1"}))
        assert out == "motd=\\u00A7bHi\\: a\\=b \\#1\n"

    def test_properties_if_value_changes_only_a_matching_value(self):
        text = "server-ip=127.0.0.1\nother=1\n"
        find = {"server-ip": {"127.0.0.1": "0.0.0.0"}, "other": {"2": "3"}, "absent": {"x": "y"}}
        assert w.rewrite_properties(text, replacements(find)) == "server-ip=0.0.0.0\nother=1\n"

    def test_bungeecord_yaml_is_edited_in_place_with_comments_kept(self):
        find = {
            "listeners[0].query_port": "25599",
            "listeners[0].host": "0.0.0.0:25599",
            "servers.*.address": {
                "regex:^(127\\.0\\.0\\.1|localhost)(:\\d{1,5})?$": "172.18.0.1$2"
            },
        }
        out = w.rewrite_yaml(BUNGEE_YAML, replacements(find))
        assert out == (
            BUNGEE_YAML.replace("query_port: 25577", "query_port: 25599")
            .replace("host: 0.0.0.0:25577", "host: 0.0.0.0:25599")
            .replace("address: localhost:25565", "address: 172.18.0.1:25565")
        )
        assert yaml.safe_load(out)["listeners"][0]["query_port"] == 25599  # still a number

    def test_yaml_that_needs_a_new_key_is_dumped_with_the_values_and_their_types(self):
        out = w.rewrite_yaml("a: 1\n", replacements({"b.c": "7", "d": True, "e": "x"}))
        assert yaml.safe_load(out) == {"a": 1, "b": {"c": 7}, "d": True, "e": "x"}

    def test_mumble_murmur_ini_sets_keys_before_the_first_section(self):
        find = {
            "database": "/home/container/murmur.sqlite",
            "logfile": "/home/container/murmur.log",
            "port": "64800",
            "host": "",
            "users": "50",
        }
        out = w.rewrite_ini(MURMUR_INI, replacements(find))
        assert out == (
            MURMUR_INI.replace("database=\n", "database=/home/container/murmur.sqlite\n")
            .replace("users=100", "users=50")
            .replace("port=64738", "port=64800")
            .replace(
                'server"\n',
                'server"\nlogfile=/home/container/murmur.log\nhost=\n',
            )
        )

    def test_ini_section_keys_and_a_new_section(self):
        text = "[Ice]\nIce.MessageSizeMax=65536 \n"
        find = {"Ice.Ice.MessageSizeMax": "1024", "Extra.key": "v"}
        out = w.rewrite_ini(text, replacements(find))
        assert out == "[Ice]\nIce.MessageSizeMax=1024\n[Extra]\nkey=v\n"

    def test_source_cfg_with_the_file_parser_replaces_whole_lines_and_keeps_crlf(self):
        text = '// server.cfg\r\nhostname "Old Name"\r\nrcon_password "secret"\r\nsv_password "x"'
        find = {"hostname": 'hostname "My Server"', "sv_password": 'sv_password ""'}
        out = w.rewrite_plain_file(text, replacements(find))
        assert (
            out
            == '// server.cfg\r\nhostname "My Server"\r\nrcon_password "secret"\r\nsv_password ""'
        )

    def test_json_paths_indexes_wildcards_and_types(self):
        find = {
            "server.port": "27015",
            "server.bind": {"127.0.0.1": "0.0.0.0"},
            "server.public": True,
            "worlds.*.host": "172.18.0.1",
            "worlds[1].port": "27016",
            "motd": "25",
            "admins[0]": "alice",
            "tags[0]": "y",
        }
        data = json.loads(w.rewrite_json(GAME_JSON, replacements(find)))
        assert data == {
            "server": {"port": 27015, "bind": "0.0.0.0", "public": True},
            "worlds": [
                {"name": "a", "port": 1, "host": "172.18.0.1"},
                {"name": "b", "port": 27016, "host": "172.18.0.1"},
            ],
            "tags": ["y"],
            "motd": 25,
            "admins": ["alice"],
        }

    def test_json_keeps_the_files_indent_and_leaves_an_unchanged_file_alone(self):
        out = w.rewrite_json('{\n  "a": "x"\n}\n', replacements({"a": "y"}))
        assert out == '{\n  "a": "y"\n}\n'
        same = '{"a":   "x"}'
        assert w.rewrite_json(same, replacements({"a": "x"})) is same

    def test_xml_elements_attributes_and_wildcards_keep_comments_and_prolog(self):
        find = {"Settings.Server.Name": "New", "Settings.Server": "[port='27016']"}
        find2 = {"Settings.Maps.*": "c"}
        out = w.rewrite_xml(GAME_XML, replacements(find) + replacements(find2))
        assert out == (
            GAME_XML.replace('port="1"', 'port="27016"')
            .replace(">Old<", ">New<")
            .replace(">a<", ">c<")
            .replace(">b<", ">c<")
        )

    def test_xml_creates_missing_elements(self):
        out = w.rewrite_xml(GAME_XML, replacements({"Settings.Server.Query.Port": "27017"}))
        assert "<Query>\n      <Port>27017</Port>\n    </Query>" in out
        assert "<!-- keep me -->" in out and out.startswith('<?xml version="1.0"')

    def test_node_placeholders_come_from_the_node_config(self, tmp_path):
        config = w.Config(node_config(tmp_path, "http://127.0.0.1:1"))
        ph = w.NodePlaceholders(config)
        assert ph.fill("{{config.docker.network.interface}}:1") == "172.18.0.1:1"
        assert ph.fill("{{config.docker.interface}}") == "172.18.0.1"  # legacy spelling
        assert ph.fill("{{ config.api.port }}") == str(config.get("api.port"))
        assert ph.fill("{{config.no.such.key}}") == "{{config.no.such.key}}"
        assert ph.fill(25565) == 25565


def _write_config_doc(doc: dict, configs: list[dict]) -> dict:
    doc["process_configuration"]["configs"] = configs
    return doc


NC_GAME = (
    "P=$(grep '^server-port=' server.properties | cut -d= -f2); "
    'echo "listening on $P"; echo ready; while :; do nc -l -p "$P"; done'
)


class TestConfigFilesOnStart:
    """Config files written by a real start of a real container."""

    def _add(self, docker_servers, configs, **options) -> str:
        doc = _write_config_doc(docker_document(**options), configs)
        uuid = docker_servers.panel.add(doc)
        docker_servers.uuids.append(uuid)
        return uuid

    @pytest.mark.docker
    def test_an_allocation_change_reaches_the_game_through_server_properties(self, docker_servers):
        port = free_port()
        props = [{"parser": "properties", "file": "server.properties", "replace": []}]
        uuid = self._add(
            docker_servers, props, startup=NC_GAME, port=port, stop=("signal", "SIGKILL")
        )
        doc = docker_servers.panel.servers[uuid]

        def egg_values(p: int) -> None:
            doc["process_configuration"]["configs"][0]["replace"] = egg_replace(
                {"server-ip": "0.0.0.0", "server-port": str(p), "query.port": str(p)}
            )

        egg_values(port)
        daemon = docker_servers.boot()
        root = daemon.get_server(uuid).fs.root
        root.mkdir(parents=True, exist_ok=True)
        (root / "server.properties").write_text(PAPER_PROPERTIES)
        docker_servers.start(uuid)
        docker_servers.wait_console(uuid, f"listening on {port}")
        console = docker_servers.console(uuid)
        assert any("Updating process configuration files..." in line for line in console)

        new_port = free_port()
        doc["settings"]["allocations"] = {
            "force_outgoing_ip": False,
            "default": {"ip": "127.0.0.1", "port": new_port},
            "mappings": {"127.0.0.1": [new_port]},
        }
        egg_values(new_port)
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "restart"})[0] == 202
        docker_servers.wait_console(uuid, f"listening on {new_port}", timeout_s=30)
        assert (root / "server.properties").read_text() == (
            PAPER_PROPERTIES.replace("query.port=25565", f"query.port={new_port}")
            .replace("server-ip=\n", "server-ip=0.0.0.0\n")
            .replace("server-port=25565", f"server-port={new_port}")
        )

        # the game really listens on the new port, reached through the new port binding
        def sent() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", new_port), timeout=2) as conn,
            ):
                conn.sendall(b"hello-new-port\n")
                time.sleep(0.2)
            return any("hello-new-port" in line for line in docker_servers.console(uuid))

        wait_for(sent, 20, what="the game to receive data on its new port", interval_s=0.5)
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "kill"})[0] == 202
        docker_servers.wait_state(uuid, "offline")

    @pytest.mark.docker
    def test_a_symlink_out_and_a_fifo_are_not_touched_and_the_start_goes_on(
        self, docker_servers, tmp_path
    ):
        outside = tmp_path / "outside.properties"
        outside.write_text("server-port=1\n")
        configs = [
            {
                "parser": "properties",
                "file": "link.properties",
                "replace": egg_replace({"server-port": "2"}),
            },
            {"parser": "yaml", "file": "fifo.yml", "replace": egg_replace({"a": "b"})},
            {"parser": "json", "file": "nested/dir/new.json", "replace": egg_replace({"a.b": "3"})},
        ]
        uuid = self._add(docker_servers, configs)
        daemon = docker_servers.boot()
        root = daemon.get_server(uuid).fs.root
        root.mkdir(parents=True, exist_ok=True)
        (root / "link.properties").symlink_to(outside)
        os.mkfifo(root / "fifo.yml")
        docker_servers.start(uuid)
        assert outside.read_text() == "server-port=1\n"
        assert (root / "link.properties").is_symlink()
        assert stat.S_ISFIFO(os.lstat(root / "fifo.yml").st_mode)
        assert json.loads((root / "nested/dir/new.json").read_text()) == {"a": {"b": 3}}
        owner = daemon.file_owner  # the node user: files the start creates belong to it
        assert owner is not None
        for made in ("nested", "nested/dir", "nested/dir/new.json"):
            st = os.stat(root / made)
            assert (st.st_uid, st.st_gid) == owner, made
        console = "\n".join(docker_servers.console(uuid))
        assert "Failed to update configuration file link.properties" in console
        assert "Failed to update configuration file fifo.yml: it is not a regular file" in console

    def test_a_rewritten_file_removed_gives_back_what_it_cost(self, tmp_path):
        root = tmp_path / "srv"
        root.mkdir()
        (root / "s.properties").write_text("a=1\n")
        fs = w.Filesystem(root, limit_bytes=1 << 20, check_interval_s=3600)
        fs.recheck_after_unknown_s = 3600  # no walks from here on
        assert fs.recalculate() == 4
        configs = [w.ConfigFile("s.properties", "properties", (w.Replacement("a", "x" * 999),))]
        config = w.Config(node_config(tmp_path, "http://127.0.0.1:1"))
        with w.Jail(root) as jail:
            writer = w.ConfigFileWriter(jail, w.NodePlaceholders(config), fs)
            assert writer.apply(configs, print) == []
            size = (root / "s.properties").stat().st_size
            assert fs.usage_bytes() == size > 999
            fs.remove(jail, "s.properties")
        assert fs.usage_bytes() == 0
        assert list(root.iterdir()) == []  # no temp file left

    def test_a_rewrite_that_would_pass_the_disk_limit_is_refused(self, tmp_path):
        root = tmp_path / "srv"
        root.mkdir()
        (root / "big.properties").write_text("a=1\n")
        fs = w.Filesystem(root, limit_bytes=4096)
        fs.recalculate()
        configs = [w.ConfigFile("big.properties", "properties", (w.Replacement("a", "x" * 8192),))]
        said: list[str] = []
        config = w.Config(node_config(tmp_path, "http://127.0.0.1:1"))
        with w.Jail(root) as jail:
            writer = w.ConfigFileWriter(jail, w.NodePlaceholders(config), fs)
            assert writer.apply(configs, said.append) == ["big.properties"]
        assert said == [
            "Failed to update configuration file big.properties: there is not enough disk space"
        ]
        assert (root / "big.properties").read_text() == "a=1\n"
        assert [p.name for p in root.iterdir()] == ["big.properties"]  # no temp file left


# environments: Docker #############################################################################


TEST_IMAGE = os.environ.get("WINGSLITE_TEST_IMAGE", "wingslite-test:latest")
# A console program for the test image: prints "ready" (the done line), then runs each stdin line
# as a shell command ("echo $X", "exit 3"); a stop command "quit" ends it cleanly.
CONSOLE_STARTUP = (
    'echo "booting $GREETING"; echo ready; '
    'while read -r line; do [ "$line" = quit ] && exit 0; eval "$line"; done'
)


def docker_document(
    uuid: str | None = None,
    *,
    startup: str = CONSOLE_STARTUP,
    memory_mb: int = 64,
    cpu: int = 0,
    threads=None,
    swap: int = 0,
    env=None,
    stop=("command", "quit"),
    image: str = TEST_IMAGE,
    port: int | None = None,
    mounts=(),
) -> dict:
    """A Panel document for a server that really runs in the test image (``wingslite-test``)."""
    doc = panel_document(uuid)
    s = doc["settings"]
    port = port or free_port()
    s["environment"] = {"GREETING": "hello", **(env or {})}
    s["invocation"] = startup
    s["build"].update(
        memory_limit=memory_mb, swap=swap, cpu_limit=cpu, threads=threads, disk_space=0
    )
    s["container"]["image"] = image
    s["allocations"] = {
        "force_outgoing_ip": False,
        "default": {"ip": "127.0.0.1", "port": port},
        "mappings": {"127.0.0.1": [port]},
    }
    s["mounts"] = list(mounts)
    doc["process_configuration"] = {
        "startup": {"done": ["ready"], "user_interaction": [], "strip_ansi": False},
        "stop": {"type": stop[0], "value": stop[1]},
        "configs": [],
    }
    return doc


@pytest.fixture(scope="session")
def docker_engine():
    """The real Docker engine (``.ci/run`` starts it and builds ``wingslite-test``)."""
    docker = pytest.importorskip("docker")
    client = docker.APIClient(version="1.41")
    try:
        client.inspect_image(TEST_IMAGE)
    except Exception as exc:
        pytest.fail(
            f"Docker engine or the test image {TEST_IMAGE} is not available ({exc}); run .ci/run "
            "or .ci/test-env.sh"
        )
    return client


class DockerServers:
    """Servers running in real containers under one daemon: ``add()`` then ``start()``.

    Every container it created is removed at teardown.
    """

    def __init__(self, engine, panel: FakePanel, make_daemon: DaemonFactory):
        self.engine, self.panel, self.make_daemon = engine, panel, make_daemon
        self.uuids: list[str] = []
        self.daemon: w.Daemon | None = None

    def add(self, **document_options) -> str:
        uuid = self.panel.add(docker_document(**document_options))
        self.uuids.append(uuid)
        return uuid

    def boot(self, **config_overrides) -> w.Daemon:
        self.daemon = self.make_daemon(self.panel, **config_overrides)
        return self.daemon

    def start(self, uuid: str, timeout_s: float = 20) -> w.Server:
        assert api(self.daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        server = self.wait_state(uuid, "running", timeout_s)
        wait_for(
            lambda: self.power_idle(server), timeout_s, what="the start to finish"
        )  # the next power action gets the lock
        return server

    @staticmethod
    def power_idle(server: w.Server) -> bool:
        if not server.lock.acquire(blocking=False):
            return False
        server.lock.release()
        return True

    def wait_state(self, uuid: str, state: str, timeout_s: float = 20) -> w.Server:
        server = self.daemon.get_server(uuid)
        wait_for(
            lambda: server.state == state,
            timeout_s,
            what=f"server {uuid[:8]} to be {state} (is {server.state})",
        )
        return server

    def inspect(self, uuid: str) -> dict:
        return self.engine.inspect_container(uuid)

    def container_id(self, uuid: str) -> str | None:
        """The id of the server's container, or None while there is none (being re-created)."""
        with contextlib.suppress(Exception):
            return self.engine.inspect_container(uuid)["Id"]
        return None

    def console(self, uuid: str) -> list[str]:
        return self.daemon.get_server(uuid).console.tail(1000)

    def wait_console(self, uuid: str, text: str, timeout_s: float = 15) -> str:
        return wait_for(
            lambda: next((line for line in self.console(uuid) if text in line), None),
            timeout_s,
            what=f"{text!r} on the console of {uuid[:8]}",
        )

    def cleanup(self) -> None:
        for uuid in self.uuids:
            with contextlib.suppress(Exception):
                self.engine.remove_container(uuid, force=True)


@pytest.fixture
def docker_servers(docker_engine, panel, make_daemon, request):
    assert request.node.get_closest_marker("docker"), (
        f"{request.node.name} uses the Docker engine: mark it @pytest.mark.docker, so that "
        "pytest -m 'not docker' leaves it out on a machine without one"
    )
    servers = DockerServers(docker_engine, panel, make_daemon)
    yield servers
    servers.make_daemon.stop_all()
    servers.cleanup()


@pytest.fixture
def docker_daemon(docker_servers):
    """A daemon with one server running in a real container (console: each stdin line is run by sh).

    Yields the ``DockerServers`` harness with ``.daemon`` and ``.uuid`` set.
    """
    uuid = docker_servers.add()
    docker_servers.boot()
    docker_servers.start(uuid)
    docker_servers.uuid = uuid
    return docker_servers


def cgroup_file(controller: str, container_id: str, name: str) -> str:
    return Path(f"/sys/fs/cgroup/{controller}/docker/{container_id}/{name}").read_text().strip()


class TestCgroups:
    def make_v2(self, tmp_path: Path, rel: str) -> Path:
        root = tmp_path / "cgroup2"
        (root / rel).mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (root / rel).parent.joinpath("cpuset.cpus.effective").write_text("0-3\n")
        files = {
            "memory.max": "104857600",
            "memory.swap.max": "0",
            "memory.low": "52428800",
            "cpu.max": "50000 100000",
            "cpuset.cpus": "1",
            "pids.max": "512",
        }
        for name, value in files.items():
            (root / rel / name).write_text(value + "\n")
        return root

    def test_v2_systemd_layout_is_found_read_and_lifted(self, tmp_path):
        cid = "c" * 64
        root = self.make_v2(tmp_path, f"system.slice/docker-{cid}.scope")
        cgroup = w.Cgroup.locate(root, cid, driver="systemd")
        assert cgroup.version == 2
        k = cgroup.read()
        assert (
            k.memory_bytes,
            k.swap_bytes,
            k.cpu_quota_us,
            k.cpu_period_us,
            k.cpuset,
            k.all_cpus,
            k.pids,
        ) == (
            104857600,
            0,
            50000,
            100000,
            "1",
            "0-3",
            512,
        )
        cgroup.lift_memory_limit()
        cgroup.lift_cpu_quota()
        cgroup.lift_cpuset()
        k = cgroup.read()
        assert (k.memory_bytes, k.swap_bytes, k.cpu_quota_us, k.cpuset) == (None, None, None, "")
        d = root / f"system.slice/docker-{cid}.scope"
        assert (d / "memory.max").read_text() == "max" and (d / "memory.low").read_text() == "0"

    def test_v2_cgroupfs_layout_and_nested_systemd_slices(self, tmp_path):
        cid = "d" * 64
        root = self.make_v2(tmp_path, f"docker/{cid}")
        assert w.Cgroup.locate(root, cid).dirs["memory"] == root / "docker" / cid
        assert (
            w._container_cgroup_relpath(cid, "systemd", "games-minecraft.slice")
            == f"games.slice/games-minecraft.slice/docker-{cid}.scope"
        )
        assert w._container_cgroup_relpath(cid, "cgroupfs", "/games/") == f"games/{cid}"

    def test_a_missing_cgroup_names_where_it_was_looked_for(self, tmp_path):
        root = self.make_v2(tmp_path, "docker/other")
        with pytest.raises(w.WingsliteError, match="cgroup v2, cgroupfs driver"):
            w.Cgroup.locate(root, "e" * 64)

    def test_v1_cgroup_of_a_process_is_written_directly(self, tmp_path):
        # A real v1 hierarchy, no Docker: a group of our own holding a sleeping process.
        group = f"wingslite-test-{os.getpid()}"
        dirs = {
            c: Path("/sys/fs/cgroup") / c / "wingslite-tests" / group
            for c in w.Cgroup.V1_CONTROLLERS
        }
        if not Path("/sys/fs/cgroup/memory").is_dir():
            pytest.skip("no cgroup v1 memory hierarchy on this machine")
        proc = subprocess.Popen(["sleep", "60"])
        try:
            for c, d in dirs.items():
                d.mkdir(parents=True, exist_ok=True)
                if c == "cpuset":
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        for p in (d.parent, d):
                            (p / f).write_text((p.parent / f).read_text())
                (d / "cgroup.procs").write_text(str(proc.pid))
            (dirs["memory"] / "memory.limit_in_bytes").write_text("100000000")
            (dirs["cpu"] / "cpu.cfs_quota_us").write_text("50000")
            (dirs["cpuset"] / "cpuset.cpus").write_text("0")
            cgroup = w.Cgroup.locate("/sys/fs/cgroup", group, parent="/wingslite-tests")
            k = cgroup.read()
            assert (k.memory_bytes, k.cpu_quota_us, k.cpuset) == (99999744, 50000, "0")
            cgroup.lift_memory_limit()
            cgroup.lift_cpu_quota()
            cgroup.lift_cpuset()
            k = cgroup.read()
            assert (k.memory_bytes, k.swap_bytes, k.cpu_quota_us) == (None, None, None)
            assert w._cpu_set(k.cpuset) == w._cpu_set(k.all_cpus)
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
            for d in dirs.values():
                wait_for(
                    lambda d=d: not (d / "cgroup.procs").read_text().strip(),
                    5,
                    what="the cgroup to empty",
                )
                d.rmdir()
                with contextlib.suppress(OSError):
                    d.parent.rmdir()


@pytest.mark.docker
class TestDockerEnvironment:
    def test_container_is_created_as_wings_creates_it(self, docker_servers, tmp_path):
        allowed = tmp_path / "srv" / "data"
        sibling = tmp_path / "srv" / "database"
        (allowed / "maps").mkdir(parents=True)
        (allowed / "worlds").mkdir()
        sibling.mkdir(parents=True)
        (allowed / "escape").symlink_to(sibling)
        mounts = [
            {"source": str(allowed / "maps"), "target": "/maps", "read_only": True},
            {
                "source": str(allowed / "worlds"),
                "target": "/home/container/worlds",
                "read_only": True,
            },  # as the Panel's example
            {
                "source": str(sibling),
                "target": "/db",
                "read_only": False,
            },  # a string prefix match only
            {
                "source": str(allowed / "escape"),
                "target": "/esc",
                "read_only": False,
            },  # symlink out
        ]
        uuid = docker_servers.add(
            env={"P_SERVER_ALLOCATION_LIMIT": 0}, mounts=mounts, cpu=50, threads="0"
        )
        daemon = docker_servers.boot(allowed_mounts=[str(allowed)], docker__container_pid_limit=256)
        docker_servers.start(uuid)
        info = docker_servers.inspect(uuid)
        hc, cfg = info["HostConfig"], info["Config"]
        port = docker_servers.panel.servers[uuid]["settings"]["allocations"]["default"]["port"]
        assert info["Name"] == f"/{uuid}" and cfg["Hostname"] == uuid
        assert cfg["Env"][:5] == [
            "TZ=" + w._timezone(daemon.config),
            f"STARTUP={CONSOLE_STARTUP}",
            "SERVER_MEMORY=64",
            "SERVER_IP=127.0.0.1",
            f"SERVER_PORT={port}",
        ]
        assert "P_SERVER_ALLOCATION_LIMIT=0" in cfg["Env"]
        assert cfg["Tty"] and cfg["OpenStdin"] and cfg["StdinOnce"] is False
        assert (
            cfg["Labels"]["Service"] == "Pterodactyl"
            and cfg["Labels"]["ContainerType"] == "server_process"
        )
        assert hc["PortBindings"] == {
            f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}],
            f"{port}/udp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}],
        }
        assert hc["Tmpfs"] == {"/tmp": "rw,exec,nosuid,size=100M"}
        assert hc["ReadonlyRootfs"] and hc["SecurityOpt"] == ["no-new-privileges"]
        assert sorted(c.lower() for c in hc["CapDrop"]) == sorted(w._CAP_DROP)
        assert (
            hc["PidsLimit"] == 256
            and hc["Memory"] == w.memory_limit_bytes(64)
            and hc["CpuQuota"] == 50_000
            and hc["CpusetCpus"] == "0"
        )
        binds = {m["Target"]: (m["Source"], m.get("ReadOnly", False)) for m in hc["Mounts"]}
        assert binds == {
            "/home/container": (str(daemon.config.data_dir / uuid), False),
            "/maps": (str(allowed / "maps"), True),
            "/home/container/worlds": (str(allowed / "worlds"), True),
        }
        # The server directory is the process's working directory.
        api(daemon, "POST", f"/api/servers/{uuid}/commands", {"commands": ["pwd > where.txt"]})
        wait_for(
            lambda: (daemon.config.data_dir / uuid / "where.txt").exists(), 10, what="where.txt"
        )
        assert (
            daemon.config.data_dir / uuid / "where.txt"
        ).read_text().strip() == "/home/container"

    def test_a_container_exiting_during_the_limit_update_makes_them_pending_not_failed(
        self, docker_servers, monkeypatch
    ):
        uuid = docker_servers.add(memory_mb=64, cpu=50)
        docker_servers.boot()
        env = docker_servers.start(uuid).env
        cgroup_lookups = []

        def cgroup_gone(info=None):
            cgroup_lookups.append(info)
            raise w.WingsliteError("the cgroup of this container is gone")

        monkeypatch.setattr(env, "cgroup", cgroup_gone)
        config = docker_servers.daemon.get_server(uuid).config
        running = env._inspect
        monkeypatch.setattr(
            env, "_inspect", lambda: {**running(), "State": {"Running": False}}
        )  # it exited meanwhile
        report = env.apply_limits(config)
        assert (
            cgroup_lookups
            and report.failed == []
            and any("next start" in p for p in report.pending)
        ), report
        monkeypatch.setattr(
            env, "_inspect", running
        )  # still running: a missing cgroup is a real failure
        report = env.apply_limits(config)
        assert report.failed == ["cgroup: the cgroup of this container is gone"], report

    def test_sync_changes_limits_on_the_running_process_and_lifts_them(self, docker_servers):
        uuid = docker_servers.add(memory_mb=64, cpu=50, threads="0")
        daemon = docker_servers.boot()
        docker_servers.start(uuid)
        assert any(line == "ready" for line in docker_servers.console(uuid))
        before = docker_servers.inspect(uuid)
        cid, pid = before["Id"], before["State"]["Pid"]

        docker_servers.panel.servers[uuid]["settings"]["build"].update(
            memory_limit=128, cpu_limit=150, threads="1", swap=64
        )
        started = time.monotonic()
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        sync_ms = (time.monotonic() - started) * 1000
        after = docker_servers.inspect(uuid)
        assert (after["Id"], after["State"]["Pid"]) == (cid, pid)
        assert (
            after["HostConfig"]["Memory"] == w.memory_limit_bytes(128)
            and after["HostConfig"]["CpuQuota"] == 150_000
            and after["HostConfig"]["CpusetCpus"] == "1"
        )
        assert (
            int(cgroup_file("memory", cid, "memory.limit_in_bytes")) // 4096
            == w.memory_limit_bytes(128) // 4096
        )
        assert (
            int(cgroup_file("memory", cid, "memory.memsw.limit_in_bytes")) // 4096
            == (w.memory_limit_bytes(128) + 64_000_000) // 4096
        )
        assert (
            cgroup_file("cpu", cid, "cpu.cfs_quota_us") == "150000"
            and cgroup_file("cpuset", cid, "cpuset.cpus") == "1"
        )
        assert cgroup_file("pids", cid, "pids.max") == "512"

        docker_servers.panel.servers[uuid]["settings"]["build"].update(
            memory_limit=0, cpu_limit=0, threads=None, swap=-1
        )
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        unlimited = str(9223372036854771712)
        assert cgroup_file("memory", cid, "memory.limit_in_bytes") == unlimited
        assert cgroup_file("memory", cid, "memory.memsw.limit_in_bytes") == unlimited
        assert cgroup_file("cpu", cid, "cpu.cfs_quota_us") == "-1"
        assert (
            cgroup_file("cpuset", cid, "cpuset.cpus")
            == Path("/sys/fs/cgroup/cpuset/docker/cpuset.cpus").read_text().strip()
        )
        after = docker_servers.inspect(uuid)
        assert (after["Id"], after["State"]["Pid"], after["State"]["Running"]) == (cid, pid, True)
        record = api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]
        assert (
            record["failed"] == []
            and "memory unlimited" in record["applied"]
            and "cpu quota unlimited" in record["applied"]
        )
        assert sync_ms < 1000, f"a sync with live limits took {sync_ms:.0f} ms"

    def test_sync_lifts_limits_in_a_cgroup_v2_layout(self, docker_servers, tmp_path):
        # This node is cgroup v1; the v2 writers run against a directory laid out like v2.
        uuid = docker_servers.add(memory_mb=64, cpu=50, threads="0")
        root = tmp_path / "cgroup2"
        daemon = docker_servers.boot(wingslite__cgroup_root=str(root))
        docker_servers.start(uuid)
        cid = docker_servers.inspect(uuid)["Id"]
        d = root / "docker" / cid
        d.mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (root / "docker" / "cpuset.cpus.effective").write_text("0-1\n")
        for name, value in {
            "memory.max": "73600000",
            "memory.swap.max": "0",
            "memory.low": "64000000",
            "cpu.max": "50000 100000",
            "cpuset.cpus": "0",
            "pids.max": "512",
        }.items():
            (d / name).write_text(value + "\n")
        docker_servers.panel.servers[uuid]["settings"]["build"].update(
            memory_limit=0, cpu_limit=0, threads=None, swap=-1
        )
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert [
            (d / f).read_text().strip()
            for f in ("memory.max", "memory.swap.max", "memory.low", "cpu.max", "cpuset.cpus")
        ] == [
            "max",
            "max",
            "0",
            "max",
            "",
        ]

    def test_environment_change_shows_only_after_a_restart(self, docker_servers):
        uuid = docker_servers.add(env={"GREETING": "first"})
        daemon = docker_servers.boot()
        docker_servers.start(uuid)
        docker_servers.wait_console(uuid, "booting first")
        docker_servers.panel.servers[uuid]["settings"]["environment"]["GREETING"] = "second"
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        pending = api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["pending_next_start"]
        assert "environment variables" in pending
        assert (
            api(
                daemon,
                "POST",
                f"/api/servers/{uuid}/commands",
                {"commands": ["echo now $GREETING"]},
            )[0]
            == 204
        )
        docker_servers.wait_console(uuid, "now first")
        assert "GREETING=first" in docker_servers.inspect(uuid)["Config"]["Env"]
        assert (
            api(
                daemon,
                "POST",
                f"/api/servers/{uuid}/power",
                {"action": "restart", "wait_seconds": 10},
            )[0]
            == 202
        )
        docker_servers.wait_console(uuid, "booting second")
        docker_servers.wait_state(uuid, "running")
        assert "GREETING=second" in docker_servers.inspect(uuid)["Config"]["Env"]
        # "running" comes from the game's done line, a moment before the start that made the
        # container catches its record up (Server._finish_start): wait for that, not a sleep.
        wait_for(
            lambda: (
                api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["pending_next_start"]
                == []
            ),
            10,
            what="the start to clear what was pending",
        )

    def test_a_crash_restarts_once_and_a_second_crash_inside_the_window_does_not(
        self, docker_servers
    ):
        uuid = docker_servers.add()
        daemon = docker_servers.boot(system__crash_detection__timeout=60)
        server = docker_servers.start(uuid)
        first_id = docker_servers.inspect(uuid)["Id"]
        fetches = docker_servers.panel.calls.get(f"/api/remote/servers/{uuid}", 0)
        api(daemon, "POST", f"/api/servers/{uuid}/commands", {"commands": ["exit 3"]})
        docker_servers.wait_console(uuid, "Detected server process in a crashed state")
        docker_servers.wait_console(uuid, "Exit code: 3")
        wait_for(
            lambda: (
                docker_servers.container_id(uuid) not in (None, first_id)
                and server.state == "running"
            ),
            20,
            what="the restart after the crash",
        )
        assert (
            docker_servers.panel.calls[f"/api/remote/servers/{uuid}"] > fetches
        )  # the restart synced first
        api(daemon, "POST", f"/api/servers/{uuid}/commands", {"commands": ["exit 4"]})
        docker_servers.wait_console(
            uuid, "Aborting automatic restart, last crash occurred less than 60 seconds ago."
        )
        assert server.state == "offline" and not docker_servers.inspect(uuid)["State"]["Running"]

    def test_a_clean_exit_is_not_a_crash_when_so_configured(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot(system__crash_detection__detect_clean_exit_as_crash=False)
        server = docker_servers.start(uuid)
        api(daemon, "POST", f"/api/servers/{uuid}/commands", {"commands": ["exit 0"]})
        wait_for(lambda: server.state == "offline", 10, what="the exit")
        time.sleep(
            0.5
        )  # a restart would have begun by now: nothing to poll for when nothing happens
        assert server.state == "offline"
        assert not any("crashed state" in line for line in docker_servers.console(uuid))

    def test_stop_by_signal_sends_the_real_signal_name(self, docker_servers):
        startup = "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
        uuid = docker_servers.add(startup=startup, stop=("signal", "SIGTERM"))
        daemon = docker_servers.boot()
        server = docker_servers.start(uuid)
        started = time.monotonic()
        assert (
            api(
                daemon, "POST", f"/api/servers/{uuid}/power", {"action": "stop", "wait_seconds": 10}
            )[0]
            == 202
        )
        wait_for(lambda: server.state == "offline", 10, what="the stop")
        assert (
            time.monotonic() - started < 5
        )  # stopped by SIGTERM, not by the kill after the timeout
        assert "got-term" in docker_servers.console(uuid)
        assert docker_servers.inspect(uuid)["State"]["ExitCode"] == 0

    def test_stop_by_command_and_kill_after_the_timeout(self, docker_servers):
        uuid = docker_servers.add()  # stop command "quit"
        stubborn = docker_servers.add(
            startup="trap '' INT; echo ready; while true; do sleep 0.1; done",
            stop=("signal", "SIGINT"),
        )
        daemon = docker_servers.boot(wingslite__stop_timeout_s=1)
        server = docker_servers.start(uuid)
        assert (
            api(
                daemon, "POST", f"/api/servers/{uuid}/power", {"action": "stop", "wait_seconds": 10}
            )[0]
            == 202
        )
        wait_for(lambda: server.state == "offline", 10, what="the stop command")
        assert docker_servers.inspect(uuid)["State"]["ExitCode"] == 0
        server = docker_servers.start(stubborn)
        started = time.monotonic()
        assert (
            api(
                daemon,
                "POST",
                f"/api/servers/{stubborn}/power",
                {"action": "stop", "wait_seconds": 10},
            )[0]
            == 202
        )
        wait_for(lambda: server.state == "offline", 10, what="the kill after the timeout")
        assert 1 <= time.monotonic() - started < 8
        assert docker_servers.inspect(stubborn)["State"]["ExitCode"] == 137
        docker_servers.wait_console(stubborn, "did not stop within 1 seconds")
        assert not any("crashed state" in line for line in docker_servers.console(stubborn))

    def test_kill_power_action(self, docker_daemon):
        uuid, daemon = docker_daemon.uuid, docker_daemon.daemon
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "kill"})[0] == 202
        docker_daemon.wait_state(uuid, "offline")
        assert docker_daemon.inspect(uuid)["State"]["ExitCode"] == 137

    def test_a_kill_while_the_container_is_being_made_wins_and_is_no_crash(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        server = daemon.get_server(uuid)
        kill_sent = threading.Event()

        def kill_once_starting(event, *args):
            if event == "status" and args == ("starting",) and not kill_sent.is_set():
                # the Panel's kill button, pressed while the container is being made
                kill_sent.set()
                threading.Thread(
                    target=api,
                    args=(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "kill"}),
                ).start()

        server.events.subscribe(kill_once_starting)
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        wait_for(kill_sent.is_set, 10, what="the start to begin")
        wait_for(lambda: docker_servers.power_idle(server), 20, what="the start to finish")
        time.sleep(
            1
        )  # a crash restart would have begun by now: nothing to poll for when nothing happens
        assert server.state == "offline"
        assert not docker_servers.inspect(uuid)["State"]["Running"]
        assert not any("crashed state" in line for line in docker_servers.console(uuid))

    def test_power_validation(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "explode"})
        assert status == 422 and "not valid" in body["error"]
        docker_servers.panel.servers[uuid]["settings"]["suspended"] = True
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        for action in ("start", "restart"):
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": action})
            assert status == 400 and "suspended" in body["error"]
        assert daemon.get_server(uuid).state == "offline"

    def test_start_refuses_when_the_panel_now_says_suspended(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        docker_servers.panel.servers[uuid]["settings"]["suspended"] = True  # not synced yet
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        docker_servers.wait_console(uuid, "suspended and cannot be started")
        assert daemon.get_server(uuid).state == "offline"
        with pytest.raises(Exception, match=r"(?i)no such container|not found|404"):
            docker_servers.inspect(uuid)

    def test_commands_logs_and_stats(self, docker_daemon):
        uuid, daemon = docker_daemon.uuid, docker_daemon.daemon
        assert (
            api(
                daemon,
                "POST",
                f"/api/servers/{uuid}/commands",
                {"commands": ["echo one", "echo two"]},
            )[0]
            == 204
        )
        # Docker's log driver writes its copy a moment after the attach stream delivered it.
        body = wait_for(
            lambda: (
                (r := api(daemon, "GET", f"/api/servers/{uuid}/logs?size=3"))[2]["data"][-1]
                == "two"
                and r[2]
            ),
            10,
            what="the log",
        )
        assert (
            len(body["data"]) == 3 and "echo two" in body["data"]
        )  # the TTY also echoes each command
        util = wait_for(
            lambda: (
                (u := api(daemon, "GET", f"/api/servers/{uuid}")[2]["utilization"])["memory_bytes"]
                and u
            ),
            10,
            what="a stats sample",
        )
        assert set(util) == {
            "memory_bytes",
            "memory_limit_bytes",
            "cpu_absolute",
            "network",
            "uptime",
            "state",
            "disk_bytes",
        }
        assert (
            util["state"] == "running"
            and util["uptime"] > 0
            and util["memory_limit_bytes"] // 4096 == w.memory_limit_bytes(64) // 4096
        )
        assert set(util["network"]) == {"rx_bytes", "tx_bytes"}
        api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "kill"})
        docker_daemon.wait_state(uuid, "offline")
        status, _, body = api(
            daemon, "POST", f"/api/servers/{uuid}/commands", {"commands": ["echo three"]}
        )
        assert (
            status == 502 and body["error"] == "Cannot send commands to a stopped server instance."
        )
        assert api(daemon, "GET", f"/api/servers/{uuid}")[2]["utilization"]["memory_bytes"] == 0

    def test_console_flood_is_throttled(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot(throttles__lines=50, throttles__line_reset_interval=60_000)
        docker_servers.start(uuid)
        api(
            daemon,
            "POST",
            f"/api/servers/{uuid}/commands",
            {
                "commands": [
                    "i=0; while [ $i -lt 500 ]; do echo flood$i; i=$((i+1)); done; echo flood-end"
                ]
            },
        )
        docker_servers.wait_console(uuid, "throttling")
        wait_for(
            lambda: "flood-end" in docker_servers.daemon.get_server(uuid).logs(5)[-1],
            10,
            what="the flood to end",
        )
        shown = [line for line in docker_servers.console(uuid) if line.startswith("flood")]
        assert len(shown) < 50
        assert sum("throttling" in line for line in docker_servers.console(uuid)) == 1

    def test_an_image_that_is_neither_local_nor_pullable_fails_the_start(
        self, docker_servers, caplog
    ):
        uuid = docker_servers.add(image="wingslite-missing.invalid/nothing:1")
        good = docker_servers.add()
        daemon = docker_servers.boot()
        with caplog.at_level(logging.ERROR, logger="wingslite"):
            assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
            line = docker_servers.wait_console(uuid, "could not be started")
            wait_for(
                lambda: any(
                    "neither on this node nor pullable" in r.getMessage() for r in caplog.records
                ),
                10,
                what="the logged error",
            )
        assert "neither on this node nor pullable" in line
        assert daemon.get_server(uuid).state == "offline"
        assert api(daemon, "GET", "/api/system")[0] == 200
        docker_servers.start(good)  # the daemon and other servers carry on

    def test_a_start_whose_sync_fails_is_refused_with_a_console_message(
        self, docker_servers, caplog
    ):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        del docker_servers.panel.servers[uuid]  # the Panel now answers 404 for it
        with caplog.at_level(logging.ERROR, logger="wingslite"):
            assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
            docker_servers.wait_console(uuid, "Unable to sync server data from the Panel")
            wait_for(
                lambda: any("power action start failed" in r.getMessage() for r in caplog.records),
                10,
                what="the logged error",
            )
        assert (
            daemon.get_server(uuid).state == "offline" and docker_servers.container_id(uuid) is None
        )

    def test_system_info_v2_reports_the_engine_as_the_panels_telemetry_reads_it(
        self, docker_servers, tmp_path
    ):
        daemon = docker_servers.boot()
        status, _, body = api(daemon, "GET", "/api/system?v=2")
        engine = docker_servers.engine.info()
        assert status == 200 and body["version"] == w.VERSION
        assert body["docker"]["version"] == engine["ServerVersion"]
        assert body["docker"]["cgroups"]["driver"] == engine["CgroupDriver"]
        assert set(body["docker"]["containers"]) == {"total", "running", "paused", "stopped"}
        assert body["docker"]["storage"]["driver"] == engine["Driver"]
        assert (
            body["system"]["os_type"] == "linux"
            and body["system"]["memory_bytes"] > 0
            and body["system"]["cpu_threads"] >= 1
        )
        unreachable = DaemonFactory(tmp_path / "other")
        try:
            other = unreachable(
                docker_servers.panel, wingslite__docker_url=f"unix://{tmp_path / 'no.sock'}"
            )
            status, _, body = api(other, "GET", "/api/system?v=2")
            assert status == 500 and "Docker" in body["error"], body
            assert api(other, "GET", "/api/system")[0] == 200  # v1 needs no engine
        finally:
            unreachable.stop_all()

    def test_a_slow_image_pull_does_not_hold_up_a_suspending_sync(
        self, docker_servers, monkeypatch
    ):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        env = daemon.get_server(uuid).env
        pulling, release = threading.Event(), threading.Event()
        ensure_image = env._ensure_image

        def slow_pull(image):  # as a registry download of a large image would be
            if not pulling.is_set():
                pulling.set()
                release.wait(20)
            return ensure_image(image)

        monkeypatch.setattr(env, "_ensure_image", slow_pull)
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        assert pulling.wait(10)
        docker_servers.panel.servers[uuid]["settings"]["suspended"] = True
        started = time.monotonic()
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 204 and time.monotonic() - started < 2, (
            body
        )  # not queued behind the download
        release.set()
        docker_servers.wait_console(uuid, "suspended and cannot be started")
        assert (
            daemon.get_server(uuid).state == "offline" and docker_servers.container_id(uuid) is None
        )

    def test_deleting_a_server_removes_its_running_container(self, docker_daemon):
        uuid, daemon = docker_daemon.uuid, docker_daemon.daemon
        assert api(daemon, "DELETE", f"/api/servers/{uuid}")[0] == 204
        assert docker_daemon.container_id(uuid) is None
        assert api(daemon, "GET", f"/api/servers/{uuid}")[0] == 404

    def test_docker_down_during_a_sync_is_a_500_naming_docker_and_limits_apply_at_next_start(
        self, docker_servers, tmp_path
    ):
        proxy = DockerSocketProxy(tmp_path / "docker.sock")
        try:
            uuid = docker_servers.add(memory_mb=64)
            daemon = docker_servers.boot(wingslite__docker_url=f"unix://{proxy.path}")
            docker_servers.start(uuid)
            api(
                daemon, "POST", f"/api/servers/{uuid}/power", {"action": "stop", "wait_seconds": 10}
            )
            docker_servers.wait_state(uuid, "offline")
            proxy.stop()
            docker_servers.panel.servers[uuid]["settings"]["build"]["memory_limit"] = 96
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
            assert status == 500 and "Docker" in body["error"]
            view = api(daemon, "GET", f"/api/servers/{uuid}")[2]
            assert view["configuration"]["build"]["memory_limit"] == 96
            assert "resource limits" in view["wingslite"]["pending_next_start"]
            proxy.start()
            docker_servers.start(uuid)
            assert docker_servers.inspect(uuid)["HostConfig"]["Memory"] == w.memory_limit_bytes(96)
        finally:
            proxy.stop()

    def test_daemon_killed_with_sigkill_reattaches_and_restores_states(
        self, docker_servers, tmp_path
    ):
        keeps_running = docker_servers.add()
        was_running = docker_servers.add()
        never_started = docker_servers.add()
        # Port 0, the port read from each process's log: a port picked in advance (free_port())
        # is free only until then, and after the SIGKILL any process on the machine may take it
        # before the second daemon binds it; the test would then talk to that process.
        config = node_config(tmp_path, docker_servers.panel.url)
        config_path = tmp_path / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / "daemon.log"
        log = open(log_path, "wb")
        port = 0

        def spawn():
            nonlocal port
            log_start = log_path.stat().st_size
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "wingslite.py"), "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            serving = re.compile(rb"serving the API on http://127\.0\.0\.1:(\d+)")
            port = int(
                wait_for(
                    lambda: serving.search(log_path.read_bytes()[log_start:]),
                    20,
                    what="the daemon to listen",
                ).group(1)
            )
            wait_for(
                lambda: api(port, "GET", f"/api/servers/{never_started}")[0] == 200,
                20,
                what="the daemon's API",
            )
            return proc

        proc = spawn()
        try:
            for uuid in (keeps_running, was_running):
                assert (
                    api(port, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
                )
            for uuid in (keeps_running, was_running):
                wait_for(
                    lambda uuid=uuid: (
                        api(port, "GET", f"/api/servers/{uuid}")[2]["state"] == "running"
                    ),
                    20,
                    what="running",
                )
            before = docker_servers.inspect(keeps_running)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            docker_servers.engine.kill(was_running)  # e.g. the host rebooted under it
            proc = spawn()
            wait_for(
                lambda: api(port, "GET", f"/api/servers/{was_running}")[2]["state"] == "running",
                30,
                what="the restore of a server that was running",
            )
            after = docker_servers.inspect(keeps_running)
            assert (after["Id"], after["State"]["Pid"], after["State"]["StartedAt"]) == (
                before["Id"],
                before["State"]["Pid"],
                before["State"]["StartedAt"],
            )
            assert api(port, "GET", f"/api/servers/{keeps_running}")[2]["state"] == "running"
            assert (
                api(
                    port,
                    "POST",
                    f"/api/servers/{keeps_running}/commands",
                    {"commands": ["echo still-here"]},
                )[0]
                == 204
            )
            wait_for(
                lambda: (
                    "still-here"
                    in api(port, "GET", f"/api/servers/{keeps_running}/logs?size=5")[2]["data"]
                ),
                10,
                what="the console after re-attaching",
            )
            assert api(port, "GET", f"/api/servers/{never_started}")[2]["state"] == "offline"
        finally:
            proc.kill()
            proc.wait(timeout=10)
            log.close()


@pytest.mark.docker
class TestSyncDuringPower:
    """A sync, a suspension and a delete never wait behind a power action (the two locks)."""

    STUCK = ("command", "true")  # a stop command the game ignores: the stop waits its timeout

    def stuck_stopping(self, docker_servers, **config):
        """A running server whose stop (timeout 600 s) is in progress and will not end by itself."""
        uuid = docker_servers.add(stop=self.STUCK)
        daemon = docker_servers.boot(**config)
        docker_servers.start(uuid)
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "stop"})[0] == 202
        server = docker_servers.wait_state(uuid, "stopping")
        wait_for(
            lambda: not docker_servers.power_idle(server), 10, what="the stop to hold its lock"
        )
        return daemon, uuid, server

    def test_a_suspension_during_a_stuck_stop_answers_at_once_and_escalates_to_a_kill(
        self, docker_servers
    ):
        daemon, uuid, server = self.stuck_stopping(
            docker_servers, wingslite__suspend_stop_grace_s=2
        )
        conn, first = ws_authed(daemon, uuid)
        assert first[0][0] == "auth success"
        docker_servers.panel.servers[uuid]["settings"]["suspended"] = True
        started = time.monotonic()
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        answered_s = time.monotonic() - started
        print(f"suspending sync during a stuck stop: 204 after {answered_s * 1000:.1f} ms")
        assert status == 204 and answered_s < 2, (status, body, answered_s)
        assert daemon.sessions.count(uuid) == 0  # closed before the 204 was written
        assert ws_close_code(conn) == 4409
        assert not docker_servers.power_idle(server)  # the 600 s stop is still under way
        wait_for(
            lambda: not docker_servers.inspect(uuid)["State"]["Running"],
            2 + 5,
            what="the process to be killed after suspend_stop_grace_s",
        )
        docker_servers.wait_state(uuid, "offline")
        assert docker_servers.inspect(uuid)["State"]["ExitCode"] == 137

    def test_a_delete_during_a_stuck_stop_answers_and_removes_container_and_files(
        self, docker_servers
    ):
        daemon, uuid, server = self.stuck_stopping(docker_servers)
        (daemon.config.data_dir / uuid / "world.dat").write_text("x")
        started = time.monotonic()
        status, _, body = api(daemon, "DELETE", f"/api/servers/{uuid}")
        print(f"delete during a stuck stop: 204 after {(time.monotonic() - started) * 1000:.0f} ms")
        assert status == 204 and time.monotonic() - started < 5, body
        assert docker_servers.container_id(uuid) is None
        wait_for(lambda: docker_servers.power_idle(server), 10, what="the stop to end")
        wait_for(lambda: not (daemon.config.data_dir / uuid).exists(), 10, what="files removed")
        time.sleep(1)  # nothing to poll for when nothing happens: no container comes back
        assert docker_servers.container_id(uuid) is None
        assert api(daemon, "GET", f"/api/servers/{uuid}")[0] == 404

    def on_starting(self, server, action):
        """Run ``action`` in the start's own thread the moment the state becomes ``starting``
        (the container is then about to be made), once."""
        done = threading.Event()

        def listener(event, *args):
            if event == "status" and args == ("starting",) and not done.is_set():
                done.set()
                action()

        server.events.subscribe(listener)
        return done

    def test_a_suspension_during_a_start_abandons_it_and_kills_its_container(self, docker_servers):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        server = daemon.get_server(uuid)
        answers = []

        def suspend():
            docker_servers.panel.servers[uuid]["settings"]["suspended"] = True
            answers.append(api(daemon, "POST", f"/api/servers/{uuid}/sync")[0])

        fired = self.on_starting(server, lambda: threading.Thread(target=suspend).start())
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        wait_for(fired.is_set, 10, what="the start to begin")
        wait_for(lambda: answers, 10, what="the suspending sync to answer")
        assert answers == [204]
        wait_for(lambda: docker_servers.power_idle(server), 20, what="the start to end")
        wait_for(lambda: server.state == "offline", 10, what="the server to be offline")
        time.sleep(1)  # a start that was not abandoned would be running by now
        assert server.state == "offline"
        assert not (docker_servers.inspect(uuid)["State"]["Running"])

    def test_a_memory_change_synced_while_the_container_is_made_ends_on_the_container(
        self, docker_servers
    ):
        uuid = docker_servers.add(memory_mb=64)
        daemon = docker_servers.boot()
        server = daemon.get_server(uuid)
        answers = []

        def sync_more_memory():  # lands after the start read its configuration (64 MB)
            docker_servers.panel.servers[uuid]["settings"]["build"]["memory_limit"] = 96
            answers.append(api(daemon, "POST", f"/api/servers/{uuid}/sync"))

        def sync_and_wait():  # the start thread waits until the sync answered: no race left
            thread = threading.Thread(target=sync_more_memory)
            thread.start()
            thread.join(10)

        self.on_starting(server, sync_and_wait)
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        docker_servers.wait_state(uuid, "running")
        wait_for(lambda: docker_servers.power_idle(server), 20, what="the start to end")
        assert answers and answers[0][0] == 204, answers
        record = api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]
        assert any("container being started" in a for a in record["applied"]), record
        container = docker_servers.inspect(uuid)["Id"]
        limit = int(cgroup_file("memory", container, "memory.limit_in_bytes"))
        assert limit // 4096 == w.memory_limit_bytes(96) // 4096


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class DockerSocketProxy:
    """A Unix socket that forwards to the real engine and can be stopped (the engine "goes
    down")."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock"):
        self.path, self.target = path, target
        self.server: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.start()

    def start(self):
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(self.path))
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def stop(self):
        if self.server is not None:
            self.server.close()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.connections.clear()

    def _accept(self, server):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


# environments: installation #######################################################################


# An install script for the test image (busybox; the egg's entrypoint is ``sh``). It waits for a
# gate file when asked, so that a test can act while the install runs, then writes into the
# server's directory and prints progress.
INSTALL_SCRIPT = (
    "#!/bin/sh\r\n"
    'echo "installing for $GREETING"\r\n'
    'while [ -n "$GATED" ] && [ ! -f /mnt/server/.gate ]; do sleep 0.05; done\r\n'
    'echo "new-$RUN_MARK" > /mnt/server/installed.txt\r\n'
    "mkdir -p /mnt/server/plugins && echo jar > /mnt/server/plugins/a.jar\r\n"
    "echo 'step 2/2 done'\r\n"
)


def installer_name(uuid: str) -> str:
    return f"{uuid}_installer"


@pytest.mark.docker
class TestInstallation:
    """Create, install, reinstall and their faults, with the real engine and the test image."""

    def add(self, docker_servers, script=INSTALL_SCRIPT, gated=False, **options) -> str:
        env = {"RUN_MARK": "1", **({"GATED": "1"} if gated else {}), **options.pop("env", {})}
        uuid = docker_servers.add(env=env, **options)
        docker_servers.panel.install_scripts[uuid] = {
            "container_image": TEST_IMAGE,
            "entrypoint": "sh",
            "script": script,
        }
        return uuid

    def create(self, daemon, uuid, start=False) -> None:
        body = {"uuid": uuid, "start_on_completion": start}
        assert api(daemon, "POST", "/api/servers", body)[0] == 202

    @staticmethod
    def reports(panel, uuid) -> list[dict]:
        """The bodies of ``POST /api/remote/servers/{uuid}/install`` the Panel received."""
        path = f"/api/remote/servers/{uuid}/install"
        return [r.body for r in list(panel.requests) if r.method == "POST" and r.path == path]

    def report(self, panel, uuid, timeout_s: float = 30) -> dict:
        return wait_for(
            lambda: next(iter(self.reports(panel, uuid)), None),
            timeout_s,
            what="the install report to the Panel",
        )

    def installer_exists(self, engine, uuid) -> bool:
        try:
            engine.inspect_container(installer_name(uuid))
            return True
        except Exception:
            return False

    def open_gate(self, daemon, uuid) -> None:
        (daemon.config.data_dir / uuid / ".gate").write_text("")

    def test_create_installs_streams_output_to_install_sockets_only_then_starts(
        self, docker_servers
    ):
        # Listed by the Panel when the node boots, created after: sockets are open before it runs.
        uuid = self.add(docker_servers, gated=True)
        daemon = docker_servers.boot()
        installer, _ = ws_authed(
            daemon,
            uuid,
            permissions=["*", "admin.websocket.install"],
            user_uuid=str(uuidlib.uuid4()),
        )
        plain, _ = ws_authed(daemon, uuid, permissions=["*"])
        self.create(daemon, uuid, start=True)
        wait_for(
            lambda: self.installer_exists(docker_servers.engine, uuid), 30, what="the installer"
        )
        assert api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["installing"] is True
        self.open_gate(daemon, uuid)

        def events_until_completed(conn):
            seen = []
            while not seen or seen[-1][0] != "install completed":
                seen.append(ws_event(conn, 30))
            return seen

        admin_events, plain_events = (
            events_until_completed(installer),
            events_until_completed(plain),
        )
        output = [a[0] for e, a in admin_events if e == "install output"]
        assert "installing for hello" in output and "step 2/2 done" in output
        assert not [e for e, _ in plain_events if e == "install output"]
        messages = [a[0] for e, a in plain_events if e == "daemon message"]
        assert "Starting installation process, this could take a few minutes..." in messages
        assert "Installation process completed." in messages
        names = [e for e, _ in admin_events]
        assert names.index("install started") < names.index("install output")
        assert ("install completed", [""]) in plain_events and (
            "install started",
            [""],
        ) in plain_events
        assert self.report(docker_servers.panel, uuid) == {"successful": True, "reinstall": False}

        root = daemon.config.data_dir / uuid
        for path in (root, root / "installed.txt", root / "plugins", root / "plugins" / "a.jar"):
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == (988, 988), path
        assert (root / "installed.txt").read_text() == "new-1\n"
        docker_servers.wait_state(uuid, "running", 30)  # start_on_completion
        assert docker_servers.inspect(uuid)["Config"]["User"] == "988:988"
        assert not self.installer_exists(docker_servers.engine, uuid)
        assert not (daemon.config.root_dir.parent / "tmp" / uuid).exists()
        log = (
            Path(daemon.config.get("system.log_directory")) / "install" / f"{uuid}.log"
        ).read_text()
        assert log.startswith("Pterodactyl Server Installation Log")
        assert (
            f"Server UUID:          {uuid}" in log and f"Container Image:      {TEST_IMAGE}" in log
        )
        assert "Container Entrypoint: sh" in log and "  GREETING=hello" in log
        assert "installing for hello" in log and "step 2/2 done" in log
        assert api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["installing"] is False
        installs = sample(
            metrics_of(daemon),
            "wingslite_server_operations_total",
            server=uuid,
            operation="install",
        )
        assert installs == 1
        installer.close()
        plain.close()

    def test_a_failing_script_is_reported_and_nothing_starts(self, docker_servers):
        daemon = docker_servers.boot()
        uuid = self.add(docker_servers, script="echo about to fail\nexit 3\n")
        self.create(daemon, uuid, start=True)
        assert self.report(docker_servers.panel, uuid) == {"successful": False, "reinstall": False}
        assert docker_servers.panel.status[uuid] == "install_failed"
        server = daemon.get_server(uuid)
        wait_for(lambda: not server.installing, 10, what="the install to end")
        assert server.state == "offline" and docker_servers.container_id(uuid) is None
        assert any("exited with code 3" in line for line in docker_servers.console(uuid))
        log = server.install_log_path().read_text()
        assert (
            "about to fail" in log
            and "Installation failed: the install script exited with code 3" in log
        )
        assert not self.installer_exists(docker_servers.engine, uuid)

    @pytest.mark.parametrize(
        "script, reason",
        [
            (
                {
                    "container_image": "wingslite-no-such-image:latest",
                    "entrypoint": "sh",
                    "script": "true",
                },
                "no-such-image",
            ),
            (None, "the egg has no install script"),
        ],
    )
    def test_no_image_or_no_script_is_a_failed_install_with_the_reason(
        self, docker_servers, script, reason
    ):
        daemon = docker_servers.boot()
        uuid = self.add(docker_servers)
        if script is None:  # the Panel answers script: null
            script = {"container_image": TEST_IMAGE, "entrypoint": "ash", "script": None}
        docker_servers.panel.install_scripts[uuid] = script
        self.create(daemon, uuid, start=True)
        assert self.report(docker_servers.panel, uuid)["successful"] is False
        server = daemon.get_server(uuid)
        wait_for(lambda: not server.installing, 10, what="the install to end")
        assert any(reason in line for line in docker_servers.console(uuid))
        assert reason in server.install_log_path().read_text()
        assert server.state == "offline"

    def test_skip_egg_scripts_reports_success_at_once_without_a_container(self, docker_servers):
        uuid = self.add(docker_servers)
        docker_servers.panel.servers[uuid]["settings"]["skip_egg_scripts"] = True
        daemon = docker_servers.boot()
        conn, _ = ws_authed(daemon, uuid, permissions=["*", "admin.websocket.install"])
        assert api(daemon, "POST", f"/api/servers/{uuid}/install")[0] == 202
        events = []
        while not events or events[-1][0] != "install completed":
            events.append(ws_event(conn, 10))
        assert "install started" not in [e for e, _ in events]
        assert self.report(docker_servers.panel, uuid) == {"successful": True, "reinstall": False}
        assert f"/api/remote/servers/{uuid}/install" not in [
            r.path for r in docker_servers.panel.requests if r.method == "GET"
        ]
        assert not (daemon.config.data_dir / uuid / "installed.txt").exists()
        conn.close()

    def test_reinstall_stops_the_running_server_and_replaces_what_the_script_writes(
        self, docker_servers
    ):
        uuid = self.add(docker_servers)
        daemon = docker_servers.boot()
        docker_servers.start(uuid)
        root = daemon.config.data_dir / uuid
        (root / "installed.txt").write_text("old\n")
        (root / "world.dat").write_text("kept")
        docker_servers.panel.servers[uuid]["settings"]["environment"]["RUN_MARK"] = "2"
        conn, _ = ws_authed(daemon, uuid, permissions=["*", "admin.websocket.install"])
        assert api(daemon, "POST", f"/api/servers/{uuid}/reinstall")[0] == 202
        events = []
        while not events or events[-1][0] != "install completed":
            events.append(ws_event(conn, 30))
        names = [e for e, _ in events]
        assert ("status", ["offline"]) in events  # stopped first
        assert names.index("install started") < names.index("install output")
        assert self.report(docker_servers.panel, uuid) == {"successful": True, "reinstall": True}
        conn.close()
        server = daemon.get_server(uuid)
        wait_for(lambda: not server.installing, 10, what="the reinstall to end")
        assert server.state == "offline"
        assert (root / "installed.txt").read_text() == "new-2\n"  # synced before it ran
        assert (root / "world.dat").read_text() == "kept"
        assert (root / "world.dat").stat().st_uid == 988

    def test_while_installing_power_and_a_second_install_are_refused(self, docker_servers):
        daemon = docker_servers.boot()
        uuid = self.add(docker_servers, gated=True)
        self.create(daemon, uuid)
        wait_for(
            lambda: self.installer_exists(docker_servers.engine, uuid), 30, what="the installer"
        )
        for action in ("start", "stop", "restart", "kill"):
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": action})
            assert status == 409 and body["error"] == "server is currently installing", action
        for route in ("reinstall", "install"):
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/{route}")
            assert status == 409 and "installing" in body["error"]
        conn, _ = ws_authed(daemon, uuid, permissions=["*", "admin.websocket.errors"])
        ws_send(conn, "set state", "start")
        assert "server is currently installing" in ws_until(conn, "daemon error")[0]
        conn.close()
        self.open_gate(daemon, uuid)
        assert self.report(docker_servers.panel, uuid)["successful"] is True
        # a repeated create of an installed server re-reads it and does not reinstall
        gets = docker_servers.panel.calls[f"/api/remote/servers/{uuid}/install"]
        wait_for(lambda: not daemon.get_server(uuid).installing, 10, what="the install to end")
        self.create(daemon, uuid)
        assert daemon.get_server(uuid).installing is False  # an install is claimed before the 202
        assert docker_servers.panel.calls[f"/api/remote/servers/{uuid}/install"] == gets
        assert len(self.reports(docker_servers.panel, uuid)) == 1

    def test_a_suspension_during_an_install_answers_and_removes_the_installer(self, docker_servers):
        daemon = docker_servers.boot()
        uuid = self.add(docker_servers, gated=True)
        self.create(daemon, uuid, start=True)
        wait_for(
            lambda: self.installer_exists(docker_servers.engine, uuid), 30, what="the installer"
        )
        docker_servers.panel.servers[uuid]["settings"]["suspended"] = True
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        wait_for(
            lambda: not self.installer_exists(docker_servers.engine, uuid), 15, what="no installer"
        )
        assert self.report(docker_servers.panel, uuid)["successful"] is False
        server = daemon.get_server(uuid)
        wait_for(lambda: not server.installing, 10, what="the install to end")
        assert server.state == "offline" and docker_servers.container_id(uuid) is None
        assert "cancelled" in server.install_log_path().read_text()

    def test_a_delete_during_an_install_kills_it_and_removes_everything(self, docker_servers):
        daemon = docker_servers.boot()
        uuid = self.add(docker_servers, gated=True)
        self.create(daemon, uuid)
        wait_for(
            lambda: self.installer_exists(docker_servers.engine, uuid), 30, what="the installer"
        )
        server = daemon.get_server(uuid)
        assert api(daemon, "DELETE", f"/api/servers/{uuid}")[0] == 204
        assert not self.installer_exists(docker_servers.engine, uuid)
        wait_for(lambda: not (daemon.config.data_dir / uuid).exists(), 15, what="the files removed")
        wait_for(lambda: not server.installing, 15, what="the install thread to end")
        assert not self.reports(docker_servers.panel, uuid)  # nobody to tell about a deleted server
        assert not (daemon.config.data_dir / uuid).exists()

    def test_a_daemon_killed_during_an_install_leaves_no_installer_and_the_panel_is_told(
        self, docker_servers, tmp_path
    ):
        uuid = self.add(docker_servers, gated=True)
        config = node_config(tmp_path, docker_servers.panel.url)
        port = config["api"]["port"] = free_port()
        config_path = tmp_path / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        with open(tmp_path / "daemon.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "wingslite.py"), "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stranger = f"{uuidlib.uuid4()}_installer"  # another node's installer on the same engine
        try:
            wait_for(
                lambda: (
                    _port_open(port) and api(port, "GET", "/api/system")[2]["wingslite"]["booted"]
                ),
                20,
                what="the daemon to boot",
            )
            self.create(port, uuid)
            engine = docker_servers.engine
            wait_for(lambda: self.installer_exists(engine, uuid), 30, what="the installer")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert self.installer_exists(engine, uuid) and not self.reports(
                docker_servers.panel, uuid
            )
            engine.create_container(
                TEST_IMAGE, "true", name=stranger, labels={"ContainerType": "server_installer"}
            )
            again = docker_servers.boot()
            assert not self.installer_exists(engine, uuid)
            assert not (tmp_path / "tmp" / uuid).exists()
            assert engine.inspect_container(stranger)
            assert self.report(docker_servers.panel, uuid) == {
                "successful": False,
                "reinstall": False,
            }
            assert uuid in again.servers
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                docker_servers.engine.remove_container(stranger, force=True)
            with contextlib.suppress(Exception):
                docker_servers.engine.remove_container(installer_name(uuid), force=True)

    def test_reinstall_is_refused_while_a_power_action_runs(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        server = daemon.get_server(uuid)
        held = threading.Event()
        release = threading.Event()

        def hold():  # a power action in progress, on another thread (the lock is re-entrant)
            with server.power_lock:
                held.set()
                release.wait(10)

        threading.Thread(target=hold, daemon=True).start()
        assert held.wait(5)
        try:
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/reinstall")
            assert status == 409 and body["error"] == (
                "Cannot execute server reinstall event while another power action is running."
            )
            assert server.installing is False
        finally:
            release.set()

    def test_the_demo_creates_a_third_server_that_installs_from_a_script(self, docker_engine):
        port, uuid = free_port(), None
        command = [sys.executable, str(HERE / "wingslite.py"), "--demo", "--port", str(port)]
        proc = subprocess.Popen(
            [*command, "--sftp-port", str(free_port())],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            lines = []
            while not any("Ctrl-C" in line for line in lines) and proc.poll() is None:
                lines.append(proc.stdout.readline())
            token = next(line.split(": ", 1)[1].strip() for line in lines if "node token:" in line)
            root = Path(
                next(line.split(": ", 1)[1].strip() for line in lines if "data dir" in line)
            )

            def modded():
                servers = api(port, "GET", "/api/servers", token=token)[2]
                found = [s for s in servers if s["configuration"]["meta"]["name"] == "Demo Modded"]
                return found[0] if found and found[0]["state"] == "running" else None

            uuid = wait_for(modded, 60, what="the demo's third server installed and running")[
                "configuration"
            ]["uuid"]
            assert "eula=true" in (root / "volumes" / uuid / "eula.txt").read_text()
            log = (root / "logs" / "install" / f"{uuid}.log").read_text()
            assert "downloading part 3/3" in log and "Install complete." in log
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)
            if uuid:
                with contextlib.suppress(Exception):
                    docker_engine.remove_container(uuid, force=True)


@pytest.mark.docker
class TestNodeUser:
    """Game containers run as the node user, and the files the daemon makes belong to it."""

    def config(self, tmp_path, **overrides) -> w.Config:
        return w.Config(node_config(tmp_path, "http://127.0.0.1:9", **overrides), "test")

    def test_the_user_is_resolved_as_wings_does(self, tmp_path):
        missing = "wingslite-no-such-user"
        user = w.resolve_node_user(self.config(tmp_path, system__username=missing), {})
        assert (user.uid, user.gid, user.container_user, user.exists) == (
            988,
            988,
            "988:988",
            False,
        )
        user = w.resolve_node_user(
            self.config(tmp_path, system__username=missing),
            {"WINGS_UID": "1500", "WINGS_GID": "1501"},
        )
        assert user.container_user == "1500:1501"
        user = w.resolve_node_user(self.config(tmp_path, system__username="root"), {})
        assert (user.uid, user.gid, user.exists) == (0, 0, True)
        user = w.resolve_node_user(
            self.config(tmp_path, system__user={"uid": 2000, "gid": 2001}), {"WINGS_UID": "7"}
        )
        assert user.container_user == "2000:2001"
        rootless = {"rootless": {"enabled": True, "container_uid": 0, "container_gid": 0}}
        user = w.resolve_node_user(self.config(tmp_path, system__user=rootless), {})
        assert (user.uid, user.container_user) == (os.getuid(), "0:0")

    def test_a_missing_host_user_is_said_at_start(self, panel, make_daemon, caplog):
        with caplog.at_level(logging.INFO, logger="wingslite"):
            make_daemon(panel, system__username="wingslite-no-such-user")
        assert any("988:988 as numbers" in r.getMessage() for r in caplog.records)

    def test_files_the_jail_creates_belong_to_the_owner(self, tmp_path):
        root = tmp_path / "srv"
        root.mkdir()
        with w.Jail(root, owner=(988, 988)) as jail:
            os.close(jail.open("/a.txt", os.O_WRONLY | os.O_CREAT))
            jail.mkdir("/dir")
            jail.symlink("a.txt", "/link")
        for name in ("a.txt", "dir", "link"):
            assert (root / name).lstat().st_uid == 988, name

    def test_files_written_through_the_file_api_belong_to_the_node_user(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        base = f"/api/servers/{uuid}/files"
        assert api(daemon, "POST", f"{base}/write?file=/cfg/a.txt", raw=b"hello")[0] == 204
        body = {"name": "made", "path": "/"}
        assert api(daemon, "POST", f"{base}/create-directory", body)[0] == 204
        root = daemon.config.data_dir / uuid
        for path in (root, root / "cfg", root / "cfg" / "a.txt", root / "made"):
            assert (path.stat().st_uid, path.stat().st_gid) == (988, 988), path

    def test_files_uploaded_over_sftp_belong_to_the_node_user(self, panel, make_daemon):
        pytest.importorskip("paramiko")
        daemon, server = _sftp_daemon(panel, make_daemon)
        with sftp_client(daemon, server) as client:
            client.mkdir("/uploads")
            with client.open("/uploads/map.dat", "wb") as fh:
                fh.write(b"x" * 100)
            client.symlink("map.dat", "/uploads/link")
        for name in ("uploads", "uploads/map.dat", "uploads/link"):
            st = (server.fs.root / name).lstat()
            assert (st.st_uid, st.st_gid) == (988, 988), name

    def test_the_game_runs_as_the_node_user_and_its_files_and_the_tree_belong_to_it(
        self, docker_servers, tmp_path
    ):
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        root = daemon.config.data_dir / uuid
        root.mkdir(parents=True, exist_ok=True)
        (root / "root-owned.txt").write_text("x")
        outside = tmp_path / "outside.txt"
        outside.write_text("not the server's")
        (root / "escape").symlink_to(outside)
        server = docker_servers.start(uuid)
        assert docker_servers.inspect(uuid)["Config"]["User"] == "988:988"
        assert any("Ensuring file permissions" in line for line in docker_servers.console(uuid))
        assert (root / "root-owned.txt").stat().st_uid == 988
        assert (root / "escape").lstat().st_uid == 988 and outside.stat().st_uid == 0
        server.send_command("id -u > /home/container/whoami; echo written-$((1 + 1))")
        docker_servers.wait_console(uuid, "written-2")  # the terminal echoes the command itself
        assert (root / "whoami").read_text().strip() == "988"
        assert (root / "whoami").stat().st_uid == 988


# console and events ###############################################################################


class TestEventBus:
    def test_an_event_is_encoded_once_for_all_its_subscribers(self):
        bus = w.EventBus()
        encodes, frames = [], []

        def encode(event, args):
            encodes.append(args)
            return f"{event}:{args}".encode()

        for _ in range(30):
            bus.subscribe(lambda event, *args: frames.append(bus.encoded(event, args, encode)))
        line = "".join(["a line ", "from the console"])  # built at run time: its own object
        bus.publish("console output", line)
        assert len(frames) == 30 and len(set(frames)) == 1 and len(encodes) == 1
        bus.publish(
            "console output", "".join(["a line ", "from the console"])
        )  # equal text, new event
        bus.publish("status", line)  # same object, other event
        assert len(encodes) == 3 and len(frames) == 90

    def test_a_failing_subscriber_does_not_stop_the_others(self):
        bus = w.EventBus()
        seen = []

        def broken(event, *args):
            raise RuntimeError("boom")

        bus.subscribe(broken)
        bus.subscribe(lambda event, *args: seen.append(args))
        bus.publish("stats", "{}")
        assert seen == [("{}",)]


class TestConsolePipeline:
    def test_lines_are_cut_at_the_limit_and_the_rest_of_the_line_is_dropped(self):
        # Wings' own test case (system/utils_test.go) with a 10-byte limit.
        splitter = w.LineSplitter(10)
        lines = splitter.feed(
            b"hello world this is a long line\nof text that should be truncated\n"
            b"not here\nbut definitely on this line"
        )
        assert lines + splitter.flush() == ["hello worl", "of text th", "not here", "but defini"]

    def test_space_carriage_return_becomes_a_line_break_and_empty_lines_are_dropped(self):
        splitter = w.LineSplitter()
        assert splitter.feed(b"50% \r60%\r\n\r\npart") == ["50%\r\n60%"]
        assert splitter.feed(b"ial\n") == ["partial"]

    def test_an_endless_line_does_not_grow_the_buffer(self):
        splitter = w.LineSplitter()
        for _ in range(100):
            out = splitter.feed(b"x" * 10_000)
            assert all(len(line) == w.CONSOLE_LINE_MAX_BYTES for line in out)
        assert len(splitter._buffer) <= w.CONSOLE_LINE_MAX_BYTES
        assert splitter.feed(b"end\nnext\n") == ["next"]

    def test_throttle_allows_the_window_then_strikes_once_per_flood(self):
        now = [0.0]
        strikes = []
        throttle = w.ConsoleThrottle(2, 100, lambda: strikes.append(now[0]), clock=lambda: now[0])
        assert [throttle.allow() for _ in range(5)] == [True, True, False, False, False]
        assert strikes == [0.0]
        now[0] = 0.15  # a new window
        assert throttle.allow() and throttle.allow() and not throttle.allow()
        assert strikes == [0.0, 0.15]

    def test_done_matches_before_the_throttle_and_only_once(self):
        bus = w.EventBus()
        seen = []
        bus.subscribe(lambda event, *args: seen.append((event, *args)))
        console = w.ConsolePipeline(bus, throttle_lines=1, throttle_interval_ms=60_000)
        done = []
        process = w.ProcessConfig(done=("regex:^Done \\(\\d+s\\)",))
        console.begin(process.done_matchers(), False, lambda: done.append(1))
        console.feed(b"line one\nDone (3s)!\nDone (4s)!\n")
        assert done == [1]
        published = [args[0] for event, *args in seen if event == "console output"]
        assert published[0] == "line one" and "throttling" in published[1] and len(published) == 2

    def test_signal_names_are_sent_as_docker_expects_them(self):
        assert [
            w.signal_name(v) for v in ("SIGTERM", "sigint", "C", "ABRT", "SIGKILL", "bogus", "")
        ] == [
            "SIGTERM",
            "SIGINT",
            "SIGINT",
            "SIGABRT",
            "SIGKILL",
            "SIGKILL",
            "SIGKILL",
        ]


# session table ####################################################################################


class TestSessionTable:
    def test_close_server_closes_exactly_that_servers_sessions(self):
        table = w.SessionTable()
        closed = []
        for server, user, kind in [
            ("s1", "u1", "websocket"),
            ("s1", "u2", "sftp"),
            ("s2", "u1", "websocket"),
        ]:
            table.register(
                server,
                user,
                kind,
                lambda code, reason, t=(server, user, kind): closed.append((t, code)),
            )
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
        assert (
            rev.check("j", "u", "s", rev.boot_time - 10)
            == "jwt: created too far in past (denylist)"
        )
        rev.deny_jtis(["j"])
        assert rev.check("j", "u", "s", int(time.time())) is not None
        assert rev.check("other", "u", "s", int(time.time())) is None
        rev.revoke_user("u", ["s"])
        assert rev.check("x", "u", "s", int(time.time())) is not None
        assert rev.check("x", "u", "s2", int(time.time())) is None
        assert rev.check("x", "u", "s", int(time.time()) + 2) is None

    def test_a_re_registration_never_counts_a_connection_twice(self):
        # A websocket re-registers when it authenticates; counted twice for an instant, a busy
        # server refused a legitimate upgrade with 429 (seen with 1,000 sockets authenticating).
        table = w.SessionTable()
        sessions = [table.register("s", "", "websocket", lambda c, r: None) for _ in range(4)]
        seen, stop = [], threading.Event()

        def reauth(i):
            while not stop.is_set():
                sessions[i] = table.register(
                    "s", "u", "websocket", lambda c, r: None, replaces=sessions[i]
                )

        threads = [threading.Thread(target=reauth, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seen.append(table.count("s", kind="websocket"))
        stop.set()
        for t in threads:
            t.join()
        assert set(seen) == {4}, f"counts seen: {sorted(set(seen))}"
        assert set(table.sessions("s")) == set(sessions)


# websocket ########################################################################################


def ws_claims(
    server: str,
    *,
    user_uuid: str = "c0ffee00-1111-4222-8333-444455556666",
    user_id: int = 1,
    permissions=("*",),
    lifetime: int = 600,
    iat=None,
    drop=(),
    **changes,
) -> dict:
    """The claims the Panel signs for a websocket, in its order (Panel: ``NodeJWTService`` and
    ``Api/Client/Servers/WebsocketController``)."""
    now = int(time.time()) if iat is None else iat
    claims = {
        "iss": "https://panel.example.com",
        "aud": [
            "http://127.0.0.1:8080"
        ],  # a one-element JSON array, as lcobucci writes it for the Panel
        "jti": hashlib.md5(f"{user_id}{server}".encode()).hexdigest(),
        "iat": now,
        "nbf": now - 300,
        "exp": now + lifetime,
        "server_uuid": server,
        "permissions": list(permissions),
        "user_uuid": user_uuid,
        "user_id": user_id,
        "unique_id": "aB3dE5fG7hJ9kL1m",
    }
    claims.update(changes)
    for key in drop:
        del claims[key]
    return claims


def ws_token(
    claims: dict, secret: str = TOKEN, alg: str = "HS256", header: dict | None = None
) -> str:
    """An HS256 JWT built as the Panel builds it (header carries the jti), independent of
    wingslite."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = {"typ": "JWT", "alg": alg, "jti": claims.get("jti", ""), **(header or {})}
    signing = b64(json.dumps(head).encode()) + "." + b64(json.dumps(claims).encode())
    if alg == "none":
        return signing + "."
    digest = hashlib.sha512 if alg == "HS512" else hashlib.sha256
    return signing + "." + b64(hmac.new(secret.encode(), signing.encode(), digest).digest())


def ws_open(daemon: w.Daemon, uuid: str, origin: str | None = "", **kwargs):
    """A ``websockets`` client connection to a server's console (Origin: the Panel by default)."""
    from websockets.sync.client import connect

    origin = daemon.config.remote if origin == "" else origin
    return connect(
        f"ws://127.0.0.1:{daemon.port}/api/servers/{uuid}/ws",
        origin=origin,
        open_timeout=5,
        close_timeout=3,
        proxy=None,
        legacy=True,
        **kwargs,
    )


def ws_send(conn, event: str, *args) -> None:
    conn.send(json.dumps({"event": event, "args": list(args)}))


def ws_event(conn, timeout_s: float = 5) -> tuple[str, list]:
    message = json.loads(conn.recv(timeout=timeout_s))
    return message["event"], message.get("args", [])


def ws_until(conn, event: str, timeout_s: float = 10, match=None) -> list:
    """Read events until ``event`` (whose first arg contains ``match``, if given) arrives; its
    args."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {event!r} event within {timeout_s}s")
        name, args = ws_event(conn, left)
        if name == event and (match is None or (args and match in args[0])):
            return args


def ws_close_code(conn, timeout_s: float = 5) -> int | None:
    """Read until the connection ends: the code of the close frame the server sent (None: none)."""
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            conn.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    except TimeoutError:
        pass
    raise AssertionError(f"the server did not close the websocket within {timeout_s}s")


def ws_authed(daemon: w.Daemon, uuid: str, **claims):
    """An open console, authenticated with a Panel token: (connection, the first events)."""
    conn = ws_open(daemon, uuid)
    ws_send(conn, "auth", ws_token(ws_claims(uuid, **claims)))
    first = [ws_event(conn)]
    if first[0][0] == "auth success":
        first += [ws_event(conn)]  # status
        if first[1] == ("status", ["offline"]):
            first += [ws_event(conn)]  # stats, sent while offline (Wings)
    return conn, first


def ws_frame(
    opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame, masked unless told otherwise (RFC 6455 §5.2)."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWebsocket:
    """A bare-socket websocket client for what real client libraries refuse to send."""

    def __init__(self, daemon: w.Daemon, uuid: str, origin: str | None = None, extra: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        request = (
            f"GET /api/servers/{uuid}/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: "
            "websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: "
            f"{base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: {origin or daemon.config.remote}\r\n{extra}\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed during the handshake"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split()[1])

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._exact(2)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._exact(2), "big")
        elif n == 127:
            n = int.from_bytes(self._exact(8), "big")
        return b0 & 0x0F, self._exact(n)

    def close_code(self) -> int:
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")

    def send_json(self, message: dict) -> None:
        self.sock.sendall(ws_frame(0x1, json.dumps(message).encode()))

    def close(self) -> None:
        self.sock.close()


class ConsoleEnvironment(w.Environment):
    """A console without Docker: start/stop publish states, commands echo, logs are the lines."""

    kind = "test-console"

    def __init__(self, server_uuid, events):
        super().__init__(server_uuid, events)
        self._state = w.OFFLINE
        self.lines: list[str] = []

    @property
    def state(self):
        return self._state

    def _set(self, *states):
        for state in states:
            self._state = state
            self.events.publish("status", state)

    def exists(self):
        return True

    def start(self, config):
        self._set(w.STARTING, w.RUNNING)
        self.output("server ready")

    def stop(self, config, timeout_s):
        if self._state != w.OFFLINE:
            self._set(w.STOPPING, w.OFFLINE)

    def kill(self):
        self._set(w.OFFLINE)

    def output(self, line):
        self.lines.append(line)
        self.events.publish("console output", line)

    def send_command(self, line):
        if self._state == w.OFFLINE:
            raise w.WingsliteError("Cannot send commands to a stopped server instance.", 502)
        self.output(f"> {line}")

    def logs(self, lines):
        return self.lines[-lines:]

    def stats(self):
        return {
            "memory_bytes": 1234,
            "memory_limit_bytes": 0,
            "cpu_absolute": 1.5,
            "network": {"rx_bytes": 7, "tx_bytes": 9},
            "uptime": 10,
        }


@pytest.fixture
def console_node(panel, make_daemon, tmp_path):
    """A daemon whose servers run in ``ConsoleEnvironment``; ``.uuid`` is one of them."""

    def boot(*documents, **overrides):
        for document in documents or (panel_document(),):
            panel.add(document)
        daemon = w.Daemon(
            w.Config(node_config(tmp_path, panel.url, **overrides), "test"),
            environment_factory=lambda server: ConsoleEnvironment(server.uuid, server.events),
        )
        daemon.start()
        make_daemon.daemons.append(daemon)
        assert daemon.wait_booted(10)
        daemon.uuid = sorted(daemon.servers)[0]
        daemon.panel_fake = panel
        return daemon

    return boot


class TestWebsocketFraming:
    """RFC 6455 framing of ``w.WebSocket`` over a real TCP connection, byte by byte where it
    matters."""

    @pytest.fixture
    def pair(self):
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        listener.close()
        ws = w.WebSocket(server_side)
        ws.accept(b"")
        yield ws, client
        ws.join()
        server_side.close()
        client.close()

    @staticmethod
    def read(sock: socket.socket) -> tuple[int, bytes]:
        sock.settimeout(3)
        raw = RawWebsocket.__new__(RawWebsocket)
        raw.sock, raw.buf = sock, b""
        return raw.frame()

    def test_accept_key_is_the_rfc_example(self):
        assert w.websocket_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

    def test_messages_arrive_whole_even_byte_by_byte(self, pair):
        ws, client = pair
        client.sendall(ws_frame(0x1, "héllo".encode()) + ws_frame(0x2, b"\x00\xff"))
        assert ws.receive(2) == "héllo" and ws.receive(2) == b"\x00\xff"
        for byte in ws_frame(0x1, b"x" * 300):  # a 16-bit length, one byte per segment
            client.sendall(bytes([byte]))
        assert ws.receive(2) == "x" * 300
        assert ws.receive(0.05) is None  # nothing more: a timeout, not an error

    def test_fragments_with_a_code_point_split_and_a_ping_between(self, pair):
        ws, client = pair
        raw = "a€b".encode()
        client.sendall(
            ws_frame(0x1, raw[:2], fin=False)
            + ws_frame(0x9, b"hi")
            + ws_frame(0x0, raw[2:3], fin=False)
            + ws_frame(0x0, raw[3:])
        )
        assert ws.receive(2) == "a€b"
        assert self.read(client) == (0xA, b"hi")  # the ping between the fragments got its pong

    def test_the_limits_themselves_are_allowed(self, pair):
        ws, client = pair
        client.sendall(ws_frame(0x1, b"x" * 4096))
        assert ws.receive(2) == "x" * 4096
        client.sendall(
            b"".join(ws_frame(0x1 if i == 0 else 0x0, b"y" * 4096, fin=i == 7) for i in range(8))
        )
        assert ws.receive(2) == "y" * 32768

    @pytest.mark.parametrize(
        "frames, code",
        [
            pytest.param([ws_frame(0x1, b"hi", mask=False)], 1002, id="unmasked"),
            pytest.param([ws_frame(0x1, b"hi", rsv=0x40)], 1002, id="reserved-bit"),
            pytest.param([ws_frame(0x3, b"hi")], 1002, id="unknown-opcode"),
            pytest.param([ws_frame(0x9, b"p", fin=False)], 1002, id="fragmented-ping"),
            pytest.param([ws_frame(0x9, b"p" * 126)], 1002, id="long-ping"),
            pytest.param([ws_frame(0x0, b"orphan")], 1002, id="orphan-continuation"),
            pytest.param(
                [ws_frame(0x1, b"a", fin=False), ws_frame(0x1, b"b")],
                1002,
                id="interleaved-message",
            ),
            pytest.param([ws_frame(0x1, b"x" * 4097)], 1009, id="frame-over-4k"),
            pytest.param(
                [bytes((0x81, 0xFF)) + (1 << 40).to_bytes(8, "big")], 1009, id="huge-length"
            ),
            pytest.param(
                [bytes((0x81, 0xFF)) + (1 << 63).to_bytes(8, "big")], 1002, id="length-msb"
            ),
            pytest.param(
                [ws_frame(0x1 if i == 0 else 0x0, b"x" * 4096, fin=False) for i in range(8)]
                + [ws_frame(0x0, b"x")],
                1009,
                id="message-over-32k",
            ),
            pytest.param([ws_frame(0x1, b"\xff")], 1007, id="invalid-utf8"),
            pytest.param([ws_frame(0x1, b"ok\xed\xa0\x80")], 1007, id="surrogate"),
            pytest.param(
                [ws_frame(0x1, b"\xe2\x82", fin=False), ws_frame(0x0, b"A")],
                1007,
                id="utf8-broken-across-fragments",
            ),
            pytest.param([ws_frame(0x1, b"\xe2\x82")], 1007, id="utf8-truncated"),
            pytest.param([ws_frame(0x8, b"\x03")], 1002, id="close-1-byte"),
            pytest.param([ws_frame(0x8, (1005).to_bytes(2, "big"))], 1002, id="close-1005"),
            pytest.param([ws_frame(0x8, (5000).to_bytes(2, "big"))], 1002, id="close-5000"),
            pytest.param(
                [ws_frame(0x8, (1000).to_bytes(2, "big") + b"\xff")], 1007, id="close-reason-utf8"
            ),
        ],
    )
    def test_violations_close_with_the_rfc_code(self, pair, frames, code):
        ws, client = pair
        client.sendall(b"".join(frames))
        with pytest.raises(w.WebSocketClosed) as info:
            ws.receive(2)
        assert info.value.code == code
        opcode, payload = self.read(client)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == code

    def test_a_client_close_is_echoed_and_tcp_closed(self, pair):
        ws, client = pair
        client.sendall(ws_frame(0x8, (4000).to_bytes(2, "big") + "bye ✓".encode()))
        with pytest.raises(w.WebSocketClosed) as info:
            ws.receive(2)
        assert (info.value.code, info.value.reason) == (4000, "bye ✓")
        assert self.read(client) == (0x8, (4000).to_bytes(2, "big") + "bye ✓".encode())
        assert client.recv(10) == b""

    def test_close_is_on_the_wire_when_it_returns_and_nothing_follows(self, pair):
        ws, client = pair
        ws.close(4409, "suspended")
        client.setblocking(False)
        data = client.recv(100)  # already there: no waiting
        assert data == bytes((0x88, 11)) + (4409).to_bytes(2, "big") + b"suspended"
        assert not ws.send_text("late")
        client.sendall(ws_frame(0x1, b"discarded") + ws_frame(0x8, (4409).to_bytes(2, "big")))
        with pytest.raises(w.WebSocketClosed) as info:
            ws.receive(2)
        assert info.value.code == 4409

    def test_a_client_that_never_answers_the_close_is_dropped(self, pair):
        ws, _ = pair
        ws.close_timeout_s = 0.2
        started = time.monotonic()
        ws.close(1001)
        with pytest.raises(w.WebSocketClosed):
            ws.receive(5)
        assert time.monotonic() - started < 2

    def test_a_client_that_never_reads_costs_neither_memory_nor_a_stuck_close(self):
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws = w.WebSocket(server_side)
        ws.max_queued_bytes = 64 * 1024
        ws.close_lock_timeout_s = 0.2
        ws.accept(b"")
        started = time.monotonic()
        for i in range(5000):
            assert ws.send_text(f"{i:05d}" + "z" * 100)
        assert time.monotonic() - started < 1 and ws.dropped_messages > 0
        started = time.monotonic()
        ws.close(4409)
        assert time.monotonic() - started < 2
        ws.join()
        for s in (listener, server_side, client):
            s.close()


class TestWebsocketJwt:
    SERVER = "9f1c2b7e-3d4a-4e5f-8a6b-0c1d2e3f4a5b"

    def test_a_panel_token_is_accepted(self):
        claims = ws_claims(self.SERVER)
        assert w.decode_jwt(ws_token(claims), TOKEN) == claims
        assert w.decode_jwt(w.encode_jwt(claims, TOKEN), TOKEN.encode()) == claims

    @pytest.mark.parametrize(
        "make, text",
        [
            pytest.param(
                lambda c: ws_token(c, alg="none"),
                "jwt: header contains unexpected algorithm",
                id="alg-none",
            ),
            pytest.param(
                lambda c: ws_token(c, alg="HS512"),
                "jwt: header contains unexpected algorithm",
                id="alg-hs512",
            ),
            pytest.param(
                lambda c: ws_token(c, header={"alg": "hs256"}),
                "jwt: header contains unexpected algorithm",
                id="alg-lowercase",
            ),
            pytest.param(
                lambda c: ws_token(c, secret="not the node token"),
                "jwt: HMAC verification failed",
                id="wrong-key",
            ),
            pytest.param(
                lambda c: ws_token({k: v for k, v in c.items() if k != "exp"}),
                "jwt: exp claim is invalid",
                id="no-exp",
            ),
            pytest.param(
                lambda c: ws_token({**c, "exp": int(time.time()) - 1}),
                "jwt: exp claim is invalid",
                id="expired",
            ),
            pytest.param(
                lambda c: ws_token({**c, "exp": str(c["exp"])}),
                "jwt: exp claim is invalid",
                id="exp-string",
            ),
            pytest.param(lambda c: "a.b", "jwt: malformed token", id="two-parts"),
            pytest.param(lambda c: ws_token(c) + "=", "jwt: malformed token", id="padding"),
            pytest.param(lambda c: "é" + ws_token(c), "jwt: malformed token", id="non-ascii"),
            pytest.param(lambda c: "W10.e30.", "jwt: malformed token", id="header-not-object"),
        ],
    )
    def test_refusals_carry_wings_text(self, make, text):
        with pytest.raises(w.JwtError) as info:
            w.decode_jwt(make(ws_claims(self.SERVER)), TOKEN)
        assert str(info.value) == text

    def test_a_forged_payload_fails_the_signature(self):
        header, _, signature = ws_token(
            ws_claims(self.SERVER, permissions=["websocket.connect"])
        ).split(".")
        forged = (
            base64.urlsafe_b64encode(json.dumps(ws_claims(self.SERVER)).encode())
            .rstrip(b"=")
            .decode()
        )
        with pytest.raises(w.JwtError, match="HMAC"):
            w.decode_jwt(f"{header}.{forged}.{signature}", TOKEN)

    def test_star_grants_everything_but_admin(self):
        star = w.WebsocketToken.from_claims(ws_claims(self.SERVER, permissions=["*"]))
        assert star.can("control.console") and not star.can("admin.websocket.errors")
        admin = w.WebsocketToken.from_claims(
            ws_claims(self.SERVER, permissions=["websocket.connect", "admin.websocket.errors"])
        )
        assert admin.can("admin.websocket.errors") and not admin.can("control.start")
        assert not w.WebsocketToken.from_claims({**ws_claims(self.SERVER), "permissions": "*"}).can(
            "websocket.connect"
        )

    def test_rate_limiter_buckets(self):
        now = [0.0]
        limiter = w.RateLimiter({"auth": (2, 5.0)}, (4, 1.0), clock=lambda: now[0])
        assert [limiter.allow("auth") for _ in range(3)] == [True, True, False]
        assert [limiter.allow("x") for _ in range(5)] == [True] * 4 + [False]
        now[0] = 2.5  # half of auth's window: one more
        assert limiter.allow("auth") and not limiter.allow("auth")


class TestWebsocketConsole:
    def test_the_panel_console_flow(self, console_node):
        daemon = console_node()
        uuid = daemon.uuid
        conn, first = ws_authed(daemon, uuid, permissions=["*", "admin.websocket.errors"])
        with conn:
            assert first[:2] == [("auth success", []), ("status", ["offline"])]
            stats = json.loads(first[2][1][0])
            assert (
                first[2][0] == "stats"
                and stats["network"] == {"rx_bytes": 7, "tx_bytes": 9}
                and stats["state"] == "offline"
            )
            ws_send(conn, "set state", "start")
            assert ws_until(conn, "status", match="running") == ["running"]
            conn.send(json.dumps({"event": "send logs", "args": [None]}))  # what the browser sends
            assert ws_until(conn, "console output", match="server ready") == ["server ready"]
            ws_send(conn, "send command", "say hello")
            assert ws_until(conn, "console output", match="say") == ["> say hello"]
            ws_send(conn, "send stats", None)
            stats = json.loads(ws_until(conn, "stats")[0])
            assert (
                stats["memory_bytes"] == 1234
                and stats["state"] == "running"
                and "disk_bytes" in stats
            )
            daemon.get_server(uuid).env.events.publish(
                "stats", '{"tick":1}'
            )  # the environment's own ticks pass as they are
            assert ws_until(conn, "stats") == ['{"tick":1}']
            ws_send(conn, "set state", "dance")
            assert ws_until(conn, "daemon error") == [
                f"Error Event [{uuid}]: attempting to handle unknown power action 'dance'"
            ]
            ws_send(conn, "set state", "stop")
            assert ws_until(conn, "status", match="offline") == ["offline"]
            session = daemon.sessions.sessions(server_uuid=uuid, kind="websocket")[0]
            assert session.user_uuid == "c0ffee00-1111-4222-8333-444455556666"
        wait_for(
            lambda: daemon.sessions.count(uuid) == 0,
            5,
            what="the closed socket to leave the session table",
        )

    def test_permissions_gate_power_and_commands_and_hide_errors(self, console_node):
        daemon = console_node()
        conn, _ = ws_authed(daemon, daemon.uuid, permissions=["websocket.connect"])
        with conn:
            ws_send(conn, "set state", "start")
            ws_send(conn, "set state", "dance")  # unknown: an error, with Wings' generic text
            assert ws_event(conn) == (
                "daemon error",
                [
                    f"Error Event [{daemon.uuid}]: an unexpected error was encountered while "
                    "handling this request"
                ],
            )
            assert daemon.get_server(daemon.uuid).state == "offline"  # start was ignored silently
            daemon.get_server(daemon.uuid).env.start(None)
            ws_send(conn, "send command", "op me")
            ws_send(conn, "send stats")
            events = [ws_event(conn) for _ in range(4)]
            assert ("console output", ["> op me"]) not in events and events[-1][0] == "stats"

    @pytest.mark.parametrize(
        "claims, make, text",
        [
            pytest.param(
                {},
                lambda c: ws_token(c, secret="wrong"),
                "jwt: HMAC verification failed",
                id="bad-signature",
            ),
            pytest.param(
                {},
                lambda c: ws_token(c, alg="none"),
                "jwt: header contains unexpected algorithm",
                id="alg-none",
            ),
            pytest.param(
                {},
                lambda c: ws_token(c, alg="HS512"),
                "jwt: header contains unexpected algorithm",
                id="alg-hs512",
            ),
            pytest.param({"drop": ["exp"]}, ws_token, "jwt: exp claim is invalid", id="no-exp"),
            pytest.param({"lifetime": -1}, ws_token, "jwt: exp claim is invalid", id="expired"),
            pytest.param(
                {"drop": ["iat"]}, ws_token, "jwt: created too far in past (denylist)", id="no-iat"
            ),
            pytest.param(
                {"iat": int(time.time()) - 86400, "lifetime": 90000},
                ws_token,
                "jwt: created too far in past (denylist)",
                id="before-boot",
            ),
            pytest.param(
                {"permissions": ["control.console"]},
                ws_token,
                "jwt: missing connect permission",
                id="no-connect",
            ),
            pytest.param(
                {"server_uuid": "00000000-0000-4000-8000-000000000000"},
                ws_token,
                "jwt: server uuid mismatch",
                id="other-server",
            ),
            pytest.param({}, lambda c: "not-a-jwt", "jwt: malformed token", id="malformed"),
            pytest.param({}, lambda c: "", "jwt: no jwt present", id="empty"),
        ],
    )
    def test_each_refused_token_gets_wings_text(self, console_node, claims, make, text):
        daemon = console_node()
        with ws_open(daemon, daemon.uuid) as conn:
            ws_send(conn, "auth", make(ws_claims(daemon.uuid, **claims)))
            assert ws_event(conn) == ("jwt error", [f"Error Event [{daemon.uuid}]: {text}"])
            conn.send(json.dumps({"event": "send logs", "args": [None]}))
            assert ws_event(conn) == (
                "jwt error",
                ["jwt: no jwt present"],
            )  # other events: unprefixed

    def test_null_args_garbage_and_binary_are_tolerated(self, console_node):
        daemon = console_node()
        with ws_open(daemon, daemon.uuid) as conn:
            for junk in [
                "nope",
                "[]",
                '{"event": 1}',
                '{"event":"auth","args":[1]}',
                '{"event":"send logs","args":"x"}',
                "[" * 4000,
            ]:
                conn.send(junk)
            conn.send(b"\x00binary")
            conn.send(
                json.dumps({"event": "auth", "args": [ws_token(ws_claims(daemon.uuid)), None]})
            )
            assert ws_event(conn) == ("auth success", [])

    def test_token_expiring_then_expired_then_reauth_on_the_same_socket(
        self, console_node, monkeypatch
    ):
        # three auths within about 3 s: more than Wings' 2 per 5 s, which is not what this test is
        # about
        monkeypatch.setattr(
            w, "WEBSOCKET_EVENT_RATES", {**w.WEBSOCKET_EVENT_RATES, "auth": (3, 5.0)}
        )
        daemon = console_node()
        conn, first = ws_authed(daemon, daemon.uuid, lifetime=62)  # Wings warns with 60 s left
        with conn:
            assert first[0] == ("auth success", [])
            assert ws_until(conn, "token expiring", timeout_s=5) == []
            ws_send(conn, "auth", ws_token(ws_claims(daemon.uuid, lifetime=2)))
            assert ws_event(conn) == ("auth success", [])  # a re-auth sends nothing else
            assert ws_until(conn, "token expiring", timeout_s=3) == []
            assert ws_until(conn, "token expired", timeout_s=5) == []
            ws_send(conn, "send stats")
            assert ws_event(conn) == (
                "jwt error",
                ["jwt: exp claim is invalid"],
            )  # the browser refreshes on this text
            ws_send(conn, "auth", ws_token(ws_claims(daemon.uuid)))
            assert ws_until(conn, "auth success") == []
            ws_send(conn, "send stats")
            assert ws_until(conn, "stats")

    def test_rate_limits_drop_floods_and_say_so_once(self, console_node):
        daemon = console_node()
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            for _ in range(6):
                ws_send(conn, "send stats")
            events = [ws_event(conn)[0] for _ in range(5)]
            assert events.count("stats") == 4 and events.count("daemon error") == 1
            with pytest.raises(TimeoutError):
                conn.recv(timeout=0.3)

    def test_a_flood_of_made_up_event_names_keeps_the_sockets_memory_bounded(self, console_node):
        daemon = console_node()
        with ws_open(daemon, daemon.uuid, max_queue=None) as conn:  # not even authenticated
            for i in range(2000):
                conn.send(json.dumps({"event": f"{i:06d}" + "x" * 2000}))
            assert conn.ping().wait(10)  # the pong comes after every message before it was handled
            console = daemon.sessions.sessions(daemon.uuid, kind="websocket")[0]._close.__self__
            assert len(console._throttled) <= 6 and len(console._limiter._buckets) <= 6
            errors = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    errors += ws_event(conn, 0.3)[0] == "daemon error"
            assert errors <= 2, f"{errors} 'too many' warnings for one flood"

    def test_origin_check(self, console_node):
        from websockets.exceptions import InvalidStatus

        daemon = console_node(allowed_origins=["https://other.example.com"])
        for origin in (daemon.config.remote, "https://other.example.com"):
            with ws_open(daemon, daemon.uuid, origin=origin):
                pass
        for origin in ("https://evil.example.com", None):
            with pytest.raises(InvalidStatus) as info:
                ws_open(daemon, daemon.uuid, origin=origin)
            assert info.value.response.status_code == 403
        assert daemon.sessions.count() == 0

    def test_upgrade_refusals_are_json_errors(self, console_node):
        daemon = console_node()
        status, _, body = api(daemon, "GET", f"/api/servers/{daemon.uuid}/ws", token=None)
        assert status == 400 and "websocket" in body["error"]
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Origin": daemon.config.remote,
        }
        status, got, body = api(
            daemon,
            "GET",
            f"/api/servers/{daemon.uuid}/ws",
            token=None,
            headers={**headers, "Sec-WebSocket-Version": "8"},
        )
        assert status == 426 and got["sec-websocket-version"] == "13" and "13" in body["error"]
        status, _, body = api(
            daemon,
            "GET",
            f"/api/servers/{daemon.uuid}/ws",
            token=None,
            headers={**headers, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "short"},
        )
        assert status == 400 and "Sec-WebSocket-Key" in body["error"]
        status, _, body = api(
            daemon,
            "GET",
            f"/api/servers/{uuidlib.uuid4()}/ws",
            token=None,
            headers={**headers, "Sec-WebSocket-Version": "13"},
        )
        assert status == 404

    def test_thirty_authenticated_sockets_per_server_then_429(self, console_node):
        from websockets.exceptions import InvalidStatus

        daemon = console_node()
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(ws_open(daemon, daemon.uuid)) for _ in range(30)]
            for conn in conns:
                ws_send(conn, "auth", ws_token(ws_claims(daemon.uuid)))
                assert ws_event(conn) == ("auth success", [])
            with pytest.raises(InvalidStatus) as info:
                ws_open(daemon, daemon.uuid)
            assert (
                info.value.response.status_code == 429 and "30" in info.value.response.body.decode()
            )
            conns[0].close()
            wait_for(lambda: daemon.sessions.count(daemon.uuid) == 29, 5, what="a slot to free up")
            with ws_open(daemon, daemon.uuid) as again:
                ws_send(again, "auth", ws_token(ws_claims(daemon.uuid)))
                assert ws_event(again) == ("auth success", [])

    def test_malformed_frames_against_the_daemon_never_hurt_it(self, console_node):
        daemon = console_node()
        for frames, code in [
            ([ws_frame(0x1, b"{}", mask=False)], 1002),
            ([ws_frame(0x1, b"x" * 5000)], 1009),
            ([ws_frame(0x1, b'{"event":"\xe2\x82', fin=False), ws_frame(0x0, b"A")], 1007),
            ([ws_frame(0x1 if i == 0 else 0x0, b"a" * 4096, fin=False) for i in range(9)], 1009),
        ]:
            raw = RawWebsocket(daemon, daemon.uuid)
            assert raw.status == 101
            raw.sock.sendall(b"".join(frames))
            assert raw.close_code() == code
            raw.close()
        wait_for(
            lambda: daemon.sessions.count() == 0, 5, what="every socket to leave the session table"
        )
        assert api(daemon, "GET", "/api/system")[0] == 200

    def test_ws_deny_refuses_that_token_now_and_later(self, console_node):
        daemon = console_node()
        claims = ws_claims(daemon.uuid)
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            assert (
                api(
                    daemon, "POST", f"/api/servers/{daemon.uuid}/ws/deny", {"jtis": [claims["jti"]]}
                )[0]
                == 204
            )
            denied_by = int(time.time())  # the deny happened at or before this second
            assert ws_event(conn) == (
                "jwt error",
                ["jwt: created too far in past (denylist)"],
            )  # the browser re-fetches on this
            ws_send(conn, "send stats")
            assert ws_event(conn) == ("jwt error", ["jwt: created too far in past (denylist)"])
            ws_send(conn, "auth", ws_token(claims))
            assert ws_event(conn) == (
                "jwt error",
                [f"Error Event [{daemon.uuid}]: jwt: created too far in past (denylist)"],
            )
        wait_for(lambda: int(time.time()) > denied_by, 2, what="the next second")
        conn, first = ws_authed(daemon, daemon.uuid)  # a token issued after the deny is fine
        with conn:
            assert first[0] == ("auth success", [])

    def test_deauthorize_user_closes_their_sockets_now_and_refuses_older_tokens(self, console_node):
        second = panel_document()
        daemon = console_node(panel_document(), second)
        one, two = sorted(daemon.servers)
        alice, bob = "a11ce000-1111-4222-8333-444455556666", "b0b00000-1111-4222-8333-444455556666"
        alice_one, _ = ws_authed(daemon, one, user_uuid=alice)
        alice_two, _ = ws_authed(daemon, two, user_uuid=alice)
        bob_one, _ = ws_authed(daemon, one, user_uuid=bob, user_id=2)
        with alice_one, alice_two, bob_one:
            assert (
                api(daemon, "POST", "/api/deauthorize-user", {"user": alice, "servers": [one]})[0]
                == 204
            )
            assert ws_close_code(alice_one) == w.CLOSE_UNAUTHORIZED
            ws_send(alice_two, "send stats")
            ws_send(bob_one, "send stats")
            assert ws_event(alice_two)[0] == "stats" and ws_event(bob_one)[0] == "stats"
            issued = int(
                time.time()
            )  # a token of this second is older than the revocation that follows
            assert (
                api(daemon, "POST", "/api/deauthorize-user", {"user": alice})[0] == 204
            )  # no servers: everywhere
            assert ws_close_code(alice_two) == w.CLOSE_UNAUTHORIZED
        conn, first = ws_authed(daemon, one, user_uuid=alice, iat=issued)
        with conn:
            assert first == [
                ("jwt error", [f"Error Event [{one}]: jwt: created too far in past (denylist)"])
            ]

    @pytest.mark.parametrize("revoke", ["deauthorize", "deny"])
    def test_a_revocation_landing_during_an_auth_still_cuts_the_socket_off(
        self, console_node, monkeypatch, revoke
    ):
        daemon = console_node()
        uuid = daemon.uuid
        claims = ws_claims(uuid)
        original, fired = daemon.revocations.check, []

        def check_then_revoke(*args):
            answer = original(*args)
            if not fired:  # the revocation lands right after this socket's token passed its check
                if revoke == "deauthorize":
                    fired.append(
                        api(
                            daemon,
                            "POST",
                            "/api/deauthorize-user",
                            {"user": claims["user_uuid"], "servers": [uuid]},
                        )[0]
                    )
                else:
                    fired.append(
                        api(
                            daemon,
                            "POST",
                            f"/api/servers/{uuid}/ws/deny",
                            {"jtis": [claims["jti"]]},
                        )[0]
                    )
            return answer

        monkeypatch.setattr(daemon.revocations, "check", check_then_revoke)
        with ws_open(daemon, uuid) as conn:
            ws_send(conn, "auth", ws_token(claims))
            with contextlib.suppress(TimeoutError):
                ws_until(conn, "stats", timeout_s=2)
            assert fired == [204]
            daemon.get_server(uuid).events.publish(
                "console output", "a line the revoked user must not see"
            )
            ws_send(conn, "send stats")  # answered after the line above, if that was forwarded
            seen = []
            with contextlib.suppress(TimeoutError):
                while [e for e, _ in seen].count("jwt error") < 2:
                    seen.append(ws_event(conn, 1))
            assert ("console output", ["a line the revoked user must not see"]) not in seen, seen

    def test_suspension_closes_50_sockets_before_the_204_and_refuses_reconnects(self, console_node):
        from websockets.client import ClientProtocol
        from websockets.frames import Close
        from websockets.protocol import State
        from websockets.typing import Origin
        from websockets.uri import parse_uri

        daemon = console_node(wingslite__websocket_max_per_server=60)
        uuid = daemon.uuid
        token = ws_token(ws_claims(uuid))
        url = f"ws://127.0.0.1:{daemon.port}/api/servers/{uuid}/ws"
        clients = []
        for _ in range(
            50
        ):  # the websockets library's own protocol engine, reading only when told to
            proto = ClientProtocol(parse_uri(url), origin=Origin(daemon.config.remote))
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            proto.send_request(proto.connect())
            sock.sendall(b"".join(proto.data_to_send()))
            while proto.handshake_exc is None and proto.state is State.CONNECTING:
                proto.receive_data(sock.recv(65536))
            assert proto.handshake_exc is None and proto.events_received()
            proto.send_text(json.dumps({"event": "auth", "args": [token]}).encode())
            sock.sendall(b"".join(proto.data_to_send()))
            clients.append((proto, sock))
        for proto, sock in clients:
            while not any(
                getattr(e, "data", b"").startswith(b'{"event":"stats"')
                for e in proto.events_received()
            ):
                proto.receive_data(sock.recv(65536))
        assert daemon.sessions.count(uuid, kind="websocket") == 50

        daemon.panel_fake.servers[uuid]["settings"]["suspended"] = True
        started = time.monotonic()
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        sync_ms = (time.monotonic() - started) * 1000
        for proto, sock in clients:  # what had arrived when the 204 did, without waiting
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while data := sock.recv(65536):
                    proto.receive_data(data)
            assert isinstance(proto.close_rcvd, Close) and proto.close_rcvd.code == 4409, (
                proto.close_rcvd
            )
            sock.close()
        print(f"suspending sync with 50 open websockets: {sync_ms:.1f} ms")

        from websockets.exceptions import ConnectionClosed

        with ws_open(daemon, uuid) as conn:  # the same, still valid token: refused while suspended
            with contextlib.suppress(
                ConnectionClosed
            ):  # the 4409 may already be there before the auth
                ws_send(conn, "auth", token)
            assert ws_close_code(conn) == 4409
        daemon.panel_fake.servers[uuid]["settings"]["suspended"] = False
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        with ws_open(daemon, uuid) as conn:
            ws_send(conn, "auth", token)
            assert ws_event(conn) == ("auth success", [])

    def test_deleting_the_server_closes_its_sockets_with_1001(self, console_node):
        daemon = console_node()
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            assert api(daemon, "DELETE", f"/api/servers/{daemon.uuid}")[0] == 204
            assert ws_close_code(conn) == 1001

    def test_stopping_the_daemon_closes_its_sockets(self, console_node):
        daemon = console_node()
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            daemon.stop()
            assert ws_close_code(conn) == 1001

    def test_clients_that_never_read_cannot_hold_up_the_suspension(self, console_node):
        daemon = console_node()
        uuid = daemon.uuid
        stuck = []
        for _ in range(5):
            raw = RawWebsocket(daemon, uuid)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.send_json({"event": "auth", "args": [ws_token(ws_claims(uuid))]})
            stuck.append(raw)
        reader = ws_open(
            daemon, uuid, max_queue=None
        )  # this one keeps reading, however much arrives
        with reader:
            ws_send(
                reader,
                "auth",
                ws_token(
                    ws_claims(uuid, user_uuid="b0b00000-1111-4222-8333-444455556666", user_id=2)
                ),
            )
            wait_for(
                lambda: len([s for s in daemon.sessions.sessions(uuid) if s.user_uuid]) == 6,
                5,
                what="six authenticated sockets",
            )
            server = daemon.get_server(uuid)
            # 8 MB, paced so the writers get to send: the stuck clients' buffers fill, writers block
            for i in range(1000):
                server.events.publish("console output", f"{i:04d} " + "x" * 8000)
                if i % 20 == 0:
                    time.sleep(0.001)
            daemon.panel_fake.servers[uuid]["settings"]["suspended"] = True
            started = time.monotonic()
            assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
            sync_s = time.monotonic() - started
            assert sync_s < 1, f"the suspending sync took {sync_s:.2f}s"
            assert ws_close_code(reader) == 4409
        wait_for(lambda: daemon.sessions.count(uuid) == 0, 5, what="every socket to be gone")
        for raw in stuck:
            raw.close()

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        data=st.binary(max_size=64)
        | st.lists(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3]), max_size=4).map(bytes)
    )
    def test_random_bytes_after_the_handshake_never_raise_anything_else(self, data):
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        ws = w.WebSocket(server_side)
        ws.accept(b"")
        try:
            client.sendall(data + ws_frame(0x1, b"{}"))
            for _ in range(3):
                try:
                    ws.receive(0.01)
                except w.WebSocketClosed as exc:
                    assert exc.code in (1002, 1007, 1009) or 1000 <= exc.code <= 4999
                    break
        finally:
            ws.join()
            for s in (listener, server_side, client):
                s.close()


@pytest.mark.docker
class TestWebsocketDocker:
    def test_console_flow_against_a_running_container(self, docker_daemon):
        daemon, uuid = docker_daemon.daemon, docker_daemon.uuid
        conn, first = ws_authed(daemon, uuid)
        with conn:
            assert first == [("auth success", []), ("status", ["running"])]
            ws_send(conn, "send logs", None)
            assert ws_until(conn, "console output", match="booting hello")
            ws_send(
                conn, "send command", "echo websocket-$((40 + 2))"
            )  # the output differs from the echoed input
            assert ws_until(conn, "console output", match="websocket-42") == ["websocket-42"]
            stats = json.loads(
                ws_until(conn, "stats", timeout_s=10)[0]
            )  # Docker's own samples, about 1 per second
            assert stats["memory_bytes"] > 0 and stats["network"].keys() >= {"rx_bytes", "tx_bytes"}
            ws_send(conn, "set state", "stop")
            assert ws_until(conn, "status", match="stopping")
            assert ws_until(conn, "status", match="offline", timeout_s=30)
            ws_send(conn, "set state", "start")
            assert ws_until(conn, "status", match="running", timeout_s=30)
            assert ws_until(conn, "console output", match="ready")


BROWSER_PAGE = """<!doctype html><html><body><pre id="console"></pre><script>
// What the Panel's browser client does (resources/scripts/plugins/Websocket.ts,
// WebsocketHandler.tsx): auth on open, then "send logs" and "send stats" with [null] args,
// console output into the terminal.
const out = document.getElementById("console"), seen = [];
const ws = new WebSocket(SOCKET);
const send = (event, ...args) =>
  ws.send(JSON.stringify({event, args: args.length ? args : [null]}));
const report = (result) =>
  fetch("/report", {method: "POST", body: JSON.stringify({result, seen, text: out.textContent})});
ws.onopen = () => send("auth", TOKEN);
ws.onmessage = (e) => {
  const {event, args} = JSON.parse(e.data);
  seen.push(event);
  if (event === "auth success") { send("send logs"); send("send stats"); }
  if (event === "console output") { out.textContent += args[0].replace(/\\n$/, "") + "\\n"; }
  if (event === "stats") {
    const s = JSON.parse(args[0]);
    out.textContent += "net " + s.network.rx_bytes + "\\n";
  }
  if (out.textContent.includes("server ready") && out.textContent.includes("net ")) {
    send("send command", "from chromium");
  }
  if (out.textContent.includes("> from chromium")) { report("ok"); ws.close(1000); }
};
ws.onerror = () => report("error");
ws.onclose = (e) => { if (e.code !== 1000) report("closed " + e.code); };
</script></body></html>"""


def browser_console_report(
    console_node, tmp_path, scheme: str = "ws", chromium_flags=(), **node_overrides
) -> dict:
    """Serve ``BROWSER_PAGE`` from an origin of its own, open it in headless Chromium against a
    console node's websocket (as the Panel's browser does) and return what the page reported."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    reports: list[dict] = []
    got = threading.Event()
    holder: dict = {}

    class Page(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = (
                BROWSER_PAGE.replace("SOCKET", json.dumps(holder["socket"]))
                .replace("TOKEN", json.dumps(holder["token"]))
                .encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            reports.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            got.set()

    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    page_origin = f"http://127.0.0.1:{page.server_address[1]}"
    try:
        # the page is not the Panel: allowed by allowed_origins
        daemon = console_node(allowed_origins=[page_origin], **node_overrides)
        daemon.get_server(daemon.uuid).env.start(None)
        holder.update(
            socket=f"{scheme}://127.0.0.1:{daemon.port}/api/servers/{daemon.uuid}/ws",
            token=ws_token(ws_claims(daemon.uuid)),
        )
        browser = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}",
                *chromium_flags,
                page_origin + "/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert got.wait(60), "the page never reported"
        finally:
            browser.kill()
            browser.wait(10)
    finally:
        page.shutdown()
        page.server_close()
    return reports[0]


class TestWebsocketBrowser:
    def test_headless_chromium_speaks_the_panel_flow(self, console_node, tmp_path):
        report = browser_console_report(console_node, tmp_path)
        assert report["result"] == "ok", report
        assert report["seen"][:3] == ["auth success", "status", "console output"]
        assert (
            "server ready" in report["text"]
            and "net 7" in report["text"]
            and "> from chromium" in report["text"]
        )


class TestWebsocketTokenRecovery:
    """A revoked token never strands the Panel's console (Wings' SendJson; the Panel's
    WebsocketHandler.tsx answers a reconnect "jwt error" by fetching a token and sending auth)."""

    RECONNECT_ERRORS = ("jwt: exp claim is invalid", "jwt: created too far in past (denylist)")

    def test_every_event_to_a_revoked_socket_is_a_jwt_error(self, console_node):
        daemon = console_node()
        uuid = daemon.uuid
        conn, first = ws_authed(daemon, uuid)
        with conn:
            assert first[0] == ("auth success", [])
            jti = ws_claims(uuid)["jti"]
            assert api(daemon, "POST", f"/api/servers/{uuid}/ws/deny", {"jtis": [jti]})[0] == 204
            denied = ("jwt error", ["jwt: created too far in past (denylist)"])
            assert ws_event(conn) == denied
            server = daemon.get_server(uuid)
            for line in ("one", "two"):  # each would-be event is a new nudge to fetch a token
                server.events.publish("console output", f"not for a revoked token: {line}")
                assert ws_event(conn) == denied

    def test_after_a_deny_the_panels_page_gets_its_console_back(self, console_node):
        daemon = console_node()
        uuid = daemon.uuid
        fetched: list[int] = []
        refused = []

        def fetch_token() -> str:  # the Panel's GET .../websocket: a token with a fresh iat
            time.sleep(0.05)  # its round trip
            # The first three are issued in the deny's own second (iat has whole seconds), as
            # when the page asks at once; later ones carry the time they are issued.
            iat = deny_second if len(fetched) < 3 else int(time.time())
            fetched.append(iat)
            return ws_token(ws_claims(uuid, iat=iat))

        conn, first = ws_authed(daemon, uuid)
        with conn:
            assert first[0] == ("auth success", [])
            jti = ws_claims(uuid)["jti"]  # the Panel's jti is the same for every token of a user
            deny_second = int(time.time())  # read before the deny: never after its second
            assert api(daemon, "POST", f"/api/servers/{uuid}/ws/deny", {"jtis": [jti]})[0] == 204
            deadline = time.monotonic() + 5
            while True:  # the page's handler: on a reconnect jwt error, fetch and auth again
                event, args = ws_event(conn, max(0.05, deadline - time.monotonic()))
                if event == "auth success":
                    break
                assert event != "daemon error", args  # e.g. the auth limit dropping the auth
                if event == "jwt error" and any(e in args[0] for e in self.RECONNECT_ERRORS):
                    if args[0].startswith("Error Event"):  # the answer to an auth
                        refused.append(args[0])
                    ws_send(conn, "auth", fetch_token())
            assert len(refused) >= 3 and fetched[:3] == [deny_second] * 3, (refused, fetched)
            daemon.get_server(uuid).events.publish("console output", "the console is back")
            assert ws_until(conn, "console output", match="the console is back")


class TestWebsocketStrangers:
    """Sockets that never authenticate cost the owner nothing and their sender little."""

    def test_a_socket_without_a_token_is_closed_4401_after_five_seconds(self, console_node):
        daemon = console_node()
        with ws_open(daemon, daemon.uuid) as conn:
            assert ws_close_code(conn, timeout_s=15) == 4401
        wait_for(lambda: daemon.sessions.count(daemon.uuid) == 0, what="the session to leave")

    def test_strangers_do_not_take_the_owners_slots(self, console_node):
        daemon = console_node(wingslite__websocket_max_per_server=3)
        with contextlib.ExitStack() as stack:
            for _ in range(6):
                stack.enter_context(ws_open(daemon, daemon.uuid))
            conn, first = ws_authed(daemon, daemon.uuid)
            with conn:
                assert first[0] == ("auth success", [])

    def test_unauthenticated_sockets_are_capped_per_ip(self, console_node, caplog):
        from websockets.exceptions import InvalidStatus

        daemon = console_node(wingslite__websocket_unauthenticated_per_ip=3)
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(ws_open(daemon, daemon.uuid)) for _ in range(3)]
            with caplog.at_level(logging.INFO, logger="wingslite"):
                for _ in range(3):
                    with pytest.raises(InvalidStatus) as info:
                        ws_open(daemon, daemon.uuid)
                    assert info.value.response.status_code == 429
                    assert b"not authenticated yet" in info.value.response.body
            assert len([r for r in caplog.records if "refusing websockets" in r.getMessage()]) == 1
            ws_send(conns[0], "auth", ws_token(ws_claims(daemon.uuid)))
            assert ws_event(conns[0]) == ("auth success", [])
            with ws_open(daemon, daemon.uuid) as again:  # the authenticated one gave its slot back
                ws_send(again, "auth", ws_token(ws_claims(daemon.uuid)))
                assert ws_event(again) == ("auth success", [])

    def test_the_server_limit_counts_sockets_as_they_authenticate(self, console_node):
        daemon = console_node(wingslite__websocket_max_per_server=2)
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(ws_open(daemon, daemon.uuid)) for _ in range(3)]
            for conn in conns[:2]:
                ws_send(conn, "auth", ws_token(ws_claims(daemon.uuid)))
                assert ws_event(conn) == ("auth success", [])
            ws_send(conns[2], "auth", ws_token(ws_claims(daemon.uuid)))
            assert ws_close_code(conns[2]) == 1013
            assert daemon.sessions.count(daemon.uuid) == 2


# SFTP #############################################################################################


try:  # optional, like in the daemon: without it the SFTP tests are skipped, the rest still run
    import paramiko
except ImportError:
    paramiko = None
needs_paramiko = pytest.mark.skipif(paramiko is None, reason="paramiko is not installed")

SFTP_USER = "alice"
SFTP_PASSWORD = "correct horse"
SFTP_LIMIT_MB = 1


def _sftp_daemon(panel, make_daemon, perms=("*",), disk_mb=SFTP_LIMIT_MB, **overrides):
    """A daemon with SFTP on a free loopback port and one server (1 MiB disk) alice may log into."""
    uuid = panel.add(panel_document(build__disk_space=disk_mb))
    panel.sftp_users[(SFTP_USER, SFTP_PASSWORD)] = list(perms)
    settings = {
        "wingslite__sftp_enabled": True,
        "system__sftp__bind_address": "127.0.0.1",
        "system__sftp__bind_port": 0,
    }
    daemon = make_daemon(panel, **{**settings, **overrides})
    server = daemon.get_server(uuid)
    server.fs.ensure()
    return daemon, server


@contextlib.contextmanager
def sftp_client(daemon, server, user=SFTP_USER, password=SFTP_PASSWORD, key=None, source_ip=None):
    """A real paramiko SFTP client logged in as ``<user>.<server id>`` (from ``source_ip``, a
    loopback address such as 127.0.0.2, when given)."""
    address = ("127.0.0.1", daemon.sftp.port)
    transport = paramiko.Transport(
        socket.create_connection(address, source_address=(source_ip, 0)) if source_ip else address
    )
    try:
        transport.connect(
            username=f"{user}.{server.uuid[:8]}", password=None if key else password, pkey=key
        )
        client = paramiko.SFTPClient.from_transport(transport)
        yield client
    finally:
        transport.close()


def openssh_sftp(daemon, server, commands, password=SFTP_PASSWORD, key_file=None, cwd=None):
    """OpenSSH ``sftp -b`` (password through sshpass, or a key): returns the finished process."""
    batch = Path(cwd or ".") / "batch.txt"
    batch.write_text("\n".join(commands) + "\n")
    argv = [
        "sftp",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]
    if key_file:
        argv += ["-o", "PasswordAuthentication=no", "-o", "IdentitiesOnly=yes", "-i", str(key_file)]
    else:
        # sftp -b turns BatchMode on (no password prompt); an earlier -o wins, so sshpass can type
        # it.
        argv = [
            "sshpass",
            "-p",
            password,
            *argv,
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
        ]
    argv += [
        "-b",
        str(batch),
        "-P",
        str(daemon.sftp.port),
        f"{SFTP_USER}.{server.uuid[:8]}@127.0.0.1",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


def sftp_refused(action, *args) -> bool:
    """True when an SFTP operation was refused with "permission denied"."""
    try:
        action(*args)
    except PermissionError:
        return True
    return False


def tree(root: Path) -> dict:
    """Every entry under ``root`` (links not followed): path -> (mode, size, link target)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, link)
    return out


class TestJail:
    """The path jail on its own (no paramiko needed): what SFTP's tests cannot reach directly."""

    @pytest.fixture
    def jail(self, tmp_path):
        root = tmp_path / "root"
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_text("hello")
        (tmp_path / "outside").mkdir()
        with w.Jail(root) as jail:
            yield jail, root

    @staticmethod
    def read(jail, path):
        fd = jail.open(path, os.O_RDONLY)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    def test_links_inside_are_followed_and_links_out_never(self, jail):
        jail, root = jail
        os.symlink("d", root / "dl")
        os.symlink("../d/f", root / "d" / "fl")
        os.symlink("..", root / "d" / "up")
        os.symlink("../..", root / "d" / "up2")
        os.symlink("../outside", root / "out")
        assert self.read(jail, "dl/fl") == b"hello"
        assert sorted(name for name, _ in jail.listdir("d/up")) == sorted(os.listdir(root))
        for path in ("d/up2", "d/up2/outside", "out", "d/up/out"):
            with pytest.raises(w.PathEscape):
                jail.stat(path)
        os.symlink("loop", root / "loop")
        with pytest.raises(OSError) as err:
            self.read(jail, "loop")
        assert err.value.errno == errno.ELOOP

    def test_nul_bytes_fifos_and_directories_are_not_files(self, jail):
        jail, root = jail
        os.mkfifo(root / "fifo")
        with pytest.raises(w.PathEscape):
            jail.stat("d/f\x00.txt")
        for path in ("fifo", "d"):  # a FIFO must not hang the open, a directory is no file
            with pytest.raises(OSError):
                jail.open(path, os.O_RDONLY)

    def test_a_rename_may_not_carry_a_link_out_of_reach(self, jail):
        jail, root = jail
        (root / "d" / "e").mkdir()
        os.symlink("../../d/f", root / "d" / "e" / "l")  # fine where it is ...
        assert self.read(jail, "d/e/l") == b"hello"
        with pytest.raises(w.PathEscape):  # ... but from the root it would climb out
            jail.rename("d/e/l", "l")
        assert os.path.islink(root / "d" / "e" / "l")

    def test_a_link_is_checked_from_where_it_really_sits(self, jail):
        jail, root = jail
        (root / "a" / "b").mkdir(parents=True)
        jail.symlink("../..", "a/b/up")  # lands on the root: fine
        before = tree(root)
        # written as a/b/up/evil, it really sits in the root: two levels up is outside
        for target in ("../../outside", "../outside", "x/../../..", "d/../../outside", "/etc"):
            with pytest.raises(w.PathEscape):
                jail.symlink(target, "a/b/up/evil")
        assert tree(root) == before and not os.path.lexists(root / "evil")
        os.symlink("../outside", root / "game-made")  # a link the game made, pointing out
        with pytest.raises(w.PathEscape):
            jail.symlink("game-made/x", "through")  # lands wherever that one leads: outside
        jail.symlink("up/d/f", "a/b/ok")
        assert self.read(jail, "a/b/ok") == b"hello"

    def test_a_directory_move_that_would_carry_a_link_out_is_refused(self, jail):
        jail, root = jail
        (root / "a" / "b" / "c").mkdir(parents=True)
        jail.symlink("../../d/f", "a/b/l")  # from a/b: two up is the root, then d/f
        jail.symlink("../f", "a/b/c/inner")  # stays inside the moved directory
        before = tree(root)
        with pytest.raises(w.PathEscape):
            jail.rename("a/b", "b")  # from /b, two up is outside
        assert tree(root) == before
        jail.rename("a/b", "d/b")  # as deep as before: still lands inside
        assert self.read(jail, "d/b/l") == b"hello"

    def test_walk_reports_links_as_links_and_never_follows_them(self, jail):
        jail, root = jail
        os.symlink("../outside", root / "out")
        os.symlink("d", root / "dl")
        (root / "d" / "e").mkdir()
        (root / "d" / "e" / "g").write_text("g")
        entries = {e.path: e for e in jail.walk()}
        assert set(entries) == {"/d", "/d/f", "/d/e", "/d/e/g", "/out", "/dl"}
        assert entries["/out"].is_symlink and entries["/dl"].is_symlink
        assert [e.path for e in jail.walk("d/e")] == ["/d/e/g"]
        fs = w.Filesystem(root)
        assert fs.recalculate() == len("hello") + 1

    def test_a_walk_racing_a_directory_swapped_for_a_link_never_leaves(self, jail, tmp_path):
        jail, root = jail
        outside = tmp_path / "outside"
        with open(outside / "outside-only", "wb") as fh:
            fh.truncate(1 << 40)  # 1 TiB apparent: counted once, the figure would show it
        (root / "d" / "sub").mkdir()
        os.symlink(str(outside), root / "link")
        libc = ctypes.CDLL(None, use_errno=True)
        stop = threading.Event()

        def swap():
            while not stop.is_set():  # "d" and "link" trade places, atomically (RENAME_EXCHANGE)
                libc.renameat2(-100, bytes(root / "d"), -100, bytes(root / "link"), 2)

        swapper = threading.Thread(target=swap)
        swapper.start()
        seen, figures = set(), []
        try:
            fs = w.Filesystem(root)
            for _ in range(300):
                seen.update(
                    e.path.rsplit("/", 1)[-1] for e in jail.walk(on_error=lambda p, e: None)
                )
                figures.append(fs.recalculate())
        finally:
            stop.set()
            swapper.join()
        assert "outside-only" not in seen and "f" in seen
        assert max(figures) < 1 << 20

    def test_the_denylist_is_checked_where_a_link_leads(self, tmp_path):
        root = tmp_path / "root"
        (root / "cfg").mkdir(parents=True)
        (root / "cfg" / "token.secret").write_text("s")
        os.symlink("cfg/token.secret", root / "alias")
        with w.Jail(root, is_denied=lambda p: p.endswith(".secret")) as jail:
            for action in (
                lambda: jail.stat("alias"),
                lambda: jail.open("cfg/token.secret", os.O_RDONLY),
                lambda: jail.remove("cfg/token.secret"),
            ):
                with pytest.raises(PermissionError):
                    action()
            jail.remove("alias")  # the link itself is not denied
        assert (root / "cfg" / "token.secret").exists()


@needs_paramiko
class TestSftpLogin:
    def test_a_taken_sftp_port_turns_sftp_off_and_the_api_still_serves(self, panel, make_daemon):
        panel.add(panel_document())
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            daemon = make_daemon(
                panel,
                wingslite__sftp_enabled=True,
                system__sftp__bind_address="127.0.0.1",
                system__sftp__bind_port=port,
            )
            assert daemon.sftp is None
            status, _, body = api(daemon, "GET", "/api/system")
            assert status == 200 and body["wingslite"]["sftp"] is False and len(daemon.servers) == 1

    def test_paramiko_is_loaded_by_the_first_connection_not_before(self, panel, tmp_path):
        """An idle node listens on a plain socket: neither the Docker SDK nor the listener
        imports paramiko (or cryptography) until a client connects."""
        raw = node_config(
            tmp_path,
            panel.url,
            wingslite__sftp_enabled=True,
            system__sftp__bind_address="127.0.0.1",
            system__sftp__bind_port=0,
        )
        script = f"""
import socket, sys
sys.path.insert(0, {str(HERE)!r})
import wingslite as w
w._docker()
daemon = w.Daemon(w.Config({raw!r}, "test"))
daemon.start()
assert daemon.wait_booted(10) and daemon.sftp is not None
before = sorted(m for m in sys.modules if m.split(".")[0] in ("paramiko", "cryptography"))
with socket.create_connection(("127.0.0.1", daemon.sftp.port), timeout=10) as conn:
    banner = conn.makefile("rb").readline()
print(before, "paramiko" in sys.modules, banner.decode().strip())
daemon.stop()
"""
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["[]", "True", f"SSH-2.0-wingslite_{w.VERSION}"]

    def test_host_key_is_ed25519_made_once_and_private(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        path = daemon.config.root_dir / ".sftp" / "id_ed25519"
        with sftp_client(daemon, server) as client:  # the first connection makes the key
            first = client.get_channel().get_transport().get_remote_server_key()
        assert first.get_name() == "ssh-ed25519"
        assert path.stat().st_mode & 0o777 == 0o600
        daemon.stop()
        again = make_daemon(
            panel,
            wingslite__sftp_enabled=True,
            system__sftp__bind_address="127.0.0.1",
            system__sftp__bind_port=0,
        )
        with sftp_client(again, again.get_server(server.uuid)) as client:
            assert client.get_channel().get_transport().get_remote_server_key() == first

    def test_password_login_is_checked_by_the_panel(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []
            assert daemon.sessions.count(server.uuid, "sftp") == 1
        wait_for(
            lambda: daemon.sessions.count(server.uuid, "sftp") == 0,
            what="the session to leave the table",
        )
        sent = [r for r in panel.requests if r.path == "/api/remote/sftp/auth"]
        assert sent, "the Panel was not asked"

    def test_public_key_login_sends_the_authorized_keys_line(self, panel, make_daemon, tmp_path):
        daemon, server = _sftp_daemon(panel, make_daemon)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True
        )
        key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id"))
        panel.sftp_users[(SFTP_USER, f"{key.get_name()} {key.get_base64()}")] = ["*"]
        with sftp_client(daemon, server, key=key) as client:
            client.mkdir("from-paramiko")
        (tmp_path / "work").mkdir()
        done = openssh_sftp(
            daemon,
            server,
            ["mkdir from-openssh", "ls"],
            key_file=tmp_path / "id",
            cwd=tmp_path / "work",
        )
        assert done.returncode == 0, done.stderr
        assert {"from-paramiko", "from-openssh"} <= set(os.listdir(server.fs.root))

    def test_bad_logins_are_refused(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        for user, password in [(SFTP_USER, "wrong"), ("mallory", SFTP_PASSWORD)]:
            with pytest.raises(paramiko.AuthenticationException):
                with sftp_client(daemon, server, user=user, password=password):
                    pass
        asked = panel.calls.get("/api/remote/sftp/auth", 0)
        transport = paramiko.Transport(("127.0.0.1", daemon.sftp.port))
        with pytest.raises(paramiko.AuthenticationException):
            transport.connect(
                username=SFTP_USER, password=SFTP_PASSWORD
            )  # no server id: refused unasked
        transport.close()
        assert panel.calls.get("/api/remote/sftp/auth", 0) == asked
        assert daemon.sessions.count() == 0

    def test_openssh_password_login_and_bad_password(self, panel, make_daemon, tmp_path):
        daemon, server = _sftp_daemon(panel, make_daemon)
        (server.fs.root / "motd.txt").write_text("hello from the node\n")
        (tmp_path / "upload.txt").write_text("uploaded\n")
        done = openssh_sftp(
            daemon,
            server,
            [
                "ls",
                "get motd.txt",
                "put upload.txt",
                "mkdir plugins",
                "rename upload.txt plugins/up.txt",
                "rm motd.txt",
                "ls -l plugins",
            ],
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "motd.txt").read_text() == "hello from the node\n"
        assert (server.fs.root / "plugins" / "up.txt").read_text() == "uploaded\n"
        assert not (server.fs.root / "motd.txt").exists()
        refused = openssh_sftp(daemon, server, ["ls"], password="wrong", cwd=tmp_path)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr

    def test_failed_logins_are_limited_per_client_ip(self, panel, make_daemon):
        daemon, server = _sftp_daemon(
            panel, make_daemon, wingslite__sftp_login_attempts_per_minute=3
        )
        for _ in range(3):
            with pytest.raises(paramiko.AuthenticationException):
                with sftp_client(daemon, server, password="guess"):
                    pass
        asked = panel.calls.get("/api/remote/sftp/auth", 0)
        with pytest.raises(paramiko.AuthenticationException):
            with sftp_client(daemon, server):  # the right password, but this address is over budget
                pass
        assert panel.calls.get("/api/remote/sftp/auth", 0) == asked

    def test_panel_down_refuses_logins_and_nothing_else(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, remote_query__timeout=1)
        panel.down = True
        started = time.monotonic()
        with pytest.raises(paramiko.AuthenticationException):
            with sftp_client(daemon, server):
                pass
        assert time.monotonic() - started < 10
        assert api(daemon, "GET", "/api/system")[0] == 200
        panel.down = False
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []

    def test_only_the_sftp_subsystem_is_served(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        transport = paramiko.Transport(("127.0.0.1", daemon.sftp.port))
        try:
            transport.connect(username=f"{SFTP_USER}.{server.uuid[:8]}", password=SFTP_PASSWORD)
            for request in (
                lambda ch: ch.exec_command("id"),
                lambda ch: ch.invoke_shell(),
                lambda ch: ch.invoke_subsystem("netconf"),
            ):
                channel = transport.open_session()
                with pytest.raises(paramiko.SSHException):
                    request(channel)
                channel.close()
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 0))
        finally:
            transport.close()

    def test_malformed_packets_and_floods_leave_the_daemon_serving(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, wingslite__sftp_max_connections=4)
        port = daemon.sftp.port
        with socket.create_connection(("127.0.0.1", port)) as sock:  # garbage after a valid banner
            sock.recv(256)
            sock.sendall(b"SSH-2.0-fuzz\r\n" + os.urandom(4096) + b"\x00\x00\xff\xff" * 64)
        with socket.create_connection(("127.0.0.1", port)) as sock:  # no banner at all
            sock.sendall(b"\x00" * 65536)
        # an SFTP packet claiming 2 GiB after a good login
        transport = paramiko.Transport(("127.0.0.1", port))
        transport.connect(username=f"{SFTP_USER}.{server.uuid[:8]}", password=SFTP_PASSWORD)
        channel = transport.open_session()
        channel.invoke_subsystem("sftp")
        channel.sendall(b"\x7f\xff\xff\xff" + b"\x01" * 1024)
        wait_for(
            lambda: channel.closed or channel.exit_status_ready() or channel.eof_received,
            what="the channel to be closed",
        )
        transport.close()
        # the connection bound: idle connections fill it, the next one is closed at once
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            wait_for(lambda: daemon.sftp.connections() == 4, what="four open connections")
            with socket.create_connection(("127.0.0.1", port)) as extra:
                extra.settimeout(5)
                assert extra.recv(256) == b""
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: daemon.sftp.connections() == 0, what="the idle connections to end")
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []

    def test_without_paramiko_the_daemon_says_once_that_sftp_is_off(self, panel, tmp_path):
        config = node_config(
            tmp_path, panel.url, wingslite__sftp_enabled=True, system__sftp__bind_port=0
        )
        (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
        script = (
            "import sys, logging, io; sys.modules['paramiko'] = None\n"
            "stream = io.StringIO(); "
            "logging.getLogger('wingslite').addHandler(logging.StreamHandler(stream))\n"
            "logging.getLogger('wingslite').setLevel(logging.INFO)\n"
            "import wingslite as w\n"
            f"d = w.Daemon(w.load_config({str(tmp_path / 'config.yml')!r})); d.start(); assert "
            "d.wait_booted(10)\n"
            "assert d.sftp is None; d.stop(); print(stream.getvalue())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=HERE
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("SFTP is off") == 1


# (operation name, the permission it needs, what it does on a client whose files exist)
SFTP_OPERATIONS = [
    ("list", "file.read", lambda c: c.listdir("/")),
    ("stat", "file.read", lambda c: c.stat("data.txt")),
    ("download", "file.read-content", lambda c: c.open("data.txt").read()),
    ("create", "file.create", lambda c: c.open("new.txt", "w").close()),
    ("mkdir", "file.create", lambda c: c.mkdir("newdir")),
    ("symlink", "file.create", lambda c: c.symlink("data.txt", "link.txt")),
    ("overwrite", "file.update", lambda c: c.open("data.txt", "w").close()),
    ("rename", "file.update", lambda c: c.rename("data.txt", "renamed.txt")),
    ("chmod", "file.update", lambda c: c.chmod("data.txt", 0o600)),
    ("delete", "file.delete", lambda c: c.remove("data.txt")),
    ("rmdir", "file.delete", lambda c: c.rmdir("olddir")),
]
SFTP_PERMISSIONS = ["file.read", "file.read-content", "file.create", "file.update", "file.delete"]


@needs_paramiko
class TestSftpPermissions:
    @pytest.fixture
    def node(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, perms=())
        return panel, daemon, server

    def _fresh(self, server):
        for name in os.listdir(server.fs.root):
            path = server.fs.root / name
            os.rmdir(path) if path.is_dir() and not path.is_symlink() else os.unlink(path)
        (server.fs.root / "data.txt").write_text("data")
        (server.fs.root / "olddir").mkdir()

    def test_each_operation_needs_its_permission(self, node):
        panel, daemon, server = node
        for name, needed, operation in SFTP_OPERATIONS:
            others = [p for p in SFTP_PERMISSIONS if p != needed]
            panel.sftp_users[(SFTP_USER, SFTP_PASSWORD)] = others
            self._fresh(server)
            before = (
                sorted(os.listdir(server.fs.root)),
                (server.fs.root / "data.txt").stat().st_mode,
            )
            with sftp_client(daemon, server) as client:
                assert sftp_refused(operation, client), f"{name} was allowed without {needed}"
            assert (
                sorted(os.listdir(server.fs.root)),
                (server.fs.root / "data.txt").stat().st_mode,
            ) == before, name
            assert (server.fs.root / "data.txt").read_text() == "data", name
            for granted in ([needed], ["*"]):
                panel.sftp_users[(SFTP_USER, SFTP_PASSWORD)] = granted
                self._fresh(server)
                with sftp_client(daemon, server) as client:
                    assert not sftp_refused(operation, client), f"{name} was refused with {granted}"

    def test_read_only_node_refuses_every_change(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, system__sftp__read_only=True)
        (server.fs.root / "data.txt").write_text("data")
        with sftp_client(daemon, server) as client:
            assert client.open("data.txt").read() == b"data"
            for operation in (
                lambda: client.open("new.txt", "w"),
                lambda: client.remove("data.txt"),
                lambda: client.mkdir("d"),
            ):
                with pytest.raises(IOError):
                    operation()
        assert sorted(os.listdir(server.fs.root)) == ["data.txt"]

    def test_the_egg_denylist_holds_on_every_operation(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        doc = panel.servers[server.uuid]
        doc["settings"]["egg"]["file_denylist"] = ["*.secret", "/locked/"]
        assert api(daemon, "POST", f"/api/servers/{server.uuid}/sync")[0] == 204
        (server.fs.root / "locked").mkdir()
        (server.fs.root / "locked" / "a.txt").write_text("a")
        (server.fs.root / "key.secret").write_text("k")
        os.symlink("key.secret", server.fs.root / "alias.txt")
        with sftp_client(daemon, server) as client:
            for operation in (
                lambda: client.open("key.secret").read(),
                lambda: client.open("alias.txt").read(),  # through a symlink
                lambda: client.open("new.secret", "w"),
                lambda: client.rename("alias.txt", "x.secret"),
                lambda: client.remove("key.secret"),
                lambda: client.listdir("locked"),
                lambda: client.open("locked/a.txt").read(),
                lambda: client.chmod("key.secret", 0o777),
            ):
                assert sftp_refused(operation)
            assert "key.secret" in client.listdir("/")
        assert (server.fs.root / "key.secret").read_text() == "k"


@needs_paramiko
class TestSftpJail:
    @pytest.fixture
    def node(self, panel, make_daemon, tmp_path):
        daemon, server = _sftp_daemon(panel, make_daemon)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("OUTSIDE")
        (server.fs.root / "inside.txt").write_text("inside")
        return daemon, server, outside

    def test_dot_dot_and_absolute_paths_stay_inside(self, node):
        daemon, server, _ = node
        with sftp_client(daemon, server) as client:
            assert client.normalize("../../..") == "/"
            # realpath answers one leading slash (POSIX keeps "//" apart, and clients show it as the
            # cwd)
            assert [client.normalize(p) for p in ("/", "/inside.txt", "//x/../y", "a/b/")] == [
                "/",
                "/inside.txt",
                "/y",
                "/a/b",
            ]
            for path in [
                "..",
                "../outside/secret.txt",
                "/../../etc/passwd",
                "a/../../inside.txt",
                "/x/../../../etc",
            ]:
                with pytest.raises(IOError):
                    client.stat(path)
                with pytest.raises(IOError):
                    client.open(path, "w")
            with pytest.raises(IOError):  # the node's /etc/passwd is not the jail's
                client.open("/etc/passwd").read()
            assert client.open("/inside.txt").read() == b"inside"

    def test_symlinks_out_are_not_followed_and_cannot_be_made(self, node):
        daemon, server, outside = node
        root = server.fs.root
        os.symlink("/etc", root / "etc-link")  # as a game server could have made them
        os.symlink(str(outside), root / "out")
        os.symlink(str(outside / "secret.txt"), root / "secret-link")
        os.chmod(outside / "secret.txt", 0o640)
        with sftp_client(daemon, server) as client:
            for action in (
                lambda: client.listdir("etc-link"),
                lambda: client.open("etc-link/passwd").read(),
                lambda: client.open("out/secret.txt").read(),
                lambda: client.open("secret-link").read(),
                lambda: client.open("secret-link", "w").write(b"pwned"),
                lambda: client.open("out/new.txt", "w"),
                lambda: client.chmod("secret-link", 0o777),
                lambda: client.truncate("secret-link", 0),
                lambda: client.stat("out/secret.txt"),
            ):
                with pytest.raises(IOError):
                    action()
            for target in ["/etc", "../..", "../outside/secret.txt", str(outside)]:
                with pytest.raises(IOError):
                    client.symlink(target, "new-link")
            target_mtime = (outside / "secret.txt").stat().st_mtime
            client.utime("secret-link", (1, 1))  # touches the link itself, never its target
            assert (outside / "secret.txt").stat().st_mtime == target_mtime
            client.mkdir("sub")
            with pytest.raises(IOError):
                client.symlink("../../inside.txt", "sub/up-too-far")
            client.symlink("../inside.txt", "sub/ok-link")  # pointing inside is fine
            assert client.open("sub/ok-link").read() == b"inside"
            assert client.lstat("secret-link")  # the link itself can be seen ...
            client.remove("secret-link")  # ... and removed, leaving its target alone
        assert not os.path.lexists(root / "new-link")
        assert (outside / "secret.txt").read_text() == "OUTSIDE"
        assert (outside / "secret.txt").stat().st_mode & 0o777 == 0o640
        assert os.listdir(outside) == ["secret.txt"]

    def test_a_chain_of_dot_dot_links_cannot_reach_outside(self, node):
        daemon, server, _ = node
        root = server.fs.root
        with sftp_client(daemon, server) as client:
            client.mkdir("a")
            client.mkdir("a/b")
            client.symlink("../..", "a/b/up")  # lands on the server's own directory: allowed
            before = tree(root)
            with pytest.raises(IOError):  # a/b/up/evil really sits at /evil: ../.. is outside
                client.symlink("../../root/wingslite/servers", "a/b/up/evil")
            assert client.open("a/b/up/inside.txt").read() == b"inside"
        assert tree(root) == before

    def test_renaming_a_directory_that_carries_a_relative_link_out_is_refused(self, node):
        daemon, server, _ = node
        root = server.fs.root
        with sftp_client(daemon, server) as client:
            client.mkdir("a")
            client.mkdir("a/b")
            client.symlink("../../inside.txt", "a/b/l")
            before = tree(root)
            for rename in (client.rename, client.posix_rename):
                with pytest.raises(IOError):
                    rename("a/b", "b")  # from /b, ../.. is outside
            assert tree(root) == before
            client.mkdir("c")
            client.rename("a/b", "c/b")  # just as deep: the link still lands inside
            assert client.open("c/b/l").read() == b"inside"

    def test_a_symlink_swapped_in_during_operations_is_never_followed(self, node):
        daemon, server, outside = node
        root = server.fs.root
        (root / "dir").mkdir()
        (root / "dir" / "secret.txt").write_text("inside")
        os.symlink(str(outside), root / "link")
        stop = threading.Event()
        libc = ctypes.CDLL(None, use_errno=True)

        def swap():
            # renameat2(RENAME_EXCHANGE): "dir" is the real directory or the link out, atomically,
            # about half of the time each -- the classic attack on realpath-then-open.
            at_fdcwd, rename_exchange = -100, 2
            while not stop.is_set():
                libc.renameat2(
                    at_fdcwd, bytes(root / "dir"), at_fdcwd, bytes(root / "link"), rename_exchange
                )

        swapper = threading.Thread(target=swap)
        swapper.start()
        seen = set()
        try:
            with sftp_client(daemon, server) as client:
                for _ in range(300):
                    with contextlib.suppress(IOError):
                        seen.add(client.open("dir/secret.txt").read())
                    with contextlib.suppress(IOError):
                        seen.update(client.listdir("dir"))
                    with contextlib.suppress(IOError):
                        with client.open("dir/written.txt", "w") as fh:
                            fh.write(b"w")
        finally:
            stop.set()
            swapper.join()
        assert b"OUTSIDE" not in seen and b"inside" in seen
        assert os.listdir(outside) == ["secret.txt"]


@needs_paramiko
class TestSftpDiskLimit:
    def test_a_write_past_the_limit_stops_at_the_limit(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        limit = SFTP_LIMIT_MB * 1024 * 1024
        (server.fs.root / "keep.txt").write_text("keep me")
        server.fs.recalculate()
        chunk = b"x" * 32768
        with sftp_client(daemon, server) as client:
            with pytest.raises(IOError, match="Quota Exceeded"):  # Wings' status 15
                with client.open("big.bin", "w") as fh:
                    for _ in range(2 * limit // len(chunk)):
                        fh.write(chunk)
            size = (server.fs.root / "big.bin").stat().st_size
            assert limit - len(chunk) < size + 7 <= limit
            assert (server.fs.root / "keep.txt").read_text() == "keep me"
            assert server.fs.usage_bytes() <= limit
            assert server.fs.recalculate() == size + 7
            with pytest.raises(IOError):  # far past the end: the gap counts, nothing is written
                with client.open("sparse.bin", "w") as fh:
                    fh.seek(1 << 40)
                    fh.write(b"x")
            assert (server.fs.root / "sparse.bin").stat().st_size == 0
            client.remove("big.bin")  # freed bytes are given back at once
            with client.open("again.bin", "w") as fh:
                fh.write(b"y" * (limit // 2))
        assert (server.fs.root / "again.bin").stat().st_size == limit // 2

    def test_two_streams_cannot_outrun_the_accounting(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        limit = SFTP_LIMIT_MB * 1024 * 1024
        server.fs.recalculate()

        def stream(name):
            with sftp_client(daemon, server) as client:
                with contextlib.suppress(IOError):
                    with client.open(name, "w") as fh:
                        fh.set_pipelined(True)  # stream without waiting for each answer
                        for _ in range(limit // 4096):
                            fh.write(b"z" * 4096)

        threads = [threading.Thread(target=stream, args=(f"s{i}.bin",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert server.fs.recalculate() <= limit

    def test_openssh_put_past_the_limit_fails(self, panel, make_daemon, tmp_path):
        daemon, server = _sftp_daemon(panel, make_daemon)
        server.fs.recalculate()
        (tmp_path / "huge.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        done = openssh_sftp(daemon, server, ["put huge.bin"], cwd=tmp_path)
        assert done.returncode != 0
        assert (server.fs.root / "huge.bin").stat().st_size <= SFTP_LIMIT_MB * 1024 * 1024


@needs_paramiko
class TestSftpDiskHeld:
    """What a client holds counts, however it holds it (open handles of removed or replaced
    files)."""

    MIB = 1 << 20
    LIMIT_MB = 4

    def _write(self, fh, n_bytes):
        """Write until done or refused; True when the node refused (status 15)."""
        try:
            for _ in range(n_bytes // 65536):
                fh.write(b"x" * 65536)
            fh.flush()
        except OSError:
            return True
        return False

    def test_open_write_remove_and_keep_the_handle_holds_the_limit(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        server.fs.recalculate()
        limit = self.LIMIT_MB * self.MIB
        with sftp_client(daemon, server) as client:
            handles, refused = [], False
            for i in range(12):
                try:
                    fh = client.open(f"f{i}", "w")
                except OSError:  # refused at open: already at the limit
                    refused = True
                    continue
                handles.append(fh)
                refused |= self._write(fh, self.MIB)
                client.remove(f"f{i}")
            assert refused, "no write was refused"
            assert held_bytes(server.fs.root) <= limit + self.MIB
            for fh in handles:
                with contextlib.suppress(OSError):
                    fh.close()
            # closed: the bytes are free again, and given back
            wait_for(lambda: held_bytes(server.fs.root) == 0, what="the handles to close")
            with client.open("after", "w") as fh:
                assert not self._write(fh, limit - self.MIB)

    def test_posix_rename_over_a_file_another_handle_writes_holds_the_limit(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        server.fs.recalculate()
        limit = self.LIMIT_MB * self.MIB
        with sftp_client(daemon, server) as client:
            handles, refused = [], False
            for _ in range(12):
                try:
                    fh = client.open("live", "w")
                except OSError:  # refused at open: already at the limit
                    refused = True
                    continue
                handles.append(fh)
                refused |= self._write(fh, self.MIB)
                with contextlib.suppress(OSError), client.open("next", "w") as small:
                    small.write(b"n")
                with contextlib.suppress(OSError):
                    client.posix_rename("next", "live")  # replaces the file ``fh`` still writes
                refused |= self._write(fh, self.MIB // 2)
            assert refused, "no write was refused"
            assert held_bytes(server.fs.root) <= limit + self.MIB
            for fh in handles:
                with contextlib.suppress(OSError):
                    fh.close()

    def _no_walks(self, server):
        """Measure now, then keep the figure: what follows is booked and given back, not walked."""
        server.fs.check_interval_s = server.fs.recheck_after_unknown_s = 3600
        return server.fs.recalculate()

    def test_a_file_manager_write_removed_by_sftp_gives_back_what_it_booked(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        before = self._no_walks(server)
        assert fm_write(daemon, server, "/written.bin", b"w" * self.MIB)[0] == 204
        assert server.fs.usage_bytes() == before + self.MIB
        with sftp_client(daemon, server) as client:
            client.remove("written.bin")
        assert server.fs.usage_bytes() == before

    def test_a_file_manager_rewrite_deleted_by_the_file_manager_gives_back_its_size(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        before = self._no_walks(server)
        assert fm_write(daemon, server, "/a.bin", b"a" * self.MIB)[0] == 204
        assert fm_write(daemon, server, "/a.bin", b"b" * (2 * self.MIB))[0] == 204
        assert server.fs.usage_bytes() == before + 2 * self.MIB
        deletes = {"root": "/", "files": ["a.bin"]}
        assert api(daemon, "POST", fm_path(server, "delete"), deletes)[0] == 204
        assert server.fs.usage_bytes() == before

    def test_a_file_deleted_by_the_file_manager_counts_while_a_client_holds_it(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        server.fs.recalculate()
        with sftp_client(daemon, server) as client:
            held = client.open("held", "w")
            assert not self._write(held, 3 * self.MIB)
            deletes = {"root": "/", "files": ["held"]}
            assert api(daemon, "POST", fm_path(server, "delete"), deletes)[0] == 204
            with client.open("more", "w") as fh:
                assert self._write(fh, 2 * self.MIB), "the deleted file's bytes were given back"
            held.close()
            wait_for(lambda: server.fs.usage_bytes() < 2 * self.MIB, what="the close")
            with client.open("more", "w") as fh:
                assert not self._write(fh, 2 * self.MIB)

    def test_removing_what_the_game_wrote_since_the_walk_frees_nothing_booked(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon, disk_mb=self.LIMIT_MB)
        limit = self.LIMIT_MB * self.MIB
        (server.fs.root / "world.dat").write_bytes(b"w" * 3 * self.MIB)
        server.fs.recalculate()
        (server.fs.root / "game.log").write_bytes(b"g" * 3 * self.MIB)  # unmetered, since the walk
        with sftp_client(daemon, server) as client:
            client.remove("game.log")
            with client.open("upload", "w") as fh:
                assert self._write(fh, 3 * self.MIB), "the upload was not refused"
        assert held_bytes(server.fs.root) <= limit + self.MIB


@needs_paramiko
class TestSftpSessions:
    def test_a_suspending_sync_closes_ten_sessions_before_its_204(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(sftp_client(daemon, server)) for _ in range(10)]
            assert daemon.sessions.count(server.uuid, "sftp") == 10
            panel.servers[server.uuid]["settings"]["suspended"] = True
            status = api(daemon, "POST", f"/api/servers/{server.uuid}/sync")[0]
            assert status == 204
            # closed, not merely refused: the node's end of every connection is gone already
            assert daemon.sessions.count(server.uuid, "sftp") == 0
            assert daemon.sftp.connections() == 0
            for client in clients:
                transport = client.get_channel().get_transport()
                wait_for(
                    lambda t=transport: not t.is_active(),
                    timeout_s=5,
                    what="the client to see its connection closed",
                )
        # still suspended here; the Panel answers "yes" again: the node still refuses
        panel.servers[server.uuid]["settings"]["suspended"] = False
        with pytest.raises(paramiko.AuthenticationException):
            with sftp_client(daemon, server):
                pass
        assert api(daemon, "POST", f"/api/servers/{server.uuid}/sync")[0] == 204
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []

    def test_deauthorize_user_closes_their_sessions(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        with sftp_client(daemon, server) as client:
            client.listdir("/")
            body = {"user": panel.user_uuid, "servers": [server.uuid]}
            assert api(daemon, "POST", "/api/deauthorize-user", body)[0] == 204
            assert daemon.sessions.count(server.uuid, "sftp") == 0
            assert daemon.sftp.connections() == 0
            wait_for(
                lambda: not client.get_channel().get_transport().is_active(),
                timeout_s=5,
                what="the connection to close",
            )

    @pytest.mark.docker  # the daemon asks the engine
    def test_deleting_the_server_closes_its_sessions(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        with sftp_client(daemon, server) as client:
            client.listdir("/")
            assert api(daemon, "DELETE", f"/api/servers/{server.uuid}")[0] in (202, 204)
            assert daemon.sessions.count(server.uuid, "sftp") == 0
            assert daemon.sftp.connections() == 0
        with pytest.raises(
            paramiko.AuthenticationException
        ):  # the Panel still says yes; the node has no such server
            with sftp_client(daemon, server):
                pass


@needs_paramiko
class TestSftpResourceLimits:
    def test_a_packet_announcing_gigabytes_before_login_closes_the_connection(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(panel, make_daemon)
        with socket.create_connection(("127.0.0.1", daemon.sftp.port), timeout=10) as sock:
            assert sock.recv(100).startswith(b"SSH-2.0-")
            # No key exchange yet: a packet length of ~4 GiB, then bytes for as long as the node
            # takes them.
            sock.sendall(
                b"SSH-2.0-probe\r\n" + (0xFFFFFFFC).to_bytes(4, "big") + b"\x04\x00\x00\x00"
            )
            sent, chunk = 0, b"\x00" * (1 << 20)
            with pytest.raises(OSError):  # reset or broken pipe: the node stopped reading
                while sent < 256 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
        assert sent < 32 << 20, f"the node buffered {sent >> 20} MiB of one unauthenticated packet"
        with sftp_client(daemon, server) as client:  # and it serves everyone else as before
            assert client.listdir("/") == []

    def test_one_channel_serves_one_subsystem(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon)
        # Count the subsystem threads only: the process-wide thread count also moves with other
        # daemons' threads (a du walk, an earlier test's daemon still winding down) under load.
        before = set(threading.enumerate())
        transport = paramiko.Transport(("127.0.0.1", daemon.sftp.port))
        try:
            transport.connect(username=f"{SFTP_USER}.{server.uuid[:8]}", password=SFTP_PASSWORD)
            channel = transport.open_session()
            channel.invoke_subsystem("sftp")
            for _ in range(20):  # each would be one more thread, session and open directory
                with pytest.raises(paramiko.SSHException):
                    channel.invoke_subsystem("sftp")
            assert daemon.sessions.count(server.uuid, "sftp") == 1
            subsystem_threads = [
                t
                for t in set(threading.enumerate()) - before
                if isinstance(t, paramiko.SubsystemHandler)
            ]
            assert len(subsystem_threads) == 1, subsystem_threads
        finally:
            transport.close()

    def test_open_listings_of_a_channel_hold_a_bounded_number_of_entries(
        self, panel, make_daemon, monkeypatch
    ):
        # paramiko keeps every open listing in memory (~40 MB per 100,000 entries, measured): a
        # client opening one big directory again and again without reading it must not hold it 256
        # times.
        monkeypatch.setattr(w.Jail, "max_entries", 500)
        daemon, server = _sftp_daemon(panel, make_daemon)
        (server.fs.root / "many").mkdir()
        for i in range(400):
            (server.fs.root / "many" / f"f{i}").touch()
        with sftp_client(daemon, server) as client:
            opened = []
            with pytest.raises(IOError):
                for _ in range(20):
                    opened.append(
                        client._request(paramiko.sftp.CMD_OPENDIR, "many")[1].get_binary()
                    )
            assert 1 <= len(opened) <= 2
            for handle in opened:  # closing them gives the budget back
                client._request(paramiko.sftp.CMD_CLOSE, handle)
            assert len(client.listdir("many")) == 400


def closed_by_peer(sock: socket.socket, timeout_s: float = 10) -> bool:
    """Read until the peer closes (True) or ``timeout_s`` passes with it still open (False)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


@needs_paramiko
class TestSftpStrangers:
    """Connections that cost a stranger nothing cannot lock real users out."""

    def test_silent_connections_are_capped_per_address_and_closed_after_the_handshake_timeout(
        self, panel, make_daemon
    ):
        daemon, server = _sftp_daemon(
            panel,
            make_daemon,
            wingslite__sftp_handshake_timeout_s=2,
            wingslite__sftp_max_unauthenticated_per_ip=4,
        )
        port = daemon.sftp.port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            wait_for(lambda: daemon.sftp.connections() == 4, what="four silent connections")
            with socket.create_connection(("127.0.0.1", port)) as fifth:  # same address: no slot
                fifth.settimeout(10)
                assert fifth.recv(256) == b""
            with sftp_client(daemon, server, source_ip="127.0.0.2") as client:  # someone else
                assert client.listdir("/") == []
            for sock in silent:  # none of them said a word: closed at the deadline
                assert closed_by_peer(sock), "a silent connection outlived the handshake timeout"
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: daemon.sftp.connections() == 0, what="the silent connections to end")
        with sftp_client(daemon, server) as client:  # the address has its slots back
            assert client.listdir("/") == []

    def test_a_banner_without_an_end_is_not_held(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, wingslite__sftp_handshake_timeout_s=2)
        with socket.create_connection(("127.0.0.1", daemon.sftp.port), timeout=10) as sock:
            assert sock.recv(256).startswith(b"SSH-2.0-")
            sent, chunk = 0, b"A" * 65536
            with pytest.raises(ConnectionError):  # reset: the node stopped reading and closed
                while sent < 64 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
        assert sent < 16 << 20, f"the node took {sent >> 20} MiB of one banner line"
        with socket.create_connection(("127.0.0.1", daemon.sftp.port), timeout=10) as sock:
            sock.recv(256)
            sock.sendall(b"SSH-2.0-")  # then a byte now and then: each one resets no clock
            with pytest.raises(OSError):
                for _ in range(100):
                    sock.sendall(b"x")
                    time.sleep(0.2)
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []

    @pytest.mark.docker  # the daemon asks the engine (an error would be logged)
    def test_a_flood_of_bad_handshakes_logs_a_line_a_minute_not_a_traceback_each(
        self, panel, make_daemon, caplog
    ):
        daemon, _ = _sftp_daemon(panel, make_daemon, wingslite__sftp_handshake_timeout_s=1)
        caplog.set_level(logging.INFO)
        for garbage in [b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 600, b"SSH-1.0-old\r\n"] * 4:
            with socket.create_connection(("127.0.0.1", daemon.sftp.port)) as sock:
                sock.sendall(garbage)
                closed_by_peer(sock)
        silent = [socket.create_connection(("127.0.0.1", daemon.sftp.port)) for _ in range(3)]
        for sock in silent:
            closed_by_peer(sock)
            sock.close()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) <= 1, [r.getMessage() for r in loud]
        assert not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG)

    def test_an_idle_session_is_closed(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, wingslite__sftp_idle_timeout_s=2)
        with sftp_client(daemon, server) as client:
            transport = client.get_channel().get_transport()
            for _ in range(20):  # 4 s of requests: never idle
                client.listdir("/")
                time.sleep(0.2)
            assert transport.is_active()
            wait_for(
                lambda: not transport.is_active(), timeout_s=15, what="the idle session to close"
            )
        wait_for(lambda: daemon.sessions.count(server.uuid, "sftp") == 0, what="the table")
        with sftp_client(daemon, server) as client:
            assert client.listdir("/") == []

    def test_one_user_cannot_take_every_slot(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, wingslite__sftp_max_sessions_per_user=2)
        alice = panel.user_uuid
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(sftp_client(daemon, server))
            stack.enter_context(sftp_client(daemon, server))
            with pytest.raises(paramiko.AuthenticationException):
                with sftp_client(daemon, server):
                    pass
            panel.user_uuid = "b0b00000-1111-4222-8333-444455556666"  # another Panel user
            with sftp_client(daemon, server) as client:
                assert client.listdir("/") == []
            panel.user_uuid = alice
            first.get_channel().get_transport().close()
            wait_for(lambda: daemon.sftp.connections() == 1, what="the first connection to end")
            with sftp_client(daemon, server) as client:  # her slot is free again
                assert client.listdir("/") == []


# activity #########################################################################################


ACTIVITY_USER = "c0ffee00-1111-4222-8333-444455556666"
_RFC3339_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"


def activity_events(panel, event_prefix: str = "server:", count: int = 1, timeout_s: float = 15):
    """The events the fake Panel accepted whose name starts with ``event_prefix`` (waits for
    them)."""

    def found():
        with panel.lock:
            items = [e for e in panel.activity if e["event"].startswith(event_prefix)]
        return items if len(items) >= count else None

    return wait_for(
        found, timeout_s, what=f"{count} {event_prefix!r} activity event(s)", interval_s=0.05
    )


class TestActivity:
    """Activity reaches the Panel's ``/activity`` with Wings' names and fields, exactly once."""

    def test_console_command_and_power_from_the_websocket(self, console_node, panel):
        import re

        daemon = console_node(system__activity_send_interval=1)
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            ws_send(conn, "set state", "start")
            ws_until(conn, "status", match="running")
            ws_send(conn, "send command", "say hello")
            ws_until(conn, "console output", match="> say hello")
        power = activity_events(panel, "server:power.")
        command = activity_events(panel, "server:console.command")
        assert power[0]["event"] == "server:power.start" and power[0]["metadata"] is None
        assert command[0]["metadata"] == {"command": "say hello"}
        for event in (power[0], command[0]):
            assert set(event) == {"user", "server", "event", "metadata", "ip", "timestamp"}
            assert event["user"] == ACTIVITY_USER and event["server"] == daemon.uuid
            assert event["ip"] == "127.0.0.1"  # no port: the Panel refuses a batch over one
            assert re.match(_RFC3339_Z, event["timestamp"])

    def test_power_action_that_fails_and_http_power_are_not_recorded(self, console_node, panel):
        daemon = console_node(system__activity_send_interval=3600)
        conn, _ = ws_authed(daemon, daemon.uuid)
        with conn:
            ws_send(conn, "set state", "start")
            ws_until(conn, "status", match="running")
            ws_send(conn, "set state", "start")  # already running: the action fails
            ws_until(conn, "daemon error")
        status, _, _ = api(daemon, "POST", f"/api/servers/{daemon.uuid}/power", {"action": "kill"})
        assert status == 202
        wait_for(lambda: daemon.get_server(daemon.uuid).state == w.OFFLINE, what="killed")
        daemon.activity.send_pending()
        # Only the start that worked; the Panel logs its own HTTP power calls itself.
        assert [e["event"] for e in panel.activity] == ["server:power.start"]

    @needs_paramiko
    def test_sftp_operations_are_recorded_and_merged_per_minute(self, panel, make_daemon):
        daemon, server = _sftp_daemon(panel, make_daemon, system__activity_send_interval=3600)
        with sftp_client(daemon, server) as client:
            for name in ("a.txt", "b.txt"):
                with client.open(name, "w") as f:
                    f.write(b"new")
            with client.open("a.txt", "w") as f:
                f.write(b"again")
            client.mkdir("dir")
            client.rename("b.txt", "dir/b.txt")
            client.remove("a.txt")
            with pytest.raises(OSError):
                client.remove("missing.txt")  # failed operations are not activity
        assert daemon.activity.send_pending() >= 5
        by_event = {e["event"]: e for e in panel.activity}
        assert by_event["server:sftp.create"]["metadata"] == {"files": ["/a.txt", "/b.txt"]}
        assert by_event["server:sftp.write"]["metadata"] == {"files": ["/a.txt"]}
        assert by_event["server:sftp.create-directory"]["metadata"] == {"files": ["/dir"]}
        assert by_event["server:sftp.rename"]["metadata"] == {
            "files": [{"from": "/b.txt", "to": "/dir/b.txt"}]
        }
        assert by_event["server:sftp.delete"]["metadata"] == {"files": ["/a.txt"]}
        assert len(panel.activity) == 5  # two creates within a minute are one event
        assert all(
            e["user"] == panel.user_uuid and e["ip"] == "127.0.0.1" and e["server"] == server.uuid
            for e in panel.activity
        )
        assert daemon.activity.pending() == 0

    def test_panel_down_two_intervals_and_a_restart_delivers_each_event_once(
        self, panel, make_daemon
    ):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel, system__activity_send_interval=1, system__activity_send_count=3)
        server = daemon.get_server(uuid)
        panel.down = True
        for n in range(4):
            server.record_activity(
                w.ACTIVITY_CONSOLE_COMMAND, ACTIVITY_USER, "10.0.0.1:5", {"n": n}
            )
        time.sleep(2.2)  # two send intervals pass while the Panel is down...
        wait_for(lambda: panel.calls.get("/api/remote/activity", 0) >= 2, 20, what="two tries")
        daemon.stop()  # restart while the Panel is still down
        for n in range(4, 7):
            daemon.activity.record(uuid, w.ACTIVITY_CONSOLE_COMMAND, ACTIVITY_USER, "::1", {"n": n})
        assert panel.activity == []
        restarted = make_daemon(
            panel, boot=False, system__activity_send_interval=1, system__activity_send_count=3
        )
        assert restarted.activity.pending() == 7
        panel.down = False
        events = activity_events(panel, count=7)
        wait_for(lambda: restarted.activity.pending() == 0, what="the queue to empty")
        time.sleep(2.5)  # two more rounds: nothing is sent a second time
        assert sorted(e["metadata"]["n"] for e in panel.activity) == list(range(7))
        accepted = [
            r.body["data"]
            for r in panel.requests
            if r.path == "/api/remote/activity" and r.body["data"][0]["metadata"]["n"] in range(7)
        ]
        assert max(len(batch) for batch in accepted) == 3  # system.activity_send_count per request
        assert {e["ip"] for e in events} == {"10.0.0.1", "::1"}

    def test_a_batch_the_panel_refuses_is_dropped_not_resent(self, panel, make_daemon, caplog):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel, system__activity_send_interval=3600)
        daemon.activity.record(uuid, w.ACTIVITY_CONSOLE_COMMAND, None, None, {"command": "x"})
        panel.fail["/api/remote/activity"] = [422]
        with caplog.at_level(logging.ERROR, logger="wingslite"):
            daemon.activity.send_pending()
        assert "refused 1 event(s), dropped" in caplog.text
        assert daemon.activity.pending() == 0 and panel.activity == []
        daemon.activity.record(uuid, w.ACTIVITY_CONSOLE_COMMAND, None, "not an ip", {})
        assert daemon.activity.send_pending() == 1
        assert panel.activity[0]["ip"] is None and panel.activity[0]["user"] is None

    def test_a_damaged_queue_is_set_aside_and_recording_goes_on(self, panel, tmp_path, caplog):
        uuid = panel.add(panel_document())
        queue = tmp_path / "activity.db"
        queue.write_bytes(b"this is not a database" * 100)
        log = w.ActivityLog(queue, w.PanelClient(panel.url, TOKEN_ID, TOKEN), 3600)
        with caplog.at_level(logging.ERROR, logger="wingslite"):
            log.record(uuid, w.ACTIVITY_CONSOLE_COMMAND, None, "127.0.0.1", {"command": "x"})
        assert "is damaged" in caplog.text and log.pending() == 1
        assert list(tmp_path.glob("activity.db.damaged-*"))
        assert log.send_pending() == 1 and panel.activity[0]["metadata"] == {"command": "x"}
        log.stop()

    def test_addresses_and_timestamps_in_the_panels_forms(self):
        assert w.activity_ip("203.0.113.9:51234") == "203.0.113.9"
        assert w.activity_ip("[2001:db8::1]:22") == "2001:db8::1"
        assert w.activity_ip("2001:db8::1") == "2001:db8::1"
        assert w.activity_ip("") is None and w.activity_ip("host.example:22") is None
        assert w.activity_timestamp(0) == "1970-01-01T00:00:00Z"


# file manager #####################################################################################


FM_LIMIT_MB = 2
FM_STAT_KEYS = {
    "name",
    "created",
    "modified",
    "mode",
    "mode_bits",
    "size",
    "directory",
    "file",
    "symlink",
    "mime",
}
RFC3339_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"


def _fm_daemon(panel, make_daemon, disk_mb=FM_LIMIT_MB, denylist=(), **overrides):
    """A daemon and one server (``disk_mb`` MiB of disk, the egg's ``denylist``) with its
    directory."""
    doc = panel_document(build__disk_space=disk_mb)
    doc["settings"]["egg"]["file_denylist"] = list(denylist)
    uuid = panel.add(doc)
    daemon = make_daemon(panel, **overrides)
    server = daemon.get_server(uuid)
    server.fs.ensure()
    server.fs.recalculate()
    return daemon, server


def http_raw(port, method, path, body=None, headers=None, token=TOKEN):
    """One request; (status, lower-cased headers, raw body bytes). ``body`` may be an iterable."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def fm_path(server, route, **query) -> str:
    qs = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"/api/servers/{server.uuid}/files/{route}{qs}"


def fm_write(daemon, server, path, data: bytes):
    """POST files/write as the Panel sends it: a raw body labelled application/json."""
    return http_raw(
        daemon.port,
        "POST",
        fm_path(server, "write", file=path),
        data,
        {"Content-Type": "application/json", "Content-Length": str(len(data))},
    )


def tree_snapshot(*roots: Path) -> dict:
    """Every entry under ``roots``: type, mode, size, content digest or link target."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                if p.is_symlink():
                    out[str(p)] = ("link", os.readlink(p))
                elif p.is_dir():
                    out[str(p)] = ("dir", st.st_mode)
                else:
                    out[str(p)] = ("file", st.st_mode, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TestFileManager:
    def test_list_directory_answers_wings_stat_objects(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        root = server.fs.root
        (root / "zeta").mkdir()
        (root / "alpha").mkdir()
        (root / "notes").write_text("hello\nwörld\n")
        (root / "config.json").write_text('{"a": 1}')
        (root / "server.jar").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
        (root / "pack.tar.gz").write_bytes(b"\x1f\x8b\x08" + b"\x00" * 40)
        (root / "blob").write_bytes(b"\x00\x01\x02\xff" * 10)
        (root / "empty.txt").write_bytes(b"")
        (root / "link").symlink_to("notes")
        (root / "dirlink").symlink_to("alpha")
        (root / "dangling").symlink_to("/etc/passwd")
        os.chmod(root / "notes", 0o640)
        status, _, listing = api(daemon, "GET", fm_path(server, "list-directory", directory="/"))
        assert status == 200
        names = [e["name"] for e in listing]
        assert names[:3] == ["alpha", "dirlink", "zeta"]  # directories first, then by name
        assert names[3:] == sorted(names[3:])
        by_name = {e["name"]: e for e in listing}
        for entry in listing:
            assert set(entry) == FM_STAT_KEYS
            assert re.match(RFC3339_UTC, entry["created"]) and re.match(
                RFC3339_UTC, entry["modified"]
            )
        notes = by_name["notes"]
        assert notes["mime"] == "text/plain; charset=utf-8"
        assert (notes["mode"], notes["mode_bits"], notes["size"]) == ("-rw-r-----", "640", 13)
        assert (notes["file"], notes["directory"], notes["symlink"]) == (True, False, False)
        assert by_name["alpha"]["mime"] == "inode/directory"
        assert by_name["alpha"]["mode"].startswith("d") and by_name["alpha"]["file"] is False
        assert by_name["config.json"]["mime"] == "application/json"
        assert by_name["server.jar"]["mime"] == "application/jar"  # the Panel will not edit it
        assert by_name["pack.tar.gz"]["mime"] == "application/gzip"  # the Panel offers Unarchive
        assert by_name["blob"]["mime"] == "application/octet-stream"
        assert by_name["empty.txt"]["mime"].startswith("text/plain")
        assert by_name["link"]["symlink"] is True and by_name["link"]["mode"].startswith("L")
        assert by_name["link"]["mime"] == "text/plain; charset=utf-8"
        assert by_name["dirlink"]["directory"] is True and by_name["dirlink"]["symlink"] is True
        assert by_name["dangling"]["mime"] == "inode/symlink"
        status, _, inner = api(
            daemon, "GET", fm_path(server, "list-directory", directory="/dirlink")
        )
        assert status == 200 and inner == []
        status, _, body = api(daemon, "GET", fm_path(server, "list-directory", directory="/nope"))
        assert status == 404 and body["error"] == w.FM_NOT_FOUND

    def test_contents_streams_the_bytes_with_wings_headers(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        data = b"motd=A Minecraft Server\n" * 1000
        (server.fs.root / "cfg").mkdir()
        (server.fs.root / "cfg" / "server.properties").write_bytes(data)
        status, headers, body = http_raw(
            daemon.port, "GET", fm_path(server, "contents", file="/cfg/server.properties")
        )
        assert status == 200 and body == data
        assert headers["x-mime-type"].startswith("text/")
        assert headers["content-length"] == str(len(data))
        status, headers, body = http_raw(
            daemon.port,
            "GET",
            fm_path(server, "contents", file="cfg/server.properties", download="1"),
        )
        assert status == 200 and body == data
        assert headers["content-disposition"] == 'attachment; filename="server.properties"'
        assert headers["content-type"] == "application/octet-stream"
        status, _, body = http_raw(daemon.port, "GET", fm_path(server, "contents", file="/missing"))
        assert status == 404 and json.loads(body)["error"] == w.FM_NOT_FOUND
        status, _, body = http_raw(daemon.port, "GET", fm_path(server, "contents", file="/cfg"))
        assert status == 400 and json.loads(body)["error"] == w.FM_IS_DIR
        os.mkfifo(server.fs.root / "pipe")
        status, _, body = http_raw(daemon.port, "GET", fm_path(server, "contents", file="/pipe"))
        assert status == 400 and json.loads(body)["error"] == "Cannot open files of this type."

    def test_write_create_rename_copy_chmod_delete(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        root = server.fs.root
        status, _, _ = fm_write(daemon, server, "/plugins/Essentials/config.yml", b"a: 1\n")
        assert status == 204 and (root / "plugins/Essentials/config.yml").read_bytes() == b"a: 1\n"
        assert fm_write(daemon, server, "plugins/Essentials/config.yml", b"a: 22\n")[0] == 204
        assert (root / "plugins/Essentials/config.yml").read_bytes() == b"a: 22\n"
        assert fm_write(daemon, server, "/empty.txt", b"")[0] == 204  # a new empty file
        assert (root / "empty.txt").read_bytes() == b""
        status, _, body = fm_write(daemon, server, "/plugins", b"x")
        assert status == 400 and "existing directory" in json.loads(body)["error"]
        body = {"name": "world/region", "path": "/"}
        assert api(daemon, "POST", fm_path(server, "create-directory"), body)[0] == 204
        assert (root / "world/region").is_dir()
        body = {"name": "sub", "path": "/empty.txt"}
        status, _, answer = api(daemon, "POST", fm_path(server, "create-directory"), body)
        assert status == 400 and "ENOTDIR" in answer["error"]
        moves = {
            "root": "/plugins",
            "files": [{"from": "Essentials/config.yml", "to": "../moved.yml"}],
        }
        assert api(daemon, "PUT", fm_path(server, "rename"), moves)[0] == 204
        assert (root / "moved.yml").read_bytes() == b"a: 22\n"
        clash = {"root": "/", "files": [{"from": "moved.yml", "to": "empty.txt"}]}
        status, _, answer = api(daemon, "PUT", fm_path(server, "rename"), clash)
        assert status == 400 and "already exists" in answer["error"]
        status, _, answer = api(
            daemon, "PUT", fm_path(server, "rename"), {"root": "/", "files": []}
        )
        assert status == 422 and answer["error"] == "No files to move or rename were provided."
        (root / "world.tar.gz").write_bytes(b"\x1f\x8b" + b"0" * 100)
        for location in ("/moved.yml", "/moved.yml", "world.tar.gz"):
            assert api(daemon, "POST", fm_path(server, "copy"), {"location": location})[0] == 204
        assert (root / "moved copy.yml").read_bytes() == b"a: 22\n"
        assert (root / "moved copy 1.yml").read_bytes() == b"a: 22\n"
        assert (root / "world copy.tar.gz").read_bytes() == b"\x1f\x8b" + b"0" * 100
        status, _, _ = api(daemon, "POST", fm_path(server, "copy"), {"location": "/world"})
        assert status == 404  # directories are not copied (Wings)
        chmods = {"root": "/", "files": [{"file": "moved.yml", "mode": "755"}]}
        assert api(daemon, "POST", fm_path(server, "chmod"), chmods)[0] == 204
        assert (root / "moved.yml").stat().st_mode & 0o777 == 0o755
        chmods["files"][0]["mode"] = "rwx"
        status, _, answer = api(daemon, "POST", fm_path(server, "chmod"), chmods)
        assert status == 400 and answer["error"] == "Invalid file mode."
        (root / "world/region/r.0.0.mca").write_bytes(b"r" * 5000)
        server.fs.recalculate()
        before = server.fs.usage_bytes()
        deletes = {"root": "/", "files": ["world", "moved copy.yml", "never-existed"]}
        assert api(daemon, "POST", fm_path(server, "delete"), deletes)[0] == 204
        assert not (root / "world").exists() and not (root / "moved copy.yml").exists()
        assert server.fs.usage_bytes() == before - 5000 - 6
        status, _, answer = api(
            daemon, "POST", fm_path(server, "delete"), {"root": "/", "files": ["/"]}
        )
        assert status == 400 and root.is_dir()
        assert not [p for p in root.rglob("*.part")]

    def test_every_escape_is_refused_and_changes_nothing(self, panel, make_daemon, tmp_path):
        daemon, server = _fm_daemon(panel, make_daemon, denylist=["*.jar", "/config/secret.yml"])
        root = server.fs.root
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("host secret")
        (root / "config").mkdir()
        (root / "config" / "secret.yml").write_text("pw: 1")
        (root / "server.jar").write_bytes(b"PK\x03\x04jar")
        (root / "ok.txt").write_text("fine")
        (root / "out").symlink_to(outside)  # absolute: leads out
        (root / "up").symlink_to("../../../..")  # relative: climbs out
        (root / "inner").symlink_to("config")  # stays inside, points at a denied file's folder
        before = tree_snapshot(tmp_path)
        port = daemon.port
        reads = [
            ("contents", {"file": "../outside/secret.txt"}),
            ("contents", {"file": "/out/secret.txt"}),
            ("contents", {"file": "/up/etc/passwd"}),
            ("contents", {"file": "/ok.txt\x00.png"}),
            ("list-directory", {"directory": "/out"}),
            ("list-directory", {"directory": "/../"}),
        ]
        for route, query in reads:
            status, _, _ = http_raw(port, "GET", fm_path(server, route, **query))
            assert status == 404, (route, query, status)
        for path, expected in (
            ("../evil.txt", 404),
            ("/out/evil.txt", 404),
            ("/up/tmp/evil.txt", 404),
            ("/ok.txt\x00", 404),
            ("/server.jar", 403),
            ("/plugins/other.jar", 403),
            ("/config/secret.yml", 403),
            ("/inner/secret.yml", 403),  # the same file through a symlink
        ):
            status, _, body = fm_write(daemon, server, path, b"overwritten")
            assert status == expected, (path, status, body)
            if expected == 403:
                assert json.loads(body)["error"] == w.FM_DENYLIST
        json_calls = [
            ("PUT", "rename", {"root": "/", "files": [{"from": "ok.txt", "to": "../x.txt"}]}),
            ("PUT", "rename", {"root": "/", "files": [{"from": "ok.txt", "to": "out/x.txt"}]}),
            ("PUT", "rename", {"root": "/", "files": [{"from": "ok.txt", "to": "a.jar"}]}),
            ("PUT", "rename", {"root": "/", "files": [{"from": "server.jar", "to": "s.zip"}]}),
            ("POST", "copy", {"location": "/out/secret.txt"}),
            ("POST", "copy", {"location": "/server.jar"}),
            ("POST", "delete", {"root": "/", "files": ["../outside"]}),
            ("POST", "delete", {"root": "/out", "files": ["secret.txt"]}),
            ("POST", "chmod", {"root": "/", "files": [{"file": "out/secret.txt", "mode": "777"}]}),
            ("POST", "create-directory", {"name": "x", "path": "/out"}),
            ("POST", "create-directory", {"name": "../../x", "path": "/"}),
        ]
        for method, route, body in json_calls:
            status, _, answer = api(daemon, method, fm_path(server, route), body)
            assert status in (403, 404), (route, body, status, answer)
        assert tree_snapshot(tmp_path) == before
        # Deleting a symlink deletes the link only.
        assert (
            api(daemon, "POST", fm_path(server, "delete"), {"root": "/", "files": ["out"]})[0]
            == 204
        )
        assert not (root / "out").exists() and (outside / "secret.txt").read_text() == "host secret"

    def test_disk_limit_refusals_leave_nothing_behind(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        root = server.fs.root
        limit = FM_LIMIT_MB * 1048576
        (root / "keep.bin").write_bytes(b"k" * (limit // 2))
        server.fs.recalculate()
        before = tree_snapshot(root)
        status, _, body = fm_write(daemon, server, "/big.bin", b"b" * limit)
        assert status == 400 and json.loads(body)["error"] == w.FM_NO_SPACE
        status, _, body = fm_write(daemon, server, "/keep.bin", b"b" * (limit + 1))
        assert status == 400  # the old file survives a refused rewrite
        status, _, _ = api(daemon, "POST", fm_path(server, "copy"), {"location": "/keep.bin"})
        assert status == 200 or status == 204  # exactly fits: half + half == limit
        (root / "keep copy.bin").unlink()
        (root / "more.bin").write_bytes(b"m" * 1000)
        server.fs.recalculate()
        before = tree_snapshot(root)
        status, _, body = api(daemon, "POST", fm_path(server, "copy"), {"location": "/keep.bin"})
        assert status == 400 and body["error"] == w.FM_NO_SPACE
        assert tree_snapshot(root) == before
        # A rewrite costs only its growth, as in Wings.
        assert fm_write(daemon, server, "/keep.bin", b"n" * (limit // 2))[0] == 204
        assert server.fs.recalculate() == limit // 2 + 1000

    def test_a_decompressed_file_deleted_gives_back_what_it_booked(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        root = server.fs.root
        data = os.urandom(300_000)  # random: the archive is far smaller than what it holds
        (root / "in.tar.gz").write_bytes(_tar_bytes([({"name": "big.bin"}, data)], "gz"))
        server.fs.check_interval_s = server.fs.recheck_after_unknown_s = 3600  # no walks now
        before = server.fs.recalculate()
        body = {"root": "/", "file": "in.tar.gz"}
        assert api(daemon, "POST", fm_path(server, "decompress"), body)[0] == 204
        assert server.fs.usage_bytes() == before + len(data)
        deletes = {"root": "/", "files": ["big.bin"]}
        assert api(daemon, "POST", fm_path(server, "delete"), deletes)[0] == 204
        assert server.fs.usage_bytes() == before

    def test_compress_and_decompress(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        root = server.fs.root
        (root / "world" / "region").mkdir(parents=True)
        (root / "world" / "level.dat").write_bytes(b"L" * 3000)
        (root / "world" / "region" / "r.0.0.mca").write_bytes(b"R" * 5000)
        (root / "world" / "link").symlink_to("level.dat")
        (root / "server.properties").write_text("motd=hi\n")
        server.fs.recalculate()
        body = {"root": "/", "files": ["world", "server.properties"]}
        status, _, info = api(daemon, "POST", fm_path(server, "compress"), body)
        assert status == 200 and set(info) == FM_STAT_KEYS
        assert re.match(r"^archive-\d{4}-\d\d-\d\dT\d{6}Z\.tar\.gz$", info["name"])
        assert info["mime"] == "application/tar+gzip" and info["size"] > 0
        archive = root / info["name"]
        with tarfile.open(archive) as tar:
            assert {"world/level.dat", "world/region/r.0.0.mca", "server.properties"} <= set(
                tar.getnames()
            )
        (root / "restore").mkdir()
        os.rename(archive, root / "restore" / "a.tar.gz")
        body = {"root": "/restore", "file": "a.tar.gz"}
        assert api(daemon, "POST", fm_path(server, "decompress"), body)[0] == 204
        assert (root / "restore/world/region/r.0.0.mca").read_bytes() == b"R" * 5000
        assert os.readlink(root / "restore/world/link") == "level.dat"
        assert (root / "restore/server.properties").read_text() == "motd=hi\n"
        with zipfile.ZipFile(root / "mods.zip", "w") as zf:
            zf.writestr("mods/a.jar", b"A" * 100)
            zf.writestr("readme.txt", "hello")
        (root / "readme.txt").write_text("old")  # overwritten by the archive, as Wings
        with gzip.open(root / "latest.log.gz", "wb") as gz:
            gz.write(b"[INFO] log\n")
        server.fs.recalculate()
        for name in ("mods.zip", "latest.log.gz"):
            assert (
                api(daemon, "POST", fm_path(server, "decompress"), {"root": "/", "file": name})[0]
                == 204
            )
        assert (root / "mods/a.jar").read_bytes() == b"A" * 100
        assert (root / "readme.txt").read_text() == "hello"
        assert (root / "latest.log").read_bytes() == b"[INFO] log\n"
        (root / "x.7z").write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\x00" * 100)
        server.fs.recalculate()
        status, _, answer = api(
            daemon, "POST", fm_path(server, "decompress"), {"root": "/", "file": "x.7z"}
        )
        assert status == 400 and "unsupported archive format" in answer["error"]
        status, _, _ = api(
            daemon, "POST", fm_path(server, "decompress"), {"root": "/", "file": "no.zip"}
        )
        assert status == 404
        assert server.fs.usage_bytes() == server.fs.recalculate()
        assert not list(root.rglob(".wingslite-*"))

    def test_archive_escapes_and_bombs_change_nothing(self, panel, make_daemon, tmp_path):
        daemon, server = _fm_daemon(panel, make_daemon, denylist=["/config/secret.yml"])
        root = server.fs.root
        (root / "config").mkdir()
        (root / "config" / "secret.yml").write_text("pw: 1")

        def tar_with(path, *entries):
            with tarfile.open(path, "w:gz") as tar:
                for name, kind, data in entries:
                    info = tarfile.TarInfo(name)
                    if kind == "sym":
                        info.type, info.linkname = tarfile.SYMTYPE, data
                        tar.addfile(info)
                    else:
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

        good = ("fine.txt", "file", b"ok")
        (root / "sub").mkdir()
        tar_with(root / "dotdot.tgz", good, ("../../evil.txt", "file", b"x"))
        tar_with(root / "abs.tgz", good, ("/etc/evil.txt", "file", b"x"))
        tar_with(root / "linkout.tgz", good, ("out", "sym", "../../../.."))
        tar_with(root / "linkabs.tgz", good, ("out", "sym", "/etc"))
        tar_with(root / "deny.tgz", good, ("config/secret.yml", "file", b"pw: stolen"))
        tar_with(
            root / "sub/linkup.tgz", good, ("up", "sym", "../..")
        )  # fine in a staging dir, not in /sub
        with zipfile.ZipFile(root / "slip.zip", "w") as zf:
            zf.writestr("fine.txt", b"ok")
            zf.writestr("../../evil.txt", b"x")
        limit = FM_LIMIT_MB * 1048576
        with gzip.open(root / "bomb.gz", "wb") as gz:
            gz.write(b"\x00" * (limit * 3))
        with tarfile.open(root / "bomb.tar.xz", "w:xz") as tar:
            info = tarfile.TarInfo("zeros.bin")
            info.size = limit * 3
            tar.addfile(info, io.BytesIO(b"\x00" * info.size))
        server.fs.recalculate()
        before = tree_snapshot(tmp_path)
        for name, expected in (
            ("dotdot.tgz", 400),
            ("abs.tgz", 400),
            ("linkout.tgz", 400),
            ("linkabs.tgz", 400),
            ("deny.tgz", 403),
            ("sub/linkup.tgz", 400),
            ("slip.zip", 400),
            ("bomb.gz", 400),
            ("bomb.tar.xz", 400),
        ):
            parent, _, file = name.rpartition("/")
            body = {"root": "/" + parent, "file": file}
            status, _, answer = api(daemon, "POST", fm_path(server, "decompress"), body)
            assert status == expected, (name, status, answer)
            assert status != 204, name
            assert tree_snapshot(tmp_path) == before, name
        assert server.fs.usage_bytes() == server.fs.recalculate()
        # An archive that does not fit is refused and leaves nothing behind.
        (root / "filler.bin").write_bytes(os.urandom(limit - 200_000))
        server.fs.recalculate()
        before = tree_snapshot(root)
        body = {"root": "/", "files": ["filler.bin"]}
        status, _, answer = api(daemon, "POST", fm_path(server, "compress"), body)
        assert status == 400 and answer["error"] == w.FM_NO_SPACE
        assert tree_snapshot(root) == before

    def test_a_50_mib_write_is_streamed(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon, disk_mb=0)
        chunk = bytes(range(256)) * 4096  # 1 MiB, sent 50 times: the client holds 1 MiB
        total = 50 * len(chunk)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.005)

        baseline = _rss_bytes()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            status, _, _ = http_raw(
                daemon.port,
                "POST",
                fm_path(server, "write", file="/world.bin"),
                (chunk for _ in range(50)),
                {"Content-Type": "application/json", "Content-Length": str(total)},
            )
        finally:
            done.set()
            sampler.join()
        assert status == 204
        assert (server.fs.root / "world.bin").stat().st_size == total
        assert peak[0] - baseline < 10 * 1048576, f"RSS grew by {(peak[0] - baseline) >> 20} MiB"
        with open(server.fs.root / "world.bin", "rb") as fh:
            assert fh.read(len(chunk)) == chunk
            fh.seek(-len(chunk), os.SEEK_END)
            assert fh.read() == chunk


# -- signed URLs -----------------------------------------------------------------------------------


def signed_token(server_uuid, secret=TOKEN, expires_in_s=900, **claims):
    now = int(time.time())
    body = {
        "iss": "https://panel.example.com",
        "aud": ["http://127.0.0.1"],
        "jti": hashlib.md5(f"1{server_uuid}".encode()).hexdigest(),
        "iat": now,
        "nbf": now - 300,
        "exp": now + expires_in_s,
        "server_uuid": server_uuid,
        "user_uuid": "c0ffee00-1111-4222-8333-444455556666",
        "user_id": 1,
        "unique_id": uuidlib.uuid4().hex[:16],
        **claims,
    }
    return w.encode_jwt(body, secret)


def multipart_body(files: dict[str, bytes], boundary: str = "----wingsliteTestBoundary7MA4YWxk"):
    parts = []
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload(daemon, token, files, directory="/"):
    body, content_type = multipart_body(files)
    query = urllib.parse.urlencode({"token": token, "directory": directory})
    return http_raw(
        daemon.port, "POST", f"/upload/file?{query}", body, {"Content-Type": content_type}, None
    )


class TestSignedUrls:
    def test_download_once_with_a_valid_token_only(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon)
        (server.fs.root / "logs").mkdir()
        (server.fs.root / "logs" / "latest.log").write_bytes(b"[INFO] Done\n" * 100)
        token = signed_token(server.uuid, file_path="/logs/latest.log")
        status, headers, body = http_raw(
            daemon.port, "GET", f"/download/file?token={token}", token=None
        )
        assert status == 200 and body == b"[INFO] Done\n" * 100
        assert headers["content-disposition"] == 'attachment; filename="latest.log"'
        assert headers["content-type"] == "application/octet-stream"
        status, _, body = http_raw(daemon.port, "GET", f"/download/file?token={token}", token=None)
        assert status == 404 and json.loads(body)["error"] == w.SIGNED_URL_NOT_FOUND  # used once
        refused = {
            "expired": signed_token(server.uuid, expires_in_s=-5, file_path="/logs/latest.log"),
            "wrong key": signed_token(server.uuid, secret="x" * 64, file_path="/logs/latest.log"),
            "wrong scope": signed_token(
                server.uuid, scope="file-upload", file_path="/logs/latest.log"
            ),
            "no path": signed_token(server.uuid),
            "old": signed_token(
                server.uuid, iat=int(time.time()) - 3600, file_path="/logs/latest.log"
            ),
        }
        for what, bad in refused.items():
            status, _, body = http_raw(
                daemon.port, "GET", f"/download/file?token={bad}", token=None
            )
            assert status == 403, what
            assert json.loads(body)["error"], what
        other = signed_token(str(uuidlib.uuid4()), file_path="/logs/latest.log")
        status, _, _ = http_raw(daemon.port, "GET", f"/download/file?token={other}", token=None)
        assert status == 404
        (server.fs.root / 'wörld "1".txt').write_text("x")
        token = signed_token(server.uuid, file_path='/wörld "1".txt')
        status, headers, _ = http_raw(
            daemon.port, "GET", f"/download/file?token={token}", token=None
        )
        assert status == 200 and headers["content-disposition"] == (
            "attachment; filename=\"w_rld _1_.txt\"; filename*=UTF-8''w%C3%B6rld%20%221%22.txt"
        )
        for path in ("/logs", "/../../etc/passwd", "/missing"):
            token = signed_token(server.uuid, file_path=path)
            status, _, _ = http_raw(daemon.port, "GET", f"/download/file?token={token}", token=None)
            assert status == 404, path

    def test_upload_many_files_once_metered_and_limited(self, panel, make_daemon):
        daemon, server = _fm_daemon(panel, make_daemon, denylist=["*.jar"], api__upload_limit=1)
        events = []
        server.record_activity = lambda *args: events.append(args)
        token = signed_token(server.uuid)
        near_miss = b"\r\n------wingsliteTestBoundary7MA4YWx" * 20_000  # straddles every read
        files = {
            "a.txt": b"alpha\r\n--not-a-boundary",
            "b.bin": os.urandom(200_000),
            "c.bin": near_miss,
        }
        status, _, _ = upload(daemon, token, files, directory="/plugins")
        assert status == 200
        for name, data in files.items():
            assert (server.fs.root / "plugins" / name).read_bytes() == data
        assert [e[0] for e in events] == ["server:file.uploaded"] * 3
        assert (
            events[0][1] == "c0ffee00-1111-4222-8333-444455556666" and events[0][2] == "127.0.0.1"
        )
        assert events[0][3] == {"file": "a.txt", "directory": "/plugins"}
        assert upload(daemon, token, {"c.txt": b"again"})[0] == 404  # the token was used
        before = tree_snapshot(server.fs.root)
        too_big = {"ok.txt": b"fine", "huge.bin": b"h" * (1048576 + 1)}
        status, _, body = upload(daemon, signed_token(server.uuid), too_big)
        assert status == 400 and "maximum file upload size of 1 MB" in json.loads(body)["error"]
        status, _, body = upload(daemon, signed_token(server.uuid), {"x.txt": b"1", "p.jar": b"2"})
        assert status == 403
        limit = FM_LIMIT_MB * 1048576
        (server.fs.root / "fill.bin").write_bytes(b"f" * (limit - 300_000))
        server.fs.recalculate()
        before = tree_snapshot(server.fs.root)
        status, _, body = upload(
            daemon,
            signed_token(server.uuid),
            {"one.bin": b"1" * 200_000, "two.bin": b"2" * 200_000},
        )
        assert status == 400 and json.loads(body)["error"] == w.FM_NO_SPACE
        assert tree_snapshot(server.fs.root) == before
        status, _, body = upload(daemon, signed_token(server.uuid, scope="file-download"), files)
        assert status == 403
        query = urllib.parse.urlencode({"token": signed_token(server.uuid)})
        status, _, body = http_raw(
            daemon.port,
            "POST",
            f"/upload/file?{query}",
            b"{}",
            {"Content-Type": "application/json"},
            None,
        )
        assert status == 400 and "multipart" in json.loads(body)["error"]

    def test_headless_chromium_uploads_and_downloads_from_another_origin(
        self, panel, make_daemon, tmp_path
    ):
        page_server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), http.server.BaseHTTPRequestHandler
        )
        origin = f"http://127.0.0.1:{page_server.server_address[1]}"
        daemon, server = _fm_daemon(panel, make_daemon, allowed_origins=[origin])
        (server.fs.root / "eula.txt").write_text("eula=true\n")
        tokens = [signed_token(server.uuid) for _ in range(2)]
        download = signed_token(server.uuid, file_path="/eula.txt")
        node = f"http://127.0.0.1:{daemon.port}"
        page = f"""<!doctype html><script>
(async () => {{
  const results = [];
  try {{
    const files = [
      new File(["first file\\n"], "one.txt"),
      new File([new Uint8Array([0, 1, 2, 255])], "two.bin"),
    ];
    const tokens = {json.dumps(tokens)};
    for (let i = 0; i < 2; i++) {{
      const form = new FormData();
      form.append("files", files[i]);
      const url = "{node}/upload/file?token=" + tokens[i] + "&directory=%2Fuploads";
      const r = await fetch(url, {{method: "POST", body: form}});
      results.push(r.status);
    }}
    const d = await fetch("{node}/download/file?token={download}");
    results.push(d.status, await d.text());
  }} catch (e) {{ results.push("error: " + e); }}
  await fetch("/report", {{method: "POST", body: JSON.stringify(results)}});
}})();
</script>"""
        reports = []

        class Page(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                reports.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

        page_server.RequestHandlerClass = Page
        threading.Thread(target=page_server.serve_forever, daemon=True).start()
        browser = subprocess.Popen(
            [
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}",
                origin + "/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: reports, timeout_s=60, what="the page's report")
        finally:
            browser.kill()
            browser.wait()
            page_server.shutdown()
            page_server.server_close()
        assert reports[0] == [200, 200, 200, "eula=true\n"]
        assert (server.fs.root / "uploads" / "one.txt").read_bytes() == b"first file\n"
        assert (server.fs.root / "uploads" / "two.bin").read_bytes() == bytes([0, 1, 2, 255])


# -- remote downloads ------------------------------------------------------------------------------


class _Origin:
    """A loopback HTTP server for pulls: ``routes[path] = (status, headers, body or iterator)``."""

    def __init__(self):
        self.routes = {}
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                status, headers, body = origin.routes.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                with contextlib.suppress(OSError):
                    for piece in body:
                        self.wfile.write(piece)
                        self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def origin():
    o = _Origin()
    yield o
    o.close()


class TestFilePull:
    def test_internal_addresses_are_refused_by_default(self, panel, make_daemon, origin):
        daemon, server = _fm_daemon(panel, make_daemon)
        origin.routes["/mod.jar"] = (200, {}, b"jarbytes")
        for url in (
            origin.url + "/mod.jar",
            origin.url.replace("127.0.0.1", "localhost") + "/mod.jar",
        ):
            body = {"url": url, "root": "/", "foreground": True}
            status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
            assert status == 400 and "internal address" in answer["error"]
        assert not (server.fs.root / "mod.jar").exists()
        status, _, answer = api(
            daemon, "POST", fm_path(server, "pull"), {"url": "file:///etc/passwd"}
        )
        assert status == 400
        off, server2 = _fm_daemon(panel, make_daemon, api__disable_remote_download=True)
        for method, route in (("GET", "pull"), ("POST", "pull"), ("DELETE", "pull/abc")):
            status, _, answer = api(off, method, fm_path(server2, route), {"url": origin.url})
            assert status == 400 and answer["error"] == w.FM_PULL_DISABLED

    def test_pulls_when_allowed(self, panel, make_daemon, origin):
        daemon, server = _fm_daemon(
            panel, make_daemon, wingslite__remote_download_allow_internal=True
        )
        origin.routes["/files/Geyser.jar"] = (200, {}, b"G" * 5000)
        origin.routes["/dl?id=7"] = (
            200,
            {"Content-Disposition": 'attachment; filename="named.zip"'},
            b"PK\x03\x04zip",
        )
        origin.routes["/moved"] = (302, {"Location": origin.url + "/files/Geyser.jar"}, b"")
        body = {"url": origin.url + "/files/Geyser.jar", "root": "/plugins", "foreground": True}
        status, _, stat_answer = api(daemon, "POST", fm_path(server, "pull"), body)
        assert status == 200 and set(stat_answer) == FM_STAT_KEYS
        assert stat_answer["name"] == "Geyser.jar" and stat_answer["size"] == 5000
        assert (server.fs.root / "plugins" / "Geyser.jar").read_bytes() == b"G" * 5000
        body = {"url": origin.url + "/dl?id=7", "root": "/", "use_header": True, "foreground": True}
        assert api(daemon, "POST", fm_path(server, "pull"), body)[0] == 200
        assert (server.fs.root / "named.zip").read_bytes() == b"PK\x03\x04zip"
        body = {"url": origin.url + "/files/Geyser.jar", "root": "/", "file_name": "g.jar"}
        status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
        assert status == 202 and answer["identifier"]
        wait_for(lambda: (server.fs.root / "g.jar").exists(), what="the background pull")
        status, _, answer = api(
            daemon,
            "POST",
            fm_path(server, "pull"),
            {"url": origin.url + "/moved", "foreground": True},
        )
        assert status == 400 and "302" in answer["error"]  # redirects are not followed

    def test_progress_cancel_limit_and_disk(self, panel, make_daemon, origin):
        daemon, server = _fm_daemon(
            panel, make_daemon, wingslite__remote_download_allow_internal=True
        )
        release = threading.Event()

        def slow():
            yield b"s" * 1000
            release.wait(30)
            yield b"s" * 1000

        for i in range(4):
            origin.routes[f"/slow{i}"] = (200, {"Content-Length": "2000"}, slow())
        ids = []
        for i in range(3):
            body = {"url": f"{origin.url}/slow{i}", "root": "/", "file_name": f"slow{i}.bin"}
            status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
            assert status == 202
            ids.append(answer["identifier"])
        body = {"url": f"{origin.url}/slow3", "root": "/"}
        status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
        assert status == 400 and answer["error"] == w.FM_PULL_LIMIT

        def progress():
            listing = api(daemon, "GET", fm_path(server, "pull"))[2]["downloads"]
            return len(listing) == 3 and all(d["Progress"] == 0.5 for d in listing) and listing

        listing = wait_for(progress, what="three pulls at half way")
        assert {d["Identifier"] for d in listing} == set(ids)
        assert api(daemon, "DELETE", fm_path(server, f"pull/{ids[0]}"))[0] == 204
        release.set()
        wait_for(lambda: not api(daemon, "GET", fm_path(server, "pull"))[2]["downloads"])
        assert not (server.fs.root / "slow0.bin").exists()  # cancelled: nothing left
        assert (server.fs.root / "slow1.bin").read_bytes() == b"s" * 2000
        assert not list(server.fs.root.glob(".wingslite-*"))
        limit = FM_LIMIT_MB * 1048576
        origin.routes["/big"] = (200, {}, b"b" * (limit + 1))
        origin.routes["/big-unsized"] = (200, {}, iter([b"u" * 65536] * (limit // 65536 + 2)))
        server.fs.recalculate()
        before = tree_snapshot(server.fs.root)
        for path in ("/big", "/big-unsized"):
            body = {"url": origin.url + path, "root": "/", "foreground": True}
            status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
            assert status == 400 and answer["error"] == w.FM_NO_SPACE, path
        assert tree_snapshot(server.fs.root) == before


# backups ##########################################################################################


class S3StandIn:
    """Presigned S3 URLs on loopback: ``PUT ?partNumber=N`` stores a part and answers its ETag;
    ``GET /<key>`` serves ``objects[key]`` (a restore's download_url).

    ``fail[part_number] = [status, ...]`` answers those statuses first (then normally; an empty
    list with ``always_fail`` set answers 500 forever). ``gate`` (an Event) holds GETs until set.
    """

    def __init__(self):
        self.parts: dict[int, bytes] = {}
        self.puts: list[tuple[int, int]] = []  # (part number, bytes received), every try
        self.fail: dict[int, list[int]] = {}
        self.always_fail: set[int] = set()
        self.objects: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self, status, body=b"", headers=None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                number = int(query["partNumber"][0])
                data = self.rfile.read(int(self.headers["Content-Length"]))
                stand_in.puts.append((number, len(data)))
                queued = stand_in.fail.get(number)
                if number in stand_in.always_fail or queued:
                    return self.answer(queued.pop(0) if queued else 500, b"<Error/>")
                stand_in.parts[number] = data
                etag = '"' + hashlib.md5(data).hexdigest() + '"'
                return self.answer(200, headers={"ETag": etag})

            def do_GET(self):
                stand_in.gate.wait(30)
                data = stand_in.objects.get(urllib.parse.urlsplit(self.path).path.lstrip("/"))
                if data is None:
                    return self.answer(404, b"<Error>NoSuchKey</Error>")
                return self.answer(200, data, {"Content-Type": "application/x-gzip"})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve_for(self, panel, part_size: int) -> None:
        """Make the Panel stand-in hand out this stand-in's URLs, in parts of ``part_size``."""
        panel.backup_part_size = part_size
        panel.presign = lambda backup, n: f"{self.url}/{backup}.tar.gz?partNumber={n}&uploadId=u1"

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def s3():
    stand_in = S3StandIn()
    yield stand_in
    stand_in.close()


def panel_report(panel, backup: str) -> dict | None:
    """The Panel's backup row once the node reported (``POST /backups/{uuid}``), else None."""
    with panel.lock:
        row = dict(panel.backups.get(backup) or {})
    if row.get("successful") is None:
        return None
    row.pop("server", None)
    row.pop("restored", None)
    return row


def restore_report(panel, backup: str) -> dict | None:
    """``{"successful": ...}`` once the node reported a restore (``POST .../restore``)."""
    with panel.lock:
        row = panel.backups.get(backup) or {}
        return {"successful": row["restored"]} if "restored" in row else None


def backup_token(server: str, backup: str, secret: str = TOKEN, **changes) -> str:
    """The JWT of the Panel's DownloadLinkService for a wings backup (the Panel's
    NodeJWTService)."""
    claims = ws_claims(server, backup_uuid=backup, unique_id=uuidlib.uuid4().hex, **changes)
    del claims["permissions"]
    return ws_token(claims, secret)


def download(daemon, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/download/backup?token=" + urllib.parse.quote(token))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def tar_names(data: bytes) -> set[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return set(tar.getnames())


class TestBackups:
    @pytest.fixture
    def node(self, console_node):
        daemon = console_node()
        daemon.root = daemon.config.data_dir / daemon.uuid
        daemon.root.mkdir(parents=True, exist_ok=True)
        return daemon

    @staticmethod
    def fill(root: Path) -> dict[str, bytes]:
        files = {
            "server.properties": b"motd=hello\n",
            "world/region/r.0.0.mca": os.urandom(70_000),
            "world/level.dat": b"\x00level" * 100,
            "plugins/a/config.yml": b"a: 1\n",
            "logs/latest.log": b"log line\n" * 100,
        }
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return files

    @staticmethod
    def backup(daemon, server: str, adapter: str = "wings", ignore: str = "", uuid=None) -> dict:
        panel = daemon.panel_fake
        backup = panel.add_backup(server, uuid)  # the Panel makes the row before it asks
        body = {"adapter": adapter, "uuid": backup, "ignore": ignore}
        status, _, answer = api(daemon, "POST", f"/api/servers/{server}/backup", body)
        assert status == 202, answer
        report = wait_for(lambda: panel_report(panel, backup), 30, what="the backup report")
        return {"uuid": backup, **report}

    def test_a_backup_is_reported_with_the_sha1_of_the_bytes_the_token_downloads(self, node):
        self.fill(node.root)
        conn, _ = ws_authed(node, node.uuid, permissions=["websocket.connect", "backup.read"])
        blind, _ = ws_authed(node, node.uuid, permissions=["websocket.connect"])
        report = self.backup(node, node.uuid, ignore="*.log\n")
        assert report["successful"] is True and report["checksum_type"] == "sha1"
        assert report["parts"] is None
        archive = node.config.get("system.backup_directory") + f"/{report['uuid']}.tar.gz"
        assert os.path.getsize(archive) == report["size"]
        assert [p.name for p in Path(archive).parent.iterdir()] == [Path(archive).name]

        status, data = download(node, backup_token(node.uuid, report["uuid"]))
        assert status == 200 and hashlib.sha1(data).hexdigest() == report["checksum"]
        assert tar_names(data) == {
            "server.properties",
            "world",
            "world/region",
            "world/region/r.0.0.mca",
            "world/level.dat",
            "plugins",
            "plugins/a",
            "plugins/a/config.yml",
            "logs",
        }
        event = json.loads(ws_until(conn, f"backup completed:{report['uuid']}")[0])
        assert event == {
            "uuid": report["uuid"],
            "is_successful": True,
            "checksum": report["checksum"],
            "checksum_type": "sha1",
            "file_size": report["size"],
        }
        # the socket without backup.read saw no backup event before a line sent after it
        node.servers[node.uuid].console_message("marker after the backup")
        names = []
        while not names or names[-1] != "console output":
            names.append(ws_event(blind, 5)[0])
        assert not any(name.startswith("backup completed") for name in names)
        conn.close()
        blind.close()

    def test_pteroignore_with_an_exception_is_used_when_ignore_is_empty(self, node):
        self.fill(node.root)
        (node.root / "logs" / "keep.log").write_bytes(b"keep")
        (node.root / ".pteroignore").write_text("# comment\n*.log\n!keep.log\nworld/region/\n")
        report = self.backup(node, node.uuid)
        status, data = download(node, backup_token(node.uuid, report["uuid"]))
        assert status == 200
        names = tar_names(data)
        assert "logs/keep.log" in names and "logs/latest.log" not in names
        assert "world/region" not in names and "world/level.dat" in names
        assert ".pteroignore" in names

    def test_bad_requests_are_refused_and_write_nothing(self, node):
        backups = Path(node.config.get("system.backup_directory"))
        path = f"/api/servers/{node.uuid}/backup"
        cases = [
            ({"adapter": "wings", "uuid": "../../etc/passwd"}, 422),
            ({"adapter": "wings", "uuid": "not-a-uuid"}, 422),
            ({"adapter": "ftp", "uuid": str(uuidlib.uuid4())}, 422),
            ({"adapter": "wings", "uuid": str(uuidlib.uuid4()), "ignore": 5}, 422),
            (["adapter"], 422),
        ]
        for body, expected in cases:
            status, _, answer = api(node, "POST", path, body)
            assert status == expected and answer["error"], (body, answer)
        body = {"adapter": "wings", "uuid": str(uuidlib.uuid4())}
        status, _, answer = api(node, "POST", f"/api/servers/{uuidlib.uuid4()}/backup", body)
        assert status == 404
        time.sleep(0.2)
        assert not backups.exists() or list(backups.iterdir()) == []
        assert not any("/backups/" in r.path for r in node.panel_fake.requests)

    def test_the_download_token_is_one_time_and_refused_when_wrong(self, node, panel):
        other = panel.add(panel_document())
        node.sync_server(node.servers.get(other) or node.create_server(other))
        report = self.backup(node, node.uuid)
        backup = report["uuid"]
        token = backup_token(node.uuid, backup)
        assert download(node, token)[0] == 200
        assert download(node, token)[0] in (403, 404)  # used once already
        assert download(node, backup_token(node.uuid, backup, lifetime=-10))[0] == 403
        assert download(node, backup_token(node.uuid, backup, secret="another-node"))[0] == 403
        # a token for another server of this node, naming this server's backup
        assert download(node, backup_token(other, backup))[0] == 404
        assert download(node, backup_token(node.uuid, "../" + backup))[0] == 404
        assert download(node, "")[0] == 403
        assert download(node, backup_token(node.uuid, backup))[0] == 200

    def test_delete_removes_the_archive_and_unknown_backups_are_404(self, node, panel):
        other = panel.add(panel_document())
        node.create_server(other)
        report = self.backup(node, node.uuid)
        archive = Path(node.config.get("system.backup_directory")) / f"{report['uuid']}.tar.gz"
        assert api(node, "DELETE", f"/api/servers/{other}/backup/{report['uuid']}")[0] == 404
        assert archive.exists()
        assert api(node, "DELETE", f"/api/servers/{node.uuid}/backup/{report['uuid']}")[0] == 204
        assert not archive.exists()
        status, _, answer = api(node, "DELETE", f"/api/servers/{node.uuid}/backup/{report['uuid']}")
        assert (
            status == 404
            and answer["error"] == "The requested backup was not found on this server."
        )
        assert api(node, "DELETE", f"/api/servers/{node.uuid}/backup/..%2f..%2fetc")[0] == 404

    def restore(self, daemon, server, backup, truncate, adapter="wings", url=""):
        panel = daemon.panel_fake
        with panel.lock:
            panel.backups.setdefault(backup, {"server": server, "successful": None})
            panel.backups[backup].pop("restored", None)
        body = {"adapter": adapter, "truncate_directory": truncate, "download_url": url}
        status, _, answer = api(
            daemon, "POST", f"/api/servers/{server}/backup/{backup}/restore", body
        )
        assert status == 202, answer
        return wait_for(lambda: restore_report(panel, backup), 30, what="the restore report")

    def test_restore_with_and_without_truncate_brings_the_files_back(self, node):
        files = self.fill(node.root)
        report = self.backup(node, node.uuid)
        (node.root / "world" / "level.dat").write_bytes(b"corrupted")
        (node.root / "plugins" / "a" / "config.yml").unlink()
        (node.root / "extra.txt").write_bytes(b"made after the backup")
        conn, _ = ws_authed(node, node.uuid)
        assert self.restore(node, node.uuid, report["uuid"], truncate=False) == {"successful": True}
        ws_until(conn, "backup restore completed")
        for rel, data in files.items():
            assert (node.root / rel).read_bytes() == data, rel
        assert (node.root / "extra.txt").exists()  # not truncated
        console = node.servers[node.uuid].console.tail(200)
        assert any("(restoring): " in line for line in console)

        assert self.restore(node, node.uuid, report["uuid"], truncate=True) == {"successful": True}
        assert not (node.root / "extra.txt").exists()
        for rel, data in files.items():
            assert (node.root / rel).read_bytes() == data, rel
        usage = node.servers[node.uuid].fs.usage_bytes()
        assert usage == w.Filesystem(node.root).recalculate()
        conn.close()

    def test_a_restored_file_deleted_gives_back_what_it_booked(self, node):
        files = self.fill(node.root)
        report = self.backup(node, node.uuid)
        (node.root / "world" / "region" / "r.0.0.mca").unlink()
        fs = node.servers[node.uuid].fs
        fs.check_interval_s = fs.recheck_after_unknown_s = 3600  # no walks from here on
        before = fs.recalculate()
        assert self.restore(node, node.uuid, report["uuid"], truncate=False) == {"successful": True}
        size = len(files["world/region/r.0.0.mca"])
        assert fs.usage_bytes() == before + size
        deletes = {"root": "/world/region", "files": ["r.0.0.mca"]}
        assert api(node, "POST", fm_path(node, "delete"), deletes)[0] == 204
        assert fs.usage_bytes() == before

    def test_restore_of_an_unknown_backup_or_bad_body_is_refused(self, node):
        path = f"/api/servers/{node.uuid}/backup/{uuidlib.uuid4()}/restore"
        assert api(node, "POST", path, {"adapter": "wings", "truncate_directory": True})[0] == 404
        status, _, answer = api(node, "POST", path, {"adapter": "s3", "truncate_directory": True})
        assert status == 400 and "download_url" in answer["error"]
        assert api(node, "POST", path, {"adapter": "wings", "truncate_directory": "yes"})[0] == 422
        assert not any("/backups/" in r.path for r in node.panel_fake.requests)

    def test_s3_parts_have_the_panels_part_size_and_their_etags_are_reported(self, node, s3):
        (node.root / "big.bin").write_bytes(os.urandom(300_000))  # incompressible: several parts
        s3.serve_for(node.panel_fake, 64 * 1024)
        report = self.backup(node, node.uuid, adapter="s3")
        assert report["successful"] is True
        count = -(-report["size"] // (64 * 1024))
        assert count >= 4 and sorted(s3.parts) == list(range(1, count + 1))
        assert all(len(s3.parts[n]) == 64 * 1024 for n in range(1, count))
        assert 0 < len(s3.parts[count]) <= 64 * 1024
        whole = b"".join(s3.parts[n] for n in range(1, count + 1))
        assert (
            len(whole) == report["size"] and hashlib.sha1(whole).hexdigest() == report["checksum"]
        )
        assert report["parts"] == [
            {"etag": '"' + hashlib.md5(s3.parts[n]).hexdigest() + '"', "part_number": n}
            for n in range(1, count + 1)
        ]
        assert list(Path(node.config.get("system.backup_directory")).iterdir()) == []
        # ...and the same archive restores from its download URL
        (node.root / "big.bin").unlink()
        s3.objects["restore.tar.gz"] = whole
        result = self.restore(
            node, node.uuid, report["uuid"], False, "s3", s3.url + "/restore.tar.gz"
        )
        assert result == {"successful": True} and (node.root / "big.bin").stat().st_size == 300_000

    def test_an_s3_part_answered_500_is_retried_then_the_backup_fails_cleanly(
        self, node, s3, monkeypatch
    ):
        monkeypatch.setattr(w.Backups, "upload_backoff_s", 0.01)
        (node.root / "big.bin").write_bytes(os.urandom(200_000))
        s3.serve_for(node.panel_fake, 64 * 1024)
        s3.fail[1] = [503]  # a passing failure: retried, then accepted
        s3.always_fail.add(2)
        conn, _ = ws_authed(node, node.uuid)
        report = self.backup(node, node.uuid, adapter="s3")
        assert report == {"uuid": report["uuid"], **w._failed_backup_body()}
        assert report["successful"] is False
        assert [n for n, _ in s3.puts].count(1) == 2
        assert [n for n, _ in s3.puts].count(2) == w.Backups.upload_attempts
        assert all(size == 64 * 1024 for _, size in s3.puts)  # each try re-read the whole part
        assert list(Path(node.config.get("system.backup_directory")).iterdir()) == []
        event = ws_until(conn, f"backup completed:{report['uuid']}")
        assert json.loads(event[0])["is_successful"] is False
        conn.close()

    def test_power_actions_answer_409_while_restoring(self, node, s3):
        self.fill(node.root)
        report = self.backup(node, node.uuid)
        status, data = download(node, backup_token(node.uuid, report["uuid"]))
        s3.objects["b.tar.gz"] = data
        s3.gate.clear()  # the download hangs until the gate opens
        body = {"adapter": "s3", "truncate_directory": True, "download_url": s3.url + "/b.tar.gz"}
        restore = f"/api/servers/{node.uuid}/backup/{report['uuid']}/restore"
        answer: list = []
        thread = threading.Thread(target=lambda: answer.append(api(node, "POST", restore, body)))
        thread.start()
        server = node.servers[node.uuid]
        wait_for(lambda: server.restoring, what="the restore to begin")
        status, _, error = api(node, "POST", f"/api/servers/{node.uuid}/power", {"action": "start"})
        assert status == 409 and error["error"] == "server is currently restoring"
        assert api(node, "POST", restore, {**body, "truncate_directory": False})[0] == 409
        s3.gate.set()
        thread.join(30)
        assert answer[0][0] == 202
        wait_for(lambda: restore_report(node.panel_fake, report["uuid"]), 30)
        wait_for(lambda: not server.restoring, what="the restore to end")
        assert api(node, "POST", f"/api/servers/{node.uuid}/power", {"action": "start"})[0] == 202

    def test_a_failed_restore_is_reported_and_says_what_was_restored(self, node, s3):
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in (("ok.txt", b"fine"), ("../escape.txt", b"bad")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        s3.objects["bad.tar.gz"] = buf.getvalue()
        backup = str(uuidlib.uuid4())
        result = self.restore(node, node.uuid, backup, False, "s3", s3.url + "/bad.tar.gz")
        assert result == {"successful": False}
        assert (node.root / "ok.txt").read_bytes() == b"fine"
        assert not (node.root.parent / "escape.txt").exists()
        console = "\n".join(node.servers[node.uuid].console.tail(50))
        assert "after 1 files were restored" in console and "refused archive entry" in console

    @pytest.mark.docker
    def test_restore_of_a_running_docker_server_stops_it_first(self, docker_daemon):
        daemon, uuid = docker_daemon.daemon, docker_daemon.uuid
        daemon.panel_fake = docker_daemon.panel
        root = daemon.config.data_dir / uuid
        files = self.fill(root)
        report = self.backup(daemon, uuid)
        assert report["successful"]
        (root / "world" / "level.dat").write_bytes(b"broken by the game")
        (root / "server.properties").unlink()
        assert daemon.get_server(uuid).state == "running"
        assert self.restore(daemon, uuid, report["uuid"], truncate=True) == {"successful": True}
        assert daemon.get_server(uuid).state == "offline"
        assert not docker_daemon.inspect(uuid)["State"]["Running"]
        for rel, data in files.items():
            assert (root / rel).read_bytes() == data, rel
        assert any("(restoring): " in line for line in docker_daemon.console(uuid))
        docker_daemon.start(uuid)  # and it runs again from the restored files

    def test_a_backup_interrupted_by_a_restart_is_cleaned_and_reported_failed(
        self, panel, make_daemon
    ):
        server = panel.add(panel_document())
        daemon = make_daemon(panel)
        backup = panel.add_backup(server)
        # what a daemon stopped mid-backup leaves: its record and the temporary archive
        daemon.backups.records.write(backup, server, "wings", "running")
        temp = daemon.backups.temp_path(backup)
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"\x1f\x8b half an archive")
        other_run = panel.add_backup(server)  # renamed just before the restart, never reported
        daemon.backups.records.write(other_run, server, "s3", "running")
        daemon.backups.path(other_run).write_bytes(b"\x1f\x8b a whole archive")
        unrelated = temp.parent / "someone-elses.tmp"
        unrelated.write_bytes(b"x")
        daemon.stop()
        make_daemon(panel)
        report = wait_for(lambda: panel_report(panel, backup), 10)
        assert report == w._failed_backup_body()
        assert wait_for(lambda: panel_report(panel, other_run), 10) == w._failed_backup_body()
        assert not temp.exists() and not daemon.backups.path(other_run).exists()
        assert unrelated.exists()
        assert daemon.backups.records.running() == []

    def test_a_write_limit_still_makes_the_same_archive(self, console_node):
        daemon = console_node(system__backups={"write_limit": 1, "compression_level": "none"})
        root = daemon.config.data_dir / daemon.uuid
        root.mkdir(parents=True, exist_ok=True)
        files = self.fill(root)
        report = self.backup(daemon, daemon.uuid)
        status, data = download(daemon, backup_token(daemon.uuid, report["uuid"]))
        assert status == 200 and len(data) == report["size"]
        assert len(data) > sum(len(d) for d in files.values())  # gzip level 0: stored
        assert "world/region/r.0.0.mca" in tar_names(data)

    def test_a_200_mib_directory_is_backed_up_in_bounded_memory(self, node):
        for i in range(200):
            (node.root / f"chunk{i // 50}").mkdir(exist_ok=True)
            (node.root / f"chunk{i // 50}" / f"{i}.bin").write_bytes(os.urandom(1 << 20))

        def rss_kib(field: str) -> int:
            text = Path("/proc/self/status").read_text()
            return int(text.split(field + ":")[1].split()[0])

        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        before = rss_kib("VmRSS")
        report = self.backup(node, node.uuid)
        assert report["successful"] and report["size"] > 200 * (1 << 20)
        growth_mib = (rss_kib("VmHWM") - before) / 1024
        assert growth_mib < 20, f"RSS grew by {growth_mib:.1f} MiB"


# transfers ########################################################################################


DST_TOKEN_ID = "dstnode0000000ab"
DST_TOKEN = "d" * 64


def transfer_token(server: str, secret: str = DST_TOKEN, lifetime: int = 900, **changes) -> str:
    """The JWT of the Panel's ServerTransferController (NodeJWTService): HS256 with the
    destination's node token, sub = server uuid (claim and header), jti = sha256(uuid)."""
    now = int(time.time())
    claims = {
        "iss": "https://panel.example.com",
        "aud": ["http://127.0.0.1:8081"],
        "jti": hashlib.sha256(server.encode()).hexdigest(),
        "iat": now,
        "nbf": now - 300,
        "exp": now + lifetime,
        "sub": server,
        "unique_id": uuidlib.uuid4().hex[:16],
    }
    claims.update(changes)
    return ws_token(claims, secret, header={"sub": server})


class TransferPanel(FakePanel):
    """The Panel as the destination node sees it: on ``/transfer/success`` it deletes the server
    on the source node before answering, as ``ServerTransferController@success`` does."""

    def __init__(self):
        super().__init__(DST_TOKEN_ID, DST_TOKEN)
        self.source: w.Daemon | None = None
        self.delete_answers: list[int] = []

    def route_transfer(self, h, req, ident, outcome):
        if outcome == "success" and self.source is not None:
            status = api(self.source, "DELETE", f"/api/servers/{ident}")[0]
            self.delete_answers.append(status)
        return super().route_transfer(h, req, ident, outcome)


def tree_of(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and content (files) or target (links)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def send_archive(daemon, token, parts: list[tuple[str, bytes]], chunked: bool = True):
    """POST /api/transfers as Wings' source does: multipart, optionally chunked."""
    boundary = "b" * 30
    body = b""
    for name, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if name == "archive":
            head += '; filename="archive.tar.gz"\r\nContent-Type: application/octet-stream'
        body += head.encode() + b"\r\n\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    head = (
        "POST /api/transfers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    )
    if token is not None:
        head += f"Authorization: {token}\r\n"
    if chunked:  # two chunks, as a streaming source sends them
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:100], body[100:]) if c)
        head, body = head + "Transfer-Encoding: chunked\r\n", framed + b"0\r\n\r\n"
    else:
        head += f"Content-Length: {len(body)}\r\n"
    # One write: a refusal then meets the whole (small) body in the daemon's buffer, as it would
    # once a real source's first chunks are in flight.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
    return resp.status, json.loads(data) if data else None


def tar_gz(entries: list[tuple[str, bytes | None, str | None]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def transfer_pair(panel, make_daemon, tmp_path, uuid: str, source=None) -> types.SimpleNamespace:
    """A source daemon (``source``, or a new one against ``panel``) with server ``uuid``, and a
    destination daemon with a node token and a ``TransferPanel`` of its own (the caller closes
    ``dst_panel``) that answers for the server without listing it, as the Panel does while the
    transfer runs."""
    source = source or make_daemon(panel)
    dst_panel = TransferPanel()
    dst_panel.add(copy.deepcopy(panel.servers[uuid]))
    dst_panel.unlisted.add(uuid)
    dst_panel.source = source
    destination = make_daemon(
        dst_panel,
        token_id=DST_TOKEN_ID,
        token=DST_TOKEN,
        system__root_directory=str(tmp_path / "dst" / "root"),
        system__data=str(tmp_path / "dst" / "volumes"),
    )
    src_root = source.get_server(uuid).fs.root
    src_root.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(
        uuid=uuid,
        panel=panel,
        dst_panel=dst_panel,
        source=source,
        destination=destination,
        src_root=src_root,
        dst_root=tmp_path / "dst" / "volumes" / uuid,
    )


class TestTransfers:
    """Two daemons on loopback, each with its own Panel view, moving a server between them."""

    @pytest.fixture
    def pair(self, panel, make_daemon, tmp_path):
        pair = transfer_pair(panel, make_daemon, tmp_path, panel.add(panel_document()))
        yield pair
        pair.dst_panel.close()

    @staticmethod
    def fill(root: Path) -> None:
        (root / "world" / "region").mkdir(parents=True)
        (root / "world" / "region" / "r.0.0.mca").write_bytes(os.urandom(300_000))
        (root / "server.properties").write_text("server-port=25565\n")
        (root / "start.sh").write_text("#!/bin/sh\n")
        (root / "start.sh").chmod(0o750)
        (root / "empty").mkdir()
        (root / "latest.log").symlink_to("world/region/r.0.0.mca")

    @staticmethod
    def start(pair, url=None, token=None) -> None:
        body = {
            "server_id": pair.uuid,
            "url": url or f"http://127.0.0.1:{pair.destination.port}/api/transfers",
            "token": token or "Bearer " + transfer_token(pair.uuid),
            "server": {"uuid": pair.uuid, "start_on_completion": False},
        }
        with pair.dst_panel.lock:
            pair.dst_panel.transfers[pair.uuid] = None  # the Panel's active ServerTransfer row
        with pair.panel.lock:
            pair.panel.transfers[pair.uuid] = None
        status, _, answer = api(pair.source, "POST", f"/api/servers/{pair.uuid}/transfer", body)
        assert status == 202, answer

    @pytest.mark.docker  # the source removes its container
    def test_a_server_moves_with_its_files_links_modes_and_empty_directories(self, pair):
        self.fill(pair.src_root)
        before = tree_of(pair.src_root)
        self.start(pair)
        wait_for(lambda: pair.dst_panel.transfers.get(pair.uuid) is True, 30, what="success")
        assert tree_of(pair.dst_root) == before
        assert pair.dst_panel.delete_answers == [204]  # the source deleted inside the success call
        wait_for(lambda: not pair.src_root.exists(), 10, what="the source's files to go")
        assert api(pair.source, "GET", f"/api/servers/{pair.uuid}")[0] == 404
        status = api(pair.destination, "GET", f"/api/servers/{pair.uuid}", token=DST_TOKEN)[0]
        assert status == 200
        assert pair.destination.get_server(pair.uuid).transferring is False
        # the destination keeps it across a restart: its configuration was saved
        assert (pair.destination.store.path(pair.uuid)).exists()
        assert pair.panel.transfers[pair.uuid] is None  # the source never reports success

    def test_power_actions_wait_out_a_transfer_and_a_failure_is_reported_by_the_source(self, pair):
        self.fill(pair.src_root)
        # nothing listens there: the push fails, the source tells its Panel, the server is usable
        self.start(pair, url=f"http://127.0.0.1:{free_port()}/api/transfers")
        wait_for(lambda: pair.panel.transfers.get(pair.uuid) is False, 20, what="failure report")
        server = pair.source.get_server(pair.uuid)
        wait_for(lambda: not server.transferring, 5, what="transferring to be cleared")
        assert tree_of(pair.src_root)  # nothing lost on the source

    def test_power_is_refused_while_transferring(self, pair):
        server = pair.source.get_server(pair.uuid)
        server.transferring = True
        for action in ("start", "stop", "restart", "kill"):
            status, _, body = api(
                pair.source, "POST", f"/api/servers/{pair.uuid}/power", {"action": action}
            )
            assert (status, body["error"]) == (409, "server is currently being transferred")

    def test_a_tampered_archive_fails_on_both_sides_and_leaves_nothing(self, pair):
        archive = tar_gz([("a.txt", b"hello", None)])
        digest = hashlib.sha256(archive + b"x").hexdigest()  # not what was sent
        token = "Bearer " + transfer_token(pair.uuid)
        pair.dst_panel.transfers[pair.uuid] = None
        status, body = send_archive(
            pair.destination, token, [("archive", archive), ("checksum", digest.encode())]
        )
        assert status == 400 and "checksums don't match" in body["error"]
        assert pair.dst_panel.transfers[pair.uuid] is False
        assert not pair.dst_root.exists()
        assert api(pair.destination, "GET", f"/api/servers/{pair.uuid}", token=DST_TOKEN)[0] == 404

    def test_a_good_archive_sent_by_hand_is_accepted_with_and_without_chunking(self, pair):
        archive = tar_gz([("dir/a.txt", b"hello", None), ("ln", None, "dir/a.txt")])
        digest = hashlib.sha256(archive).hexdigest().encode()
        pair.dst_panel.transfers[pair.uuid] = None
        status, _ = send_archive(
            pair.destination,
            "Bearer " + transfer_token(pair.uuid),
            [("archive", archive), ("checksum", digest)],
            chunked=False,
        )
        assert status == 200
        assert (pair.dst_root / "dir" / "a.txt").read_bytes() == b"hello"
        assert os.readlink(pair.dst_root / "ln") == "dir/a.txt"

    @pytest.mark.parametrize(
        "entries",
        [
            [("../evil.txt", b"x", None)],
            [("ok.txt", b"x", None), ("out", None, "../../etc")],
            [("/abs.txt", b"x", None)],
        ],
        ids=["dotdot", "link-out", "absolute"],
    )
    def test_an_entry_that_would_escape_is_refused_and_nothing_stays(self, pair, entries):
        archive = tar_gz(entries)
        pair.dst_panel.transfers[pair.uuid] = None
        status, body = send_archive(
            pair.destination,
            "Bearer " + transfer_token(pair.uuid),
            [("archive", archive), ("checksum", hashlib.sha256(archive).hexdigest().encode())],
        )
        assert status == 400, body
        assert pair.dst_panel.transfers[pair.uuid] is False
        assert not pair.dst_root.exists()
        assert not (pair.dst_root.parent / "evil.txt").exists()

    def test_a_destination_over_its_disk_limit_fails_the_transfer(self, pair):
        pair.dst_panel.servers[pair.uuid]["settings"]["build"]["disk_space"] = 1  # 1 MiB
        (pair.src_root / "big.bin").write_bytes(os.urandom(3 * 1048576))
        self.start(pair)
        wait_for(lambda: pair.dst_panel.transfers.get(pair.uuid) is False, 30, what="failure")
        wait_for(lambda: pair.panel.transfers.get(pair.uuid) is False, 30, what="source failure")
        assert not pair.dst_root.exists()
        assert pair.source.get_server(pair.uuid).transferring is False
        assert (pair.src_root / "big.bin").stat().st_size == 3 * 1048576

    @pytest.mark.parametrize(
        "token, status",
        [
            (None, 401),
            ("Basic abc", 401),
            ("Bearer " + "x.y.z", 403),
            ("expired", 403),
            ("other-key", 403),
            ("websocket", 403),
            ("unknown-server", 404),
        ],
        ids=["missing", "not-bearer", "garbage", "expired", "other-key", "websocket", "unknown"],
    )
    def test_bad_tokens_are_refused_before_anything_is_made(self, pair, token, status):
        made = {
            "expired": lambda: transfer_token(pair.uuid, lifetime=-10),
            "other-key": lambda: transfer_token(pair.uuid, secret=TOKEN),
            "websocket": lambda: ws_token(ws_claims(pair.uuid), DST_TOKEN),
            "unknown-server": lambda: transfer_token(str(uuidlib.uuid4())),
        }
        if token in made:
            token = "Bearer " + made[token]()
        archive = tar_gz([("a.txt", b"x", None)])
        got, body = send_archive(
            pair.destination,
            token,
            [("archive", archive), ("checksum", hashlib.sha256(archive).hexdigest().encode())],
        )
        assert got == status, body
        assert not pair.dst_root.exists()
        assert api(pair.destination, "GET", f"/api/servers/{pair.uuid}", token=DST_TOKEN)[0] == 404

    def test_a_token_is_used_once_and_a_server_the_node_has_is_refused(self, pair):
        archive = tar_gz([("a.txt", b"x", None)])
        parts = [("archive", archive), ("checksum", hashlib.sha256(archive).hexdigest().encode())]
        token = "Bearer " + transfer_token(pair.uuid)
        pair.dst_panel.transfers[pair.uuid] = None
        assert send_archive(pair.destination, token, parts)[0] == 200
        assert send_archive(pair.destination, token, parts)[0] == 403  # replayed
        fresh = "Bearer " + transfer_token(pair.uuid)
        assert send_archive(pair.destination, fresh, parts)[0] == 409  # already on this node
        assert (pair.dst_root / "a.txt").read_bytes() == b"x"

    def test_cancel_routes_answer_409_when_nothing_is_running(self, pair):
        for path in (f"/api/servers/{pair.uuid}/transfer", f"/api/transfers/{pair.uuid}"):
            status, _, body = api(pair.source, "DELETE", path)
            assert (status, body["error"]) == (409, "Server is not currently being transferred.")

    def test_a_500_mib_server_moves_with_both_daemons_rss_growing_less_than_20_mib(self, pair):
        chunk = os.urandom(1 << 20)
        for i in range(5):
            with open(pair.src_root / f"part{i}.bin", "wb") as fh:
                for j in range(100):
                    fh.write(chunk[j:] + chunk[:j])  # 100 MiB that gzip cannot shrink
        baseline, peak = _rss_bytes(), [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            self.start(pair)
            wait_for(
                lambda: pair.dst_panel.transfers.get(pair.uuid) is not None, 300, what="the end"
            )
        finally:
            done.set()
            sampler.join()
        assert pair.dst_panel.transfers[pair.uuid] is True
        assert (pair.dst_root / "part4.bin").stat().st_size == 100 << 20
        growth = peak[0] - baseline
        assert growth < 20 << 20, f"RSS grew by {growth / 1048576:.1f} MiB during the transfer"

    @pytest.mark.docker
    def test_a_running_server_is_stopped_before_it_leaves(self, docker_servers, tmp_path):
        uuid = docker_servers.add(stop=("command", "ignored"))  # never stops by itself
        source = docker_servers.boot()
        pair = transfer_pair(
            docker_servers.panel, docker_servers.make_daemon, tmp_path, uuid, source=source
        )
        dst_panel = pair.dst_panel
        try:
            docker_servers.start(uuid)
            (source.get_server(uuid).fs.root / "save.dat").write_bytes(b"state")
            server = source.get_server(uuid)
            OutgoingTransferWait = w.OutgoingTransfer.stop_wait_s
            w.OutgoingTransfer.stop_wait_s = 2.0
            try:
                self.start(pair)
                wait_for(lambda: dst_panel.transfers.get(uuid) is True, 60, what="success")
            finally:
                w.OutgoingTransfer.stop_wait_s = OutgoingTransferWait
            assert server.env.state == w.OFFLINE
            assert (tmp_path / "dst" / "volumes" / uuid / "save.dat").read_bytes() == b"state"
            wait_for(
                lambda: docker_servers.container_id(uuid) is None, 10, what="container removed"
            )
        finally:
            dst_panel.close()


# metrics ##########################################################################################


_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"


def parse_exposition(text: str) -> dict[str, dict]:
    """A strict reader of Prometheus' text format 0.0.4; any deviation is an AssertionError.

    Returns ``{family: {"type", "help", "samples": {(name, ((label, value), ...)): float}}}``.
    """
    import re

    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, dict] = {}
    finished: set[str] = set()
    current = None
    sample_re = re.compile(rf"^({_METRIC_NAME})(\{{(.*)\}})? (\S+)( -?\d+)?$")
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        assert line, f"{where}: empty lines are not written"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[0] == "#" and parts[1] in ("HELP", "TYPE") and len(parts) >= 3, where
            name = parts[2]
            assert re.fullmatch(_METRIC_NAME, name), where
            family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
            assert name not in finished and not family["samples"], f"{where}: family reopened"
            key = parts[1].lower()
            assert family[key] is None, f"{where}: second {parts[1]}"
            family[key] = parts[3] if len(parts) > 3 else ""
            if key == "type":
                assert family["type"] in ("counter", "gauge", "histogram"), where
            if current and current != name:
                finished.add(current)
            current = name
            continue
        match = sample_re.match(line)
        assert match, f"{where}: not a sample"
        name, _, label_text, value_text = match.group(1, 2, 3, 4)
        family_name = current
        assert family_name, f"{where}: a sample before any TYPE"
        kind = families[family_name]["type"]
        assert kind is not None, f"{where}: a sample before its TYPE"
        allowed = (
            {family_name + s for s in ("_bucket", "_sum", "_count")}
            if kind == "histogram"
            else {family_name}
        )
        assert name in allowed, f"{where}: {name} does not belong to family {family_name}"
        labels = _parse_labels(label_text or "", where)
        value = float(value_text) if value_text not in ("+Inf", "-Inf", "NaN") else None
        if value is None:
            value = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}[value_text]
        else:
            assert re.fullmatch(r"-?\d+(\.\d+)?(e[+-]?\d+)?", value_text), where
        key = (name, tuple(sorted(labels.items())))
        samples = families[family_name]["samples"]
        assert key not in samples, f"{where}: duplicate sample"
        samples[key] = value
    for name, family in families.items():
        assert family["type"] and family["help"], f"{name}: HELP and TYPE are both written"
        if family["type"] == "counter":
            assert name.endswith("_total"), f"{name}: counters end in _total"
            assert all(v >= 0 for v in family["samples"].values()), name
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _parse_labels(text: str, where: str) -> dict[str, str]:
    import re

    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = re.compile(rf'({_LABEL_NAME})="((?:[^"\\\n]|\\[\\"n])*)"').match(text, pos)
        assert match, f"{where}: bad label at {text[pos:]!r}"
        assert match.group(1) not in labels, f"{where}: label repeated"
        labels[match.group(1)] = (
            match.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        )
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", f"{where}: labels are separated by commas"
            pos += 1
    return labels


def _check_histogram(name: str, samples: dict) -> None:
    series: dict[tuple, dict] = {}
    for (sample, labels), value in samples.items():
        plain = tuple((k, v) for k, v in labels if k != "le")
        entry = series.setdefault(plain, {"buckets": [], "sum": None, "count": None})
        if sample.endswith("_bucket"):
            le = dict(labels)["le"]
            entry["buckets"].append((math.inf if le == "+Inf" else float(le), value))
        else:
            entry[sample.rsplit("_", 1)[1]] = value
    for labels, entry in series.items():
        buckets = sorted(entry["buckets"])
        assert buckets and buckets[-1][0] == math.inf, f"{name}{labels}: no +Inf bucket"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name}{labels}: buckets are not cumulative"
        assert entry["count"] == buckets[-1][1] and entry["sum"] is not None, name


def metrics_of(daemon, token: str = TOKEN) -> dict[str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 200, body
    assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(body)


def sample(families: dict, name: str, **labels) -> float:
    family = next(f for n, f in families.items() if name.startswith(n))
    return family["samples"][(name, tuple(sorted(labels.items())))]


class TestMetrics:
    """``GET /metrics``: Prometheus' text format, the figures of a running server."""

    def test_the_figures_of_a_running_server(self, console_node, panel):
        daemon = console_node(wingslite__metrics_token="scrape-me")
        uuid = daemon.uuid
        conn, _ = ws_authed(daemon, uuid)
        with conn:
            ws_send(conn, "set state", "start")
            ws_until(conn, "status", match="running")
            assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
            panel.fail[f"/api/remote/servers/{uuid}"] = [404]
            assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 404
            m = metrics_of(daemon, "scrape-me")
        server = {"server": uuid}
        assert sample(m, "wingslite_server_state", **server, state="running") == 1
        assert sample(m, "wingslite_server_state", **server, state="offline") == 0
        assert sample(m, "wingslite_server_memory_bytes", **server) == 1234
        assert sample(m, "wingslite_server_cpu_percent", **server) == 1.5
        assert sample(m, "wingslite_server_network_receive_bytes_total", **server) == 7
        assert sample(m, "wingslite_server_network_transmit_bytes_total", **server) == 9
        assert sample(m, "wingslite_server_websocket_sessions", **server) == 1
        assert sample(m, "wingslite_server_sftp_sessions", **server) == 0
        assert sample(m, "wingslite_server_syncs_total", **server) == 2
        assert sample(m, "wingslite_server_sync_failures_total", **server) == 1
        assert sample(m, "wingslite_server_sync_duration_seconds_count", **server) == 2
        assert sample(m, "wingslite_server_operations_total", **server, operation="install") == 0
        daemon.get_server(uuid).fs.ensure()
        TestBackups.backup(daemon, uuid)
        counted = sample(
            metrics_of(daemon), "wingslite_server_operations_total", **server, operation="backup"
        )
        assert counted == 1
        assert sample(m, "wingslite_servers") == 1
        path = {"method": "GET", "path": "/servers/{uuid}"}  # uuids folded: one series per route
        assert sample(m, "wingslite_panel_requests_total", **path, outcome="2xx") >= 2
        assert sample(m, "wingslite_panel_requests_total", **path, outcome="4xx") == 1
        assert sample(m, "wingslite_panel_failures_total", **path) == 1
        assert sample(m, "wingslite_panel_request_duration_seconds_count", **path) >= 3

    def test_only_the_node_token_or_the_metrics_token_may_read(self, panel, make_daemon):
        daemon = make_daemon(panel, wingslite__metrics_token="scrape-me")
        assert metrics_of(daemon)["wingslite_info"]["samples"]
        assert api(daemon, "GET", "/metrics", token=None)[0] == 401
        assert api(daemon, "GET", "/metrics", token="scrape-me-not")[0] == 403
        plain = make_daemon(panel)  # no metrics token: an empty one is never accepted
        assert api(plain, "GET", "/metrics", token="")[0] == 401
        assert api(plain, "GET", "/metrics", token="scrape-me")[0] == 403

    def test_the_parser_refuses_what_the_format_forbids(self):
        good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 2\n'
        assert parse_exposition(good)["a_total"]["samples"]
        for bad in (
            good.rstrip("\n"),
            good + 'a_total{x="1"} 3\n',
            "# TYPE a counter\n# HELP a A.\na 1\n",
            good.replace('x="1"', "x=1"),
            good + "# HELP b B.\n# TYPE b gauge\nb 1\n# HELP a_total again\n",
        ):
            with pytest.raises(AssertionError):
                parse_exposition(bad)

    def test_label_values_are_escaped(self):
        out = w.MetricsText()
        out.family("x", "gauge", "X.", [({"v": 'a"b\\c\nd'}, 1)])
        assert parse_exposition(out.text())["x"]["samples"] == {("x", (("v", 'a"b\\c\nd'),)): 1}


# HTTP API #########################################################################################


class TestHttpApi:
    def test_missing_or_malformed_auth_is_401_with_www_authenticate(self, panel, make_daemon):
        daemon = make_daemon(panel)
        for token_header in (
            None,
            "Basic abc",
            f"bearer {TOKEN}",
            "Bearer",
            f"Bearer {TOKEN} extra",
        ):
            headers = {"Authorization": token_header} if token_header else {}
            status, hdrs, body = api(daemon, "GET", "/api/servers", token=None, headers=headers)
            assert status == 401 and hdrs["www-authenticate"] == "Bearer", token_header
            assert (
                body["error"] == "The required authorization heads were not present in the request."
            )
            assert body["request_id"] == hdrs["x-request-id"]

    def test_wrong_token_is_403(self, panel, make_daemon):
        status, _, body = api(make_daemon(panel), "GET", "/api/system", token="nope")
        assert status == 403 and body["error"] == "You are not authorized to access this endpoint."

    def test_options_is_204_with_cors_and_no_auth(self, panel, make_daemon):
        daemon = make_daemon(panel, allowed_origins=["https://other.example"])
        status, hdrs, body = api(
            daemon,
            "OPTIONS",
            "/api/servers/x/sync",
            token=None,
            headers={"Origin": "https://other.example"},
        )
        assert status == 204 and body is None
        assert hdrs["access-control-allow-origin"] == "https://other.example"
        assert (
            "POST" in hdrs["access-control-allow-methods"]
            and hdrs["access-control-max-age"] == "7200"
        )
        status, hdrs, _ = api(
            daemon, "GET", "/api/system", headers={"Origin": "https://evil.example"}
        )
        assert hdrs["access-control-allow-origin"] == panel.url

    def test_a_pushed_node_configuration_is_acknowledged_and_not_applied(self, panel, make_daemon):
        daemon = make_daemon(panel)
        pushed = {
            "token": "new-token-from-a-reset",
            "remote": "https://evil.example",
            "system": {"data": "/"},
        }
        status, _, body = api(daemon, "POST", "/api/update", body=pushed)
        assert status == 200 and body == {"applied": False}
        assert daemon.config.token == TOKEN and daemon.config.remote == panel.url
        assert api(daemon, "GET", "/api/system")[0] == 200  # the old token still works
        assert api(daemon, "POST", "/api/update", raw=b"[1]")[0] == 422
        assert (
            api(daemon, "POST", "/api/update", body=pushed, token="new-token-from-a-reset")[0]
            == 403
        )

    def test_system_info(self, panel, make_daemon):
        status, _, body = api(make_daemon(panel), "GET", "/api/system")
        assert (
            status == 200
            and body["os"] == "linux"
            and body["version"] == w.VERSION
            and body["cpu_count"] >= 1
        )
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
        assert (
            data.startswith(b"HTTP/1.1 400") and b'"error"' in data and b"<html" not in data.lower()
        )

    def test_server_routes_404_for_unknown_servers(self, panel, make_daemon):
        daemon = make_daemon(panel)
        for method, path in [
            ("GET", "/api/servers/x"),
            ("POST", "/api/servers/x/sync"),
            ("DELETE", "/api/servers/x"),
        ]:
            status, _, body = api(daemon, method, path)
            assert (
                status == 404
                and body["error"] == "The requested resource does not exist on this instance."
            )

    @pytest.mark.docker  # the daemon asks the engine
    def test_create_get_list_and_delete_a_server(self, panel, make_daemon):
        daemon = make_daemon(panel)
        uuid = panel.add(panel_document())
        status, _, _ = api(
            daemon, "POST", "/api/servers", body={"uuid": uuid, "start_on_completion": False}
        )
        assert status == 202
        assert (daemon.config.data_dir / uuid).is_dir()
        status, _, body = api(daemon, "GET", f"/api/servers/{uuid}")
        assert (
            status == 200 and body["state"] == "offline" and body["configuration"]["uuid"] == uuid
        )
        assert body["utilization"]["network"] == {"rx_bytes": 0, "tx_bytes": 0}
        # A repeated create is a sync, as in Wings (the duplicate-create test covers the files).
        status, _, body = api(daemon, "POST", "/api/servers", body={"uuid": uuid})
        assert status == 202
        assert [s["configuration"]["uuid"] for s in api(daemon, "GET", "/api/servers")[2]] == [uuid]
        status, _, _ = api(daemon, "DELETE", f"/api/servers/{uuid}")
        assert status == 204 and uuid not in daemon.servers
        wait_for(
            lambda: not (daemon.config.data_dir / uuid).exists(),
            what="the data directory to be removed",
        )
        assert not (daemon.config.root_dir / "wingslite" / "servers" / f"{uuid}.json").exists()

    def test_create_of_a_server_the_panel_does_not_know_is_404(self, panel, make_daemon):
        status, _, body = api(
            make_daemon(panel), "POST", "/api/servers", body={"uuid": str(uuidlib.uuid4())}
        )
        assert status == 404 and "does not know" in body["error"]


class TestHttpHead:
    """HEAD is GET without a body on every GET route; no method is ever answered 501."""

    def exchange(self, conn, method: str, path: str):
        conn.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    @pytest.mark.docker  # the logs route asks the engine
    def test_head_answers_as_get_without_a_body_on_four_routes(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            for path in (
                "/api/system",
                "/api/servers",
                f"/api/servers/{uuid}",
                f"/api/servers/{uuid}/logs",
            ):
                # One keep-alive connection: a body sent after a HEAD would be read as the
                # next answer, and the GET after it would fail to parse.
                head_status, head_headers, head_body = self.exchange(conn, "HEAD", path)
                status, headers, body = self.exchange(conn, "GET", path)
                assert head_status == status == 200 and head_body == b"", path
                assert head_headers["content-type"] == headers["content-type"]
                assert int(head_headers["content-length"]) > 0 and body, path
        finally:
            conn.close()

    def test_head_elsewhere_answers_as_get_would_and_no_method_gets_501(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        assert api(daemon, "HEAD", "/api/nowhere")[0] == 404
        assert api(daemon, "HEAD", f"/api/servers/{uuid}/sync")[:2][0] == 405
        status, headers, _ = api(daemon, "GET", f"/api/servers/{uuid}/sync")
        assert status == 405 and headers["allow"] == "POST"
        status, headers, _ = api(daemon, "TRACE", f"/api/servers/{uuid}")
        assert status == 405 and headers["allow"] == "DELETE, GET, HEAD"
        for method in ("BREW", "CONNECT", "PROPFIND"):
            assert api(daemon, method, "/api/system")[0] == 405
            assert api(daemon, method, "/api/nowhere")[0] == 404
        assert api(daemon, "HEAD", "/api/system", token=None)[0] == 401

    def test_daemon_console_lines_carry_the_nodes_app_name(self, panel, make_daemon):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel, app_name="Acme Hosting")
        panel.down = True  # the start's sync fails: the server says so on its console
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        server = daemon.servers[uuid]
        line = wait_for(
            lambda: next((x for x in server.console.tail(50) if "Unable to sync" in x), None),
            what="the console line",
        )
        assert "[Acme Hosting Daemon]:" in line and "Pterodactyl" not in line


# HTTP API: framing and connections ################################################################


def raw_exchange(port: int, data: bytes, timeout_s: float = 10):
    """Send raw bytes on a new connection and read one answer:
    (status, lower-cased headers, decoded JSON body or None, whether the server then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return resp.status, headers, (json.loads(body) if body else None), closed


def stranger(port: int) -> socket.socket:
    """A connection that says nothing (or whatever the test sends on it later)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(sock: socket.socket, timeout_s: float = 10) -> bool:
    """True when the server closes the connection within ``timeout_s`` (whatever it sends first,
    such as a TLS alert)."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return False


class TestHttpFraming:
    """RFC 9112 framing: whatever a proxy in front could read differently is a 400 and a close."""

    AUTH = f"Authorization: Bearer {TOKEN}\r\n"

    def refused(self, daemon, head: str, body: bytes = b"") -> str:
        status, headers, answer, closed = raw_exchange(daemon.port, head.encode() + body)
        assert status == 400 and closed, (status, answer)
        assert answer["request_id"] == headers["x-request-id"]
        return answer["error"]

    def test_two_different_content_lengths_are_refused_and_identical_ones_allowed(
        self, panel, make_daemon
    ):
        daemon = make_daemon(panel)
        head = "POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\n" + self.AUTH
        body = b'{"user": "u"}'
        error = self.refused(
            daemon, head + f"Content-Length: {len(body)}\r\nContent-Length: 40\r\n\r\n", body
        )
        assert "more than one Content-Length" in error
        twice = f"Content-Length: {len(body)}\r\n" * 2 + "\r\n"
        status, _, _, _ = raw_exchange(daemon.port, (head + twice).encode() + body)
        assert status == 204

    def test_transfer_encoding_other_than_a_single_chunked_is_refused(self, panel, make_daemon):
        daemon = make_daemon(panel)
        head = "POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\n" + self.AUTH
        for coding in (
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: identity\r\n",
        ):
            assert "Transfer-Encoding" in self.refused(daemon, head + coding + "\r\n", b"{}")
        status, _, answer, closed = raw_exchange(
            daemon.port, (head + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode()
        )
        assert status == 411 and closed, answer

    def test_a_content_length_that_is_not_plain_digits_is_refused(self, panel, make_daemon):
        daemon = make_daemon(panel)
        head = "POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\n" + self.AUTH
        for value in ("+2", "0_2", "2.0", "0x2", "2, 2"):
            error = self.refused(daemon, head + f"Content-Length: {value}\r\n\r\n", b"{}")
            assert "plain digits" in error, value

    def test_whitespace_before_a_colon_is_refused_not_read_as_the_end_of_the_headers(
        self, panel, make_daemon
    ):
        daemon = make_daemon(panel)
        for bad in ("Content-Length : 2", "Authorization : Bearer x", "X Y: z"):
            head = f"POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\n{bad}\r\n{self.AUTH}\r\n"
            assert "malformed" in self.refused(daemon, head, b"{}"), bad

    def test_multipart_and_message_content_types_are_not_mistaken_for_broken_headers(
        self, panel, make_daemon
    ):
        daemon = make_daemon(panel)
        for content_type in ("multipart/form-data; boundary=bbb", "message/rfc822"):
            head = f"GET /api/system HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            status, _, body, _ = raw_exchange(daemon.port, (head + self.AUTH + "\r\n").encode())
            assert status == 200, (content_type, body)

    def test_http11_needs_exactly_one_host(self, panel, make_daemon):
        daemon = make_daemon(panel)
        assert "Host" in self.refused(daemon, f"GET /api/system HTTP/1.1\r\n{self.AUTH}\r\n")
        two = f"GET /api/system HTTP/1.1\r\nHost: a\r\nHost: b\r\n{self.AUTH}\r\n"
        assert "Host" in self.refused(daemon, two)
        status, _, body, _ = raw_exchange(
            daemon.port, f"GET /api/system HTTP/1.0\r\n{self.AUTH}\r\n".encode()
        )
        assert status == 200 and body["version"] == w.VERSION

    def test_a_refused_request_never_lets_a_second_one_through(self, panel, make_daemon):
        daemon = make_daemon(panel)
        smuggled = f"GET /api/system HTTP/1.1\r\nHost: x\r\n{self.AUTH}\r\n"
        head = (
            f"POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\n{self.AUTH}"
            f"Content-Length: 0\r\nContent-Length: {len(smuggled)}\r\n\r\n"
        )
        with stranger(daemon.port) as sock:
            sock.sendall((head + smuggled).encode())
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 400 ") and received.count(b"HTTP/1.1") == 1

    def test_parser_errors_carry_a_request_id(self, panel, make_daemon):
        daemon = make_daemon(panel)
        for data in (
            b"GARBAGE\r\n\r\n",
            b"GET /api/system HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
            b"GET /api/system HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 120 + b"\r\n",
        ):
            status, headers, body, closed = raw_exchange(daemon.port, data)
            assert status in (400, 431) and closed, (status, body)
            assert body["request_id"] and body["request_id"] == headers["x-request-id"]


class TestHttpConnections:
    """Connection cap, header deadline and what strangers can (not) do to the Panel's requests."""

    def test_headers_dripped_past_the_deadline_are_answered_408_and_closed(
        self, panel, make_daemon
    ):
        daemon = make_daemon(panel, wingslite__header_timeout_s=1)
        with stranger(daemon.port) as sock:
            sock.sendall(b"GET /api/system HTTP/1.1\r\nHost: x\r\n")
            dripped = 0
            for dripped in range(1, 40):  # 12 s of headers at one line every 0.3 s
                if select_readable(sock, 0.3):
                    break
                sock.sendall(b"X-Drip-%d: y\r\n" % dripped)
            assert dripped < 39, "the server waited for every dripped header"
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            body = json.loads(resp.read())
            assert resp.status == 408 and "within 1 s" in body["error"] and body["request_id"]
            assert closed_by_server(sock)

    def test_a_silent_connection_is_closed_after_the_header_timeout(self, panel, make_daemon):
        daemon = make_daemon(panel, wingslite__header_timeout_s=1)
        with stranger(daemon.port) as sock:
            assert closed_by_server(sock, timeout_s=10)

    def test_the_panel_is_served_while_strangers_hold_every_connection(self, panel, make_daemon):
        daemon = make_daemon(panel, wingslite__max_connections=6, wingslite__header_timeout_s=60)
        strangers = [stranger(daemon.port) for _ in range(12)]
        try:
            wait_for(
                lambda: daemon.http.connection_counts()["headers"] == 6, what="six strangers held"
            )
            assert api(daemon, "GET", "/api/system")[0] == 200
            assert api(daemon, "GET", "/api/servers")[0] == 200
            # the oldest strangers were closed to make room, never more than the cap held open
            assert closed_by_server(strangers[0]) and closed_by_server(strangers[6])
            assert sum(daemon.http.connection_counts().values()) <= 6
        finally:
            for sock in strangers:
                sock.close()

    def test_an_idle_kept_alive_connection_is_closed_before_a_newer_stranger(
        self, panel, make_daemon
    ):
        daemon = make_daemon(panel, wingslite__max_connections=3, wingslite__header_timeout_s=60)
        strangers = [stranger(daemon.port) for _ in range(2)]
        kept = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            wait_for(lambda: daemon.http.connection_counts()["headers"] == 2, what="strangers")
            kept.request("GET", "/api/system", headers={"Authorization": f"Bearer {TOKEN}"})
            assert kept.getresponse().read()
            wait_for(lambda: daemon.http.connection_counts()["idle"] == 1, what="kept idle")
            assert api(daemon, "GET", "/api/system")[0] == 200
            assert closed_by_server(kept.sock)
            assert not closed_by_server(strangers[0], timeout_s=0.5)
        finally:
            kept.close()
            for sock in strangers:
                sock.close()

    def test_when_every_connection_is_busy_a_new_one_gets_503_retry_after_logged_once(
        self, panel, make_daemon, caplog
    ):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel, wingslite__max_connections=2)
        panel.hang_s[f"/api/remote/servers/{uuid}"] = 1.5
        pool = concurrent.futures.ThreadPoolExecutor(2)
        syncs = [pool.submit(api, daemon, "POST", f"/api/servers/{uuid}/sync") for _ in range(2)]
        try:
            wait_for(lambda: daemon.http.connection_counts()["busy"] == 2, what="two busy")
            with caplog.at_level(logging.INFO, logger="wingslite"):
                answers = []
                for _ in range(5):
                    with stranger(daemon.port) as sock:
                        resp = http.client.HTTPResponse(sock)
                        resp.begin()
                        answers.append((resp.status, resp.getheader("Retry-After"), resp.read()))
            for status, retry_after, body in answers:
                assert status == 503 and int(retry_after) > 0
                assert json.loads(body)["request_id"]
            refusals = [r for r in caplog.records if "refusing API connections" in r.getMessage()]
            assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
        finally:
            assert [f.result()[0] for f in syncs] == [204, 204]
            pool.shutdown()

    def test_connections_reset_by_clients_log_no_traceback(self, panel, make_daemon, caplog):
        daemon = make_daemon(panel)
        with caplog.at_level(logging.INFO, logger="wingslite"):
            half_body = (
                "POST /api/deauthorize-user HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n" + '{"user": "'
            ).encode()
            for i in range(40):
                sock = stranger(daemon.port)
                # cut in the headers, or in the body of an authorised request
                sock.sendall(half_body if i % 2 else b"GET /api/system HTTP/1.1\r\nX-Half: ")
                time.sleep(0.01)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # an RST, not a FIN
            wait_for(lambda: sum(daemon.http.connection_counts().values()) == 0, what="drained")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert len([r for r in caplog.records if "reset" in r.getMessage()]) <= 1
        assert api(daemon, "GET", "/api/system")[0] == 200


def select_readable(sock: socket.socket, timeout_s: float) -> bool:
    import select

    return bool(select.select([sock], [], [], timeout_s)[0])


# HTTP API: TLS ####################################################################################


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class CertificateFiles:
    """A test CA and node certificates made with the system's ``openssl``, as certbot lays them
    out."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = self.dir / "ca.pem"
        self.cert = self.dir / "live" / "fullchain.pem"
        self.key = self.dir / "live" / "privkey.pem"
        self.cert.parent.mkdir()
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=wingslite test CA",
            cwd=self.dir,
        )  # fmt: skip
        self.serial = 0
        self.issue()

    def issue(self) -> int:
        """A new key and certificate for 127.0.0.1, swapped in as a renewal does; its serial."""
        self.serial += 1
        name = f"leaf{self.serial}"
        (self.dir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=127.0.0.1",
            cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(1000 + self.serial), "-days", "2", "-extfile", "ext.cnf",
            "-out", f"{name}.pem",
            cwd=self.dir,
        )  # fmt: skip
        chain = (self.dir / f"{name}.pem").read_bytes() + self.ca.read_bytes()
        for target, data in (
            (self.key, (self.dir / f"{name}.key").read_bytes()),
            (self.cert, chain),
        ):
            tmp = target.with_suffix(".new")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return 1000 + self.serial

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def ca_spki_sha256(self) -> str:
        """The CA key's SPKI hash, base64, for Chromium's --ignore-certificate-errors-spki-list."""
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.ca), "-pubkey", "-noout"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        spki = subprocess.run(
            ["openssl", "pkey", "-pubin", "-outform", "der"], input=der, check=True,
            capture_output=True,
        ).stdout  # fmt: skip
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def https_get(daemon, path: str, context: ssl.SSLContext, token: str | None = TOKEN):
    """One request over TLS: (status, decoded body, the server certificate's serial, TLS
    version)."""
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.port, timeout=10, context=context)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    resp = conn.getresponse()
    body = resp.read()
    peer = conn.sock.getpeercert()
    version = conn.sock.version()
    conn.close()
    return resp.status, json.loads(body) if body else None, int(peer["serialNumber"], 16), version


@pytest.fixture
def certificates(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (.ci/run installs it)")
    return CertificateFiles(tmp_path / "certs")


def _tls_overrides(certs) -> dict:
    return {
        "api__ssl__enabled": True,
        "api__ssl__cert": str(certs.cert),
        "api__ssl__key": str(certs.key),
    }


class TestTls:
    """``api.ssl``: HTTPS and WSS with the standard ``ssl`` module; renewals without a restart."""

    def test_https_answers_with_the_node_certificate(self, panel, make_daemon, certificates):
        daemon = make_daemon(panel, **_tls_overrides(certificates))
        status, body, serial, version = https_get(
            daemon, "/api/system", certificates.client_context()
        )
        assert status == 200 and body["version"] == w.VERSION
        assert serial == 1001 and version in ("TLSv1.2", "TLSv1.3")
        # Plain HTTP on the TLS port gets no HTTP answer, and TLS 1.1 is refused.
        with pytest.raises((http.client.HTTPException, OSError)):
            api(daemon, "GET", "/api/system")
        old = ssl.create_default_context(cafile=str(certificates.ca))
        with warnings.catch_warnings():  # the ssl module warns about setting TLS 1.1 at all
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            https_get(daemon, "/api/system", old)
        assert https_get(daemon, "/api/system", certificates.client_context())[0] == 200

    def test_wss_console_through_the_websockets_client(self, console_node, certificates):
        from websockets.sync.client import connect

        daemon = console_node(**_tls_overrides(certificates))
        daemon.get_server(daemon.uuid).env.start(None)
        url = f"wss://127.0.0.1:{daemon.port}/api/servers/{daemon.uuid}/ws"
        with connect(
            url,
            ssl=certificates.client_context(),
            origin=daemon.config.remote,
            open_timeout=5,
            proxy=None,
        ) as conn:
            ws_send(conn, "auth", ws_token(ws_claims(daemon.uuid)))
            assert ws_event(conn)[0] == "auth success"
            ws_send(conn, "send logs")
            ws_until(conn, "console output", match="server ready")
            ws_send(conn, "send command", "over tls " + "x" * 3000)  # more than one TLS record
            ws_until(conn, "console output", match="> over tls")

    def test_a_renewed_certificate_is_served_without_a_restart(
        self, panel, make_daemon, certificates
    ):
        daemon = make_daemon(panel, **_tls_overrides(certificates))
        context = certificates.client_context()
        assert https_get(daemon, "/api/system", context)[2] == 1001
        renewed = certificates.issue()
        wait_for(
            lambda: https_get(daemon, "/api/system", context)[2] == renewed,
            timeout_s=10,
            interval_s=0.2,
            what="the renewed certificate",
        )
        # A renewal that is not a certificate is logged; the last good one stays in use.
        certificates.cert.write_text("not a certificate\n")
        time.sleep(1.2)
        assert https_get(daemon, "/api/system", context)[2] == renewed

    def test_a_certificate_that_cannot_be_read_stops_the_start_naming_the_file(
        self, panel, tmp_path, certificates
    ):
        missing = tmp_path / "nope" / "fullchain.pem"
        encrypted = tmp_path / "encrypted.pem"
        _openssl(
            "pkey", "-in", str(certificates.key), "-aes256", "-passout", "pass:secret",
            "-out", str(encrypted),
            cwd=tmp_path,
        )  # fmt: skip
        for cert, key, named in (
            (missing, certificates.key, str(missing)),
            (certificates.cert, certificates.ca, str(certificates.ca)),  # no private key in it
            (certificates.cert, encrypted, f"{encrypted} is encrypted"),  # never a prompt
            (certificates.cert, certificates.dir / "ca.key", "cannot be used together"),
        ):
            raw = node_config(tmp_path, panel.url, api__ssl__enabled=True)
            raw["api"]["ssl"].update(cert=str(cert), key=str(key))
            path = tmp_path / "config.yml"
            path.write_text(yaml.safe_dump(raw))
            run = subprocess.run(
                [sys.executable, str(HERE / "wingslite.py"), "--config", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 2, run.stderr
            assert named in run.stderr and "api.ssl" in run.stderr, run.stderr

    def test_headless_chromium_trusting_the_test_ca_opens_the_console(
        self, console_node, certificates, tmp_path
    ):
        report = browser_console_report(
            console_node,
            tmp_path,
            scheme="wss",
            # Trust anchored on the test CA's key: it is in the chain the node presents.
            chromium_flags=[
                f"--ignore-certificate-errors-spki-list={certificates.ca_spki_sha256()}"
            ],
            **_tls_overrides(certificates),
        )
        assert report["result"] == "ok", report
        assert "> from chromium" in report["text"]


class TestTlsConnections:
    """The connection cap and the header deadline hold over TLS too (the handshake counts as
    header time)."""

    def test_a_stranger_that_never_shakes_hands_is_closed_at_the_header_deadline(
        self, panel, make_daemon, certificates
    ):
        daemon = make_daemon(panel, wingslite__header_timeout_s=1, **_tls_overrides(certificates))
        with stranger(daemon.port) as sock:
            assert closed_by_server(sock, timeout_s=10)
        assert https_get(daemon, "/api/system", certificates.client_context())[0] == 200

    def test_headers_dripped_over_tls_past_the_deadline_close_the_connection(
        self, panel, make_daemon, certificates
    ):
        daemon = make_daemon(panel, wingslite__header_timeout_s=1, **_tls_overrides(certificates))
        raw = stranger(daemon.port)
        with certificates.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /api/system HTTP/1.1\r\nHost: x\r\n")
            for dripped in range(1, 40):  # 12 s of headers at one line every 0.3 s
                if select_readable(sock, 0.3):
                    break
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Drip-%d: y\r\n" % dripped)
            assert dripped < 39, "the server waited for every dripped header"
            assert closed_by_server(sock)

    def test_the_panel_is_served_over_tls_while_strangers_hold_every_connection(
        self, panel, make_daemon, certificates
    ):
        daemon = make_daemon(
            panel,
            wingslite__max_connections=4,
            wingslite__header_timeout_s=60,
            **_tls_overrides(certificates),
        )
        strangers = [stranger(daemon.port) for _ in range(6)]
        try:
            wait_for(lambda: daemon.http.connection_counts()["headers"] == 4, what="strangers")
            assert https_get(daemon, "/api/system", certificates.client_context())[0] == 200
        finally:
            for sock in strangers:
                sock.close()


# daemon: the sync #################################################################################


class TestSync:
    def booted(self, panel, make_daemon, **changes):
        uuid = panel.add(panel_document(**changes))
        daemon = make_daemon(panel)
        assert uuid in daemon.servers
        return daemon, uuid

    def snapshot(self, daemon, uuid):
        server = daemon.servers[uuid]
        return (
            server.config.document,
            server.fs.limit_bytes,
            saved_document(daemon, uuid),
            server.last_sync,
        )

    @pytest.mark.docker  # the daemon asks the engine
    def test_sync_applies_the_panels_configuration_and_answers_204(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        panel.servers[uuid]["settings"]["build"].update(memory_limit=8192, disk_space=100)
        panel.servers[uuid]["settings"]["environment"]["NEW_VAR"] = "hello"
        status, hdrs, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 204 and body is None and hdrs["x-request-id"]
        server = daemon.servers[uuid]
        assert (
            server.config.build.memory_mb == 8192
            and server.config.environment["NEW_VAR"] == "hello"
        )
        assert server.fs.limit_bytes == 100 * 1_048_576
        assert saved_document(daemon, uuid)["settings"]["build"]["memory_limit"] == 8192
        _, _, view = api(daemon, "GET", f"/api/servers/{uuid}")
        record = view["wingslite"]["last_sync"]
        assert record["result"] == "ok" and any(
            "disk limit 104857600" in a for a in record["applied"]
        )
        assert any("resource limits" in p for p in record["pending"])  # no container on this node
        assert any("environment variables (next start)" in p for p in record["pending"])
        assert view["configuration"]["build"]["memory_limit"] == 8192

    def test_a_sync_that_changes_config_files_names_them_as_pending(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        panel.servers[uuid]["process_configuration"]["configs"] = [
            {"parser": "properties", "file": "server.properties", "replace": []},
            {"parser": "yaml", "file": "config.yml", "replace": []},
        ]
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        record = api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]
        assert "egg config files (server.properties, config.yml) (next start)" in record["pending"]
        assert not any("stop command" in p for p in record["pending"])

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
        assert (
            status == 500
            and "HTTP 500" in body["error"]
            and "nothing on this node was changed" in body["error"]
        )
        assert retries >= 3, f"the Panel was asked only {retries} times"
        assert self.snapshot(daemon, uuid) == before

    @pytest.mark.docker  # the daemon asks the engine
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
            (
                lambda s: s["allocations"]["default"].update(port=99999),
                "settings.allocations.default.port",
            ),
            (lambda s: s.update(uuid=str(uuidlib.uuid4())), "settings.uuid"),
        ],
    )
    def test_invalid_document_is_500_naming_the_field_and_changes_nothing(
        self, panel, make_daemon, mutate, field
    ):
        daemon, uuid = self.booted(panel, make_daemon)
        before = self.snapshot(daemon, uuid)
        panel.servers[uuid]["settings"]["build"]["disk_space"] = (
            1  # would change the disk limit if applied
        )
        mutate(panel.servers[uuid]["settings"])
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and field in body["error"], body
        # Only the record changes: it shows the refusal on GET /api/servers/:server.
        assert self.snapshot(daemon, uuid)[:3] == before[:3]
        last_sync = api(daemon, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]
        assert last_sync["result"] == "refused" and field in last_sync["failed"][0], last_sync

    @pytest.mark.docker  # the daemon asks the engine
    def test_50_concurrent_syncs_on_one_server_end_in_the_panels_final_state(
        self, panel, make_daemon
    ):
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
        assert (
            api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        )  # one more after the last change
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
            statuses = list(
                pool.map(lambda u: api(daemon, "POST", f"/api/servers/{u}/sync")[0], [a, b])
            )
        assert statuses == [204, 204] and time.monotonic() - started < 1.9

    def test_suspension_closes_every_session_before_the_204(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        other = panel.add(panel_document())
        daemon.load_from_panel()
        closed = []
        for i in range(5):
            daemon.sessions.register(
                uuid, f"user{i}", "websocket", lambda code, reason: closed.append(code)
            )
        daemon.sessions.register(uuid, "user9", "sftp", lambda code, reason: closed.append(code))
        daemon.sessions.register(
            other, "user0", "websocket", lambda code, reason: closed.append(("other", code))
        )
        panel.servers[uuid]["settings"]["suspended"] = True
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert (
            closed == [4409] * 6
            and daemon.sessions.count(uuid) == 0
            and daemon.sessions.count(other) == 1
        )
        _, _, view = api(daemon, "GET", f"/api/servers/{uuid}")
        assert (
            view["is_suspended"] is True
            and "suspended: 6 session(s) closed" in view["wingslite"]["last_sync"]["applied"]
        )
        status, _, body = api(
            daemon, "POST", f"/api/servers/{uuid}/power", body={"action": "start"}
        )
        assert (
            status == 400 and body["error"] == "Cannot start or restart a server that is suspended."
        )

    @pytest.mark.docker  # the daemon asks the engine
    def test_a_failing_disk_quota_keeps_the_new_configuration_and_answers_500(
        self, panel, make_daemon
    ):
        daemon, uuid = self.booted(panel, make_daemon)

        class BrokenQuota(w.QuotaBackend):
            name = "broken"

            def set_limit(self, root, limit_bytes):
                raise OSError("qgroup limit refused")

        daemon.servers[uuid].fs.ensure()
        daemon.servers[uuid].fs.quota = BrokenQuota()
        panel.servers[uuid]["settings"]["build"].update(memory_limit=777, disk_space=512)
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and "disk limit: qgroup limit refused" in body["error"]
        assert (
            daemon.servers[uuid].config.build.memory_mb == 777
        )  # the Panel is the source of truth
        assert daemon.servers[uuid].last_sync["failed"] == ["disk limit: qgroup limit refused"]
        assert not any(
            a.startswith("disk limit") for a in daemon.servers[uuid].last_sync["applied"]
        )

    @pytest.mark.docker  # the daemon asks the engine
    def test_the_quota_backend_is_asked_only_when_the_disk_limit_changes(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        calls = []

        class CountingQuota(w.QuotaBackend):
            def set_limit(self, root, limit_bytes):
                calls.append(limit_bytes)
                return []

        server = daemon.servers[uuid]
        server.fs.quota = CountingQuota()
        server.fs.ensure()
        calls.clear()
        for memory in (100, 200):
            panel.servers[uuid]["settings"]["build"]["memory_limit"] = memory
            assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        panel.servers[uuid]["settings"]["build"]["disk_space"] = 7
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert calls == [7 * 1_048_576]

    def test_power_with_an_unknown_action_is_422(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        status, _, body = api(
            daemon, "POST", f"/api/servers/{uuid}/power", body={"action": "explode"}
        )
        assert status == 422 and "power action" in body["error"]

    @pytest.mark.docker  # the daemon asks the engine
    def test_commands_to_a_stopped_server_are_502(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        status, _, body = api(
            daemon, "POST", f"/api/servers/{uuid}/commands", body={"commands": ["say hi"]}
        )
        assert (
            status == 502 and body["error"] == "Cannot send commands to a stopped server instance."
        )

    def test_deauthorize_user_closes_that_users_sessions(self, panel, make_daemon):
        daemon, uuid = self.booted(panel, make_daemon)
        closed = []
        daemon.sessions.register(
            uuid, "alice", "websocket", lambda c, r: closed.append(("alice", c))
        )
        daemon.sessions.register(uuid, "bob", "sftp", lambda c, r: closed.append(("bob", c)))
        assert (
            api(daemon, "POST", "/api/deauthorize-user", body={"user": "alice", "servers": [uuid]})[
                0
            ]
            == 204
        )
        assert closed == [("alice", w.CLOSE_UNAUTHORIZED)] and daemon.sessions.count(uuid) == 1
        assert api(daemon, "POST", "/api/deauthorize-user", body={"servers": "x"})[0] == 422

    def test_a_sync_or_start_queued_behind_a_delete_does_not_bring_the_server_back(
        self, panel, make_daemon, tmp_path, caplog
    ):
        entered, release = threading.Event(), threading.Event()

        class SlowDestroy(ConsoleEnvironment):
            def destroy(self):
                entered.set()
                release.wait(10)

        # counts who waits for the server's lock, so the test knows the queue is formed
        class SpyLock:
            def __init__(self, inner):
                self.inner, self.waiting = inner, 0

            def acquire(self, *args, **kwargs):
                self.waiting += 1
                try:
                    return self.inner.acquire(*args, **kwargs)
                finally:
                    self.waiting -= 1

            def release(self):
                self.inner.release()

            def __enter__(self):
                return self.acquire()

            def __exit__(self, *exc):
                self.release()

        uuid = panel.add(panel_document())
        daemon = w.Daemon(
            w.Config(node_config(tmp_path, panel.url), "test"),
            environment_factory=lambda s: SlowDestroy(s.uuid, s.events),
        )
        daemon.start()
        make_daemon.daemons.append(daemon)
        assert daemon.wait_booted(10)
        server = daemon.servers[uuid]
        server.config_lock = spy = SpyLock(server.config_lock)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            delete = pool.submit(api, daemon, "DELETE", f"/api/servers/{uuid}")
            assert entered.wait(5)
            sync = pool.submit(api, daemon, "POST", f"/api/servers/{uuid}/sync")
            # The sync waits for the delete's configuration lock; the start does not wait (the
            # delete holds no power lock): it sees the server deleted and does nothing.
            assert (
                api(
                    daemon,
                    "POST",
                    f"/api/servers/{uuid}/power",
                    body={"action": "start", "wait_seconds": 30},
                )[0]
                == 202
            )
            wait_for(lambda: spy.waiting == 1, 5, what="the sync to wait for the delete")
            wait_for(lambda: "power action start failed" in caplog.text, 5, what="the start")
            release.set()
            assert delete.result(10)[0] == 204
            assert sync.result(10)[0] == 404
        wait_for(
            lambda: server.state != w.OFFLINE or "power action start failed" in caplog.text,
            5,
            what="the queued start to run",
        )
        assert server.state == w.OFFLINE and uuid not in daemon.servers
        assert not (daemon.config.root_dir / "wingslite" / "servers" / f"{uuid}.json").exists()


# daemon: boot #####################################################################################


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

    def test_panel_down_at_boot_serves_saved_configurations_then_catches_up(
        self, panel, make_daemon, tmp_path
    ):
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

    def test_a_server_created_while_the_boot_reads_the_list_is_kept(self, panel, make_daemon):
        panel.add(panel_document())
        listed, go = threading.Event(), threading.Event()
        page = panel.page

        def slow_page(query):  # the list is read before the Panel creates the new server
            answer = page(query)
            listed.set()
            go.wait(5)
            return answer

        panel.page = slow_page
        daemon = make_daemon(panel, boot=False)
        assert listed.wait(5)
        created = panel.add(panel_document())
        assert api(daemon, "POST", "/api/servers", body={"uuid": created})[0] == 202
        go.set()
        assert daemon.wait_booted(10)
        assert (
            created in daemon.servers
            and saved_document(daemon, created)["settings"]["uuid"] == created
        )

    def test_a_dropped_server_loses_its_open_sockets(self, panel, make_daemon, tmp_path):
        gone = panel.add(panel_document())
        make_daemon(panel).stop()
        panel.down = True  # the node comes up from its saved configurations and serves them
        daemon = w.Daemon(
            w.Config(node_config(tmp_path, panel.url), "test"),
            environment_factory=lambda s: ConsoleEnvironment(s.uuid, s.events),
        )
        daemon.start()
        make_daemon.daemons.append(daemon)
        conn, first = ws_authed(daemon, gone)
        with conn:
            assert first[0] == ("auth success", [])
            del panel.servers[gone]
            panel.down = False
            assert daemon.wait_booted(10) and gone not in daemon.servers
            assert ws_close_code(conn) == w.CLOSE_GOING_AWAY
        assert daemon.sessions.count(gone) == 0

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


HOST_CPUS = os.cpu_count() or 1


def _set_config_file_replace(doc, replace_with):
    doc["process_configuration"]["configs"][0]["replace"] = [
        {"match": "motd", "replace_with": replace_with},
        {"match": "difficulty", "if_value": "easy", "replace_with": {"hard": [1, None]}},
    ]


class TestPanelValidEdgeValues:
    """Documents the Panel's own validation accepts are accepted, survive a daemon restart, and
    a refused document never costs the node the server."""

    EDGES = [
        pytest.param(
            lambda d: d["settings"]["build"].update(threads="0,"),
            lambda c: c.build.threads == "0",
            "",
            id="threads-trailing-comma",
            marks=pytest.mark.docker,  # a cpuset change asks the engine about the container
        ),
        pytest.param(
            lambda d: d["settings"]["build"].update(threads="1-0"),
            lambda c: c.build.threads == "",
            "runs backwards; applied as no CPU pinning",
            id="threads-reversed",
        ),
        pytest.param(
            lambda d: d["settings"]["build"].update(threads=f"0-{HOST_CPUS}"),
            lambda c: c.build.threads == "",
            "does not exist on this node",
            id="threads-beyond-the-host",
        ),
        pytest.param(
            lambda d: d["settings"]["environment"].update({"2FA_SECRET": "x"}),
            lambda c: c.environment["2FA_SECRET"] == "x",
            "",
            id="variable-starting-with-a-digit",
        ),
        pytest.param(
            lambda d: _set_config_file_replace(d, ["a", {"b": 2}]),
            lambda c: c.process.configs[0].replace[0].replace_with == ["a", {"b": 2}],
            "",
            id="replace-with-a-list-and-an-object",
        ),
        pytest.param(
            lambda d: d["settings"]["build"].update(cpu_limit=100 * HOST_CPUS + 1),
            lambda c: c.build.cpu_percent == 100 * HOST_CPUS,
            f"applied as {100 * HOST_CPUS}%",
            id="cpu-above-the-host",
        ),
        pytest.param(
            lambda d: d["settings"].update(
                mounts=[{"source": "/srv", "target": "/home/container/../../proc"}]
            ),
            lambda c: c.mounts == (),
            "the target would shadow /proc",
            id="mount-shadowing-proc",
        ),
        pytest.param(
            lambda d: d["settings"]["container"].update(image="ghcr.io/x/y:java 21"),
            lambda c: c.image == "ghcr.io/x/y:java 21",
            "is not a valid Docker image reference",
            id="image-with-a-space",
        ),
    ]

    @pytest.mark.parametrize("edit, holds, note", EDGES)
    def test_a_panel_valid_value_syncs_and_survives_a_restart(
        self, panel, make_daemon, edit, holds, note
    ):
        uuid = panel.add(panel_document())
        first = make_daemon(panel)
        edit(panel.servers[uuid])
        status, _, body = api(first, "POST", f"/api/servers/{uuid}/sync")
        assert status == 204, body
        assert holds(first.servers[uuid].config)
        record = api(first, "GET", f"/api/servers/{uuid}")[2]["wingslite"]["last_sync"]
        assert record["result"] == "ok"
        assert any(note in n for n in record["notes"]) if note else record["notes"] == []
        first.stop()
        second = make_daemon(panel)
        listed = {s["configuration"]["uuid"]: s for s in api(second, "GET", "/api/servers")[2]}
        assert uuid in listed and holds(second.servers[uuid].config)
        assert listed[uuid]["configuration"] == panel.servers[uuid]["settings"] | {
            "crash_detection_enabled": True
        }

    @pytest.mark.parametrize(
        "image, valid",
        [
            ("ghcr.io/pterodactyl/yolks:java_21", True),
            ("~wingslite-test:latest", True),
            ("localhost:5000/games/minecraft@sha256:" + "a" * 64, True),
            ("[::1]:5000/x/y:1.0", True),
            ("busybox", True),
            ("ghcr.io/x/y:java 21", False),
            ("../../containers/json?all=1", False),
            ("library/Busybox", False),
            ("x:tag/y", False),
            ("a" * 256, False),
        ],
    )
    def test_image_names_follow_dockers_reference_grammar(self, image, valid):
        assert w.is_image_reference(image) is valid

    @pytest.mark.docker
    def test_an_image_outside_the_grammar_never_reaches_the_engine(self, docker_servers):
        uuid = docker_servers.add(image="../../info?x=")
        daemon = docker_servers.boot()
        assert api(daemon, "POST", f"/api/servers/{uuid}/power", {"action": "start"})[0] == 202
        docker_servers.wait_console(uuid, "is not a valid Docker image reference")
        assert daemon.get_server(uuid).state == "offline"
        assert docker_servers.container_id(uuid) is None

    @pytest.mark.docker  # the daemon asks the engine
    def test_a_document_refused_at_boot_keeps_the_server_on_its_last_configuration(
        self, panel, make_daemon, caplog
    ):
        uuid = panel.add(panel_document())
        make_daemon(panel).stop()
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 2**60  # beyond 2^53 bytes
        daemon = make_daemon(panel)
        status, _, body = api(daemon, "GET", f"/api/servers/{uuid}")
        assert status == 200 and body["configuration"]["build"]["memory_limit"] == 4096
        last_sync = body["wingslite"]["last_sync"]
        assert last_sync["result"] == "refused"
        assert "settings.build.memory_limit" in last_sync["failed"][0]
        assert saved_document(daemon, uuid)["settings"]["build"]["memory_limit"] == 4096
        assert (
            f"refused the Panel's document for server {uuid}: document.settings.build."
            "memory_limit" in caplog.text
        )
        assert "keeping its last configuration" in caplog.text
        # A later sync of a document the node accepts brings it up to date.
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 1024
        assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
        assert daemon.servers[uuid].config.build.memory_mb == 1024

    def test_a_list_entry_with_uuid_dash_never_becomes_a_directory(self, panel, make_daemon):
        good = panel.add(panel_document())
        bad = panel_document()
        bad["settings"]["uuid"] = "-"
        panel.servers["-"] = bad
        daemon = make_daemon(panel)
        assert set(daemon.servers) == {good}
        assert not (daemon.config.data_dir / "-").exists()
        assert not (daemon.config.root_dir / "wingslite" / "servers" / "-.json").exists()

    @pytest.mark.docker  # the daemon asks the engine
    def test_a_repeated_create_is_a_sync_and_leaves_the_files_alone(self, panel, make_daemon):
        daemon = make_daemon(panel)
        uuid = panel.add(panel_document())
        assert api(daemon, "POST", "/api/servers", body={"uuid": uuid})[0] == 202
        world = daemon.config.data_dir / uuid / "world" / "level.dat"
        world.parent.mkdir()
        world.write_bytes(b"installed")
        panel.servers[uuid]["settings"]["build"]["memory_limit"] = 3000
        status, _, body = api(daemon, "POST", "/api/servers", body={"uuid": uuid})
        assert status == 202, body
        assert world.read_bytes() == b"installed"
        assert daemon.servers[uuid].config.build.memory_mb == 3000  # re-read, as a sync
        assert saved_document(daemon, uuid)["settings"]["build"]["memory_limit"] == 3000


# Panel stand-in ###################################################################################


def panel_call(panel: FakePanel, method: str, path: str, body=None, token: str | None = None):
    """One request to the Panel stand-in as Wings makes it: (status, headers, JSON or raw body)."""
    conn = http.client.HTTPConnection("127.0.0.1", panel.port, timeout=10)
    headers = {"Authorization": f"Bearer {token or f'{TOKEN_ID}.{TOKEN}'}"}
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    parsed = json.loads(payload) if payload and is_json else payload
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed


class TestPanelStandIn:
    """The remote routes the stand-in serves for the features, answering as the Panel does."""

    def test_install_script_and_status(self, panel):
        uuid = panel.add(panel_document())
        panel.install_scripts[uuid] = {"container_image": "x", "entrypoint": "sh", "script": None}
        assert panel_call(panel, "GET", f"/api/remote/servers/{uuid[:8]}/install")[2] == {
            "container_image": "x",
            "entrypoint": "sh",
            "script": None,
        }
        status, _, body = panel_call(panel, "POST", f"/api/remote/servers/{uuid}/install", {})
        assert status == 422 and body["errors"][0]["meta"]["source_field"] == "successful"
        report = {"successful": False, "reinstall": True}
        assert panel_call(panel, "POST", f"/api/remote/servers/{uuid}/install", report)[0] == 204
        assert panel.status[uuid] == "reinstall_failed"
        assert panel.requests[-1].body == report and panel.requests[-1].method == "POST"
        assert panel_call(panel, "GET", "/api/remote/servers/nope/install")[0] == 404

    def test_backup_upload_parts_status_and_restore(self, panel):
        uuid = panel.add(panel_document())
        backup = panel.add_backup(uuid)
        panel.backup_part_size = 10
        assert panel_call(panel, "GET", f"/api/remote/backups/{backup}")[0] == 400
        status, _, body = panel_call(panel, "GET", f"/api/remote/backups/{backup}?size=25")
        assert status == 200 and body["part_size"] == 10 and len(body["parts"]) == 3
        assert panel.requests[-1].query == {"size": "25"}
        part = urllib.parse.urlsplit(body["parts"][0]).path
        status, headers, _ = panel_call(panel, "PUT", part, b"0123456789")
        assert status == 200 and headers["etag"] and panel.uploads[(backup, 1)] == b"0123456789"
        done = {"successful": True, "checksum": "ab", "checksum_type": "sha1", "size": 25}
        path = f"/api/remote/backups/{backup}"
        assert panel_call(panel, "POST", path, {"successful": True})[0] == 422
        assert panel_call(panel, "POST", path, done)[0] == 204
        assert panel_call(panel, "POST", path, done)[0] == 400  # already completed
        panel.status[uuid] = "restoring_backup"
        assert panel_call(panel, "POST", path + "/restore", {"successful": True})[0] == 204
        assert panel.status[uuid] is None
        assert panel_call(panel, "POST", "/api/remote/backups/nope/restore", done)[0] == 404

    def test_transfer_outcome_needs_an_active_transfer(self, panel):
        uuid = panel.add(panel_document())
        path = f"/api/remote/servers/{uuid}/transfer/success"
        status, _, body = panel_call(panel, "POST", path)
        assert status == 409 and body["errors"][0]["detail"] == "Server is not being transferred."
        panel.transfers[uuid] = None
        assert panel_call(panel, "GET", path)[0] == 204 and panel.transfers[uuid] is True

    def test_activity_keeps_server_events_of_this_node(self, panel):
        uuid = panel.add(panel_document())
        item = {"server": uuid, "event": "server:sftp.write", "metadata": None, "timestamp": "t"}
        other = {**item, "server": str(uuidlib.uuid4())}
        status, _, body = panel_call(
            panel, "POST", "/api/remote/activity", {"data": [item, other, {**item, "event": "x"}]}
        )
        assert status == 200 and body == b"" and panel.activity == [item]
        bad = {"data": [{"server": uuid, "event": "server:x", "timestamp": "t"}]}
        assert panel_call(panel, "POST", "/api/remote/activity", bad)[0] == 422

    def test_container_status_and_unknown_routes(self, panel):
        uuid = panel.add(panel_document())
        body = {"data": {"new_state": "running"}}
        path = f"/api/remote/servers/{uuid}/container/status"
        assert panel_call(panel, "POST", path, body)[0] == 204
        assert panel.container_states[uuid] == "running"
        status, headers, _ = panel_call(panel, "PUT", path, body)
        assert status == 405 and headers["allow"] == "POST"
        assert panel_call(panel, "GET", "/api/remote/nothing")[0] == 404
        assert panel_call(panel, "GET", "/api/remote/nothing", token="no-dot")[0] == 400

    def test_sftp_auth_refuses_servers_in_a_blocking_state(self, panel):
        uuid = panel.add(panel_document())
        panel.sftp_users[("alice.smith", "pw")] = ["*"]
        login = {"username": f"alice.smith.{uuid[:8]}", "password": "pw"}
        assert panel_call(panel, "POST", "/api/remote/sftp/auth", login)[2]["server"] == uuid
        panel.status[uuid] = "installing"
        status, _, body = panel_call(panel, "POST", "/api/remote/sftp/auth", login)
        assert status == 409 and "installation" in body["errors"][0]["detail"]
        assert (
            panel_call(panel, "POST", "/api/remote/sftp/auth", {**login, "password": ""})[0] == 422
        )

    def test_a_subclass_adds_a_route(self):
        class Extended(FakePanel):
            ROUTES = (*FakePanel.ROUTES, w.PanelRoute("GET", r"/api/remote/ping", "ping"))

            def route_ping(self, h, req):
                h.send_json(200, {"pong": req.query.get("n")})

        panel = Extended()
        try:
            assert panel_call(panel, "GET", "/api/remote/ping?n=1")[2] == {"pong": "1"}
            assert panel_call(panel, "GET", "/api/remote/ping", token="a.b")[0] == 403
        finally:
            panel.close()


# CLI: --demo ######################################################################################


class TestDemo:
    def test_demo_prints_token_and_curl_lines_and_its_sync_works(self):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "wingslite.py"),
                "--demo",
                "--port",
                str(port),
                "--sftp-port",
                str(free_port()),
            ],
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
            token = next(
                line.split(": ", 1)[1].strip() for line in lines if line.startswith("node token:")
            )
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

    def test_sigterm_stops_the_demo_cleanly_and_removes_its_directory(self):
        proc = subprocess.Popen(
            [
                *(sys.executable, str(HERE / "wingslite.py"), "--demo"),
                *("--port", str(free_port()), "--sftp-port", str(free_port())),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            lines = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
                lines.append(proc.stdout.readline())
            root = Path(
                next(line.split(": ", 1)[1].strip() for line in lines if "data directory" in line)
            )
            assert root.is_dir()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert not root.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)


# CLI: configure and diagnostics ###################################################################


APPLICATION_KEY = "ptla_Zq8u2tN4vX7bC1mK5pL9sD3fG6hJ0wE2rT4yU8iO"


def run_cli(*args, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "wingslite.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


class NodeConfigurationEndpoint:
    """The Panel's ``GET /api/application/nodes/{id}/configuration`` (application API key)."""

    def __init__(self, configuration: dict, context: ssl.SSLContext | None = None):
        self.configuration = configuration
        self.requests: list[dict] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                endpoint.requests.append({"path": self.path, **dict(self.headers)})
                if self.headers.get("Authorization") != f"Bearer {APPLICATION_KEY}":
                    return self.answer(
                        401, panel_error(401, "AuthenticationException", "Unauthenticated.")
                    )
                if self.path != "/api/application/nodes/3/configuration":
                    return self.answer(404, panel_error(404, "NotFoundHttpException", ""))
                self.answer(200, endpoint.configuration)

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class TestOperatorCommands:
    """``configure`` fetches the node's config from the Panel; ``diagnostics`` redacts secrets."""

    def node_json(self, tmp_path, panel) -> dict:
        """What Node::getConfiguration() answers, pointed at loopback and tmp_path."""
        raw = node_config(tmp_path, panel.url)
        raw["api"]["port"] = free_port()
        raw["system"]["sftp"]["bind_port"] = free_port()
        del raw["wingslite"], raw["remote_query"]
        return raw

    def test_configure_writes_the_panels_configuration_and_the_daemon_runs_on_it(
        self, tmp_path, panel
    ):
        document = self.node_json(tmp_path, panel)
        endpoint = NodeConfigurationEndpoint(document)
        target = tmp_path / "etc" / "config.yml"
        argv = ["configure", "--panel-url", endpoint.url, "--token", APPLICATION_KEY]
        try:
            run = run_cli(*argv, "--node", "3", "--config", str(target))
            assert run.returncode == 0, run.stderr
            assert str(target) in run.stdout
            assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds the node's token
            assert yaml.safe_load(target.read_text()) == document
            assert endpoint.requests[0]["Authorization"] == f"Bearer {APPLICATION_KEY}"
            # An existing file is kept unless --override; a wrong key or node changes nothing.
            target.write_text("# hand edited\n")
            run = run_cli(*argv, "--node", "3", "--config", str(target))
            assert run.returncode == 1 and "--override" in run.stderr
            wrong = run_cli(
                *argv[:-1], "ptla_wrong", "--node", "3", "--config", str(target), "--override"
            )
            assert wrong.returncode == 1 and "API key was not accepted" in wrong.stderr
            missing = run_cli(*argv, "--node", "9", "--config", str(target), "--override")
            assert missing.returncode == 1 and "no such node" in missing.stderr
            assert target.read_text() == "# hand edited\n"
            run = run_cli(*argv, "--node", "3", "--config", str(target), "--override")
            assert run.returncode == 0 and yaml.safe_load(target.read_text()) == document
        finally:
            endpoint.close()
        # Without a subcommand, --config runs the daemon as before.
        daemon = subprocess.Popen(
            [sys.executable, str(HERE / "wingslite.py"), "--config", str(target)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = document["api"]["port"]
            wait_for(lambda: _answers(port), 20, interval_s=0.1, what="the daemon's API")
            assert api(port, "GET", "/api/system")[0] == 200
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=20) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)

    def test_configure_verifies_the_panels_certificate_unless_allowed_insecure(
        self, tmp_path, panel, certificates
    ):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates.cert, certificates.key)
        endpoint = NodeConfigurationEndpoint(self.node_json(tmp_path, panel), context)
        target = tmp_path / "config.yml"
        argv = ["configure", "--panel-url", endpoint.url, "--token", APPLICATION_KEY, "--node", "3"]
        try:
            run = run_cli(*argv, "--config", str(target))
            assert run.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in run.stderr
            assert not target.exists()
            run = run_cli(*argv, "--config", str(target), "--allow-insecure")
            assert run.returncode == 0, run.stderr
            assert yaml.safe_load(target.read_text())["token"] == TOKEN
        finally:
            endpoint.close()

    def test_diagnostics_shows_versions_quota_log_and_states_but_no_secret(
        self, tmp_path, panel, make_daemon
    ):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        log = tmp_path / "wingslite.log"
        log.write_text("".join(f"log line {n}\n" for n in range(300)))
        raw = node_config(tmp_path, panel.url, wingslite__metrics_token="metrics-secret-1")
        raw["api"]["port"] = daemon.port
        raw["wingslite"]["log_file"] = str(log)
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(raw))
        run = run_cli("diagnostics", "--config", str(path))
        assert run.returncode == 0, run.stderr
        out = run.stdout
        for secret in (TOKEN, TOKEN_ID, "metrics-secret-1"):  # the id too, as Wings redacts it
            assert secret not in out
        assert "token: '[redacted]'" in out and "token_id: '[redacted]'" in out
        for expected in (
            f"wingslite       {w.VERSION}",
            "python ",
            "kernel ",
            "cgroups ",
            "docker engine ",
        ):
            assert expected in out, expected
        assert "backend soft" in out
        assert "log line 299" in out and "log line 100\n" in out and "log line 99\n" not in out
        assert f"{uuid}  offline" in out
        # The same command before --config, and without a daemon: the last recorded states.
        daemon.stop()
        again = run_cli("--config", str(path), "diagnostics")
        assert again.returncode == 0 and "did not answer" in again.stdout


# the Panel's buttons ##############################################################################


#
# Every call the Panel (pterodactyl/panel 1.11) makes on a node, sent exactly as it sends it --
# app/Repositories/Wings/*.php through Guzzle 7: `Authorization: Bearer <node secret>`,
# `Accept: application/json`, `Content-Type: application/json` on every call (GET, DELETE and the
# raw file write too), bodies as PHP's json_encode writes them (`\/`, `\uXXXX`), queries encoded
# as RFC 3986 -- plus the browser's own calls to the node (websocket, signed download/upload URLs).
# Each test checks the status the Panel treats as success (any 2xx) and the fields the Panel or
# its browser code reads from the answer.


def php_json(body) -> bytes:
    """JSON as PHP's json_encode writes it by default: ASCII only, "/" escaped, no spaces."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


def from_panel(daemon, method: str, path: str, body=None, *, raw=None, query=None, headers=None):
    """One request as the Panel's DaemonRepository sends it; (status, headers, raw body)."""
    if query:
        path += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")
    all_headers = {
        "User-Agent": "GuzzleHttp/7",
        "Authorization": f"Bearer {TOKEN}",
        "Accept": "application/json",
        "Content-Type": "application/json",
        **(headers or {}),
    }
    data = raw if raw is not None else (php_json(body) if body is not None else None)
    if data is None and method in ("POST", "PUT"):
        data = b""  # Guzzle sends `Content-Length: 0` on a POST without a body
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    conn.request(method, path, body=data, headers=all_headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def from_panel_json(daemon, method: str, path: str, body=None, **kwargs):
    """``from_panel`` with the answer decoded as the Panel does (json_decode, assoc arrays)."""
    status, headers, payload = from_panel(daemon, method, path, body, **kwargs)
    return status, headers, json.loads(payload) if payload else None


def is_daemon_error(status: int, headers: dict, payload) -> bool:
    """A 4xx the Panel can show: DaemonConnectionException reads ``error`` and X-Request-Id."""
    body = json.loads(payload) if isinstance(payload, bytes) else payload
    return (
        400 <= status < 500
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and bool(body["error"])
        and bool(headers.get("x-request-id"))
    )


def carbon_parses(text) -> bool:
    """Carbon::parse() of FileObjectTransformer: an RFC 3339 date-time."""
    import datetime

    if not isinstance(text, str):
        return False
    with contextlib.suppress(ValueError):
        return bool(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")))
    return False


def posted_to_panel(panel, path: str, timeout_s: float = 15):
    """The first POST the node made to ``path`` on the Panel stand-in (waits for it)."""

    def find():
        with panel.lock:
            return next((r for r in panel.requests if r.path == path and r.method == "POST"), None)

    return wait_for(find, timeout_s, what=f"POST {path}")


def node_configuration(panel_url: str) -> dict:
    """The body of POST /api/update: ``Node::getConfiguration()`` as NodeUpdateService sends it."""
    return {
        "debug": False,
        "uuid": "5c5bd1c2-6a3e-4a4f-9d0e-1f0f6e2d8b47",
        "token_id": TOKEN_ID,
        "token": TOKEN,
        "api": {
            "host": "0.0.0.0",
            "port": 8080,
            "ssl": {
                "enabled": False,
                "cert": "/etc/letsencrypt/live/node1.example.com/fullchain.pem",
                "key": "/etc/letsencrypt/live/node1.example.com/privkey.pem",
            },
            "upload_limit": 100,
        },
        "system": {"data": "/var/lib/pterodactyl/volumes", "sftp": {"bind_port": 2022}},
        "allowed_mounts": [],
        "remote": panel_url,
    }


_INSTALLATION_LANDED = hasattr(w.ApiHandler, "route_reinstall_server")


class TestPanelButtons:
    """Every Panel -> node call and every browser -> node call, as the Panel makes it."""

    @pytest.fixture
    def node(self, console_node):
        """A daemon with one server (a console without Docker) and its directory."""
        daemon = console_node()
        server = daemon.get_server(daemon.uuid)
        server.fs.ensure()
        daemon.server = server
        return daemon

    # -- admin: nodes --------------------------------------------------------------------------

    def test_admin_node_page_reads_the_system_information(self, node):
        """Admin/Nodes/SystemInformationController reads version, os, architecture,
        kernel_version and cpu_count; the admin node list pings it from the browser."""
        status, _, info = from_panel_json(node, "GET", "/api/system")
        assert status == 200
        assert isinstance(info["version"], str) and info["version"]
        assert info["os"] == "linux" and isinstance(info["architecture"], str)
        assert isinstance(info["kernel_version"], str) and info["kernel_version"]
        assert isinstance(info["cpu_count"], int) and info["cpu_count"] >= 1
        # resources/views/admin/nodes/index.blade.php: a cross-origin GET with the node secret,
        # so the browser asks first (preflight) and then needs its origin allowed on the answer
        origin = node.config.remote
        status, headers, _ = http_raw(
            node.port,
            "OPTIONS",
            "/api/system",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
            token=None,
        )
        assert status == 204 and headers["access-control-allow-origin"] == origin
        assert "authorization" in headers["access-control-allow-headers"].lower()
        assert "GET" in headers["access-control-allow-methods"]
        status, headers, _ = from_panel(node, "GET", "/api/system", headers={"Origin": origin})
        assert status == 200 and headers["access-control-allow-origin"] == origin

    @pytest.mark.docker
    def test_telemetry_reads_the_v2_system_information(self, docker_engine, panel, make_daemon):
        """Services/Telemetry/TelemetryCollectionService: GET /api/system?v=2."""
        daemon = make_daemon(panel)
        status, _, info = from_panel_json(daemon, "GET", "/api/system", query={"v": 2})
        assert status == 200 and info["version"]
        docker = info["docker"]
        assert docker["version"] and docker["cgroups"]["driver"] and docker["cgroups"]["version"]
        for key in ("total", "running", "paused", "stopped"):
            assert isinstance(docker["containers"][key], int)
        assert docker["storage"]["driver"] and isinstance(docker["runc"]["version"], str)
        system = info["system"]
        for key in ("architecture", "kernel_version", "os", "os_type"):
            assert isinstance(system[key], str) and system[key], key
        assert system["cpu_threads"] >= 1 and system["memory_bytes"] > 0

    def test_node_settings_save_pushes_the_configuration(self, node):
        """DaemonConfigurationRepository::update (NodeUpdateService): any 2xx is a success;
        anything else shows ConfigurationNotPersistedException to the admin."""
        status, _, _ = from_panel(
            node, "POST", "/api/update", node_configuration(node.config.remote)
        )
        assert 200 <= status < 300

    # -- admin: servers ------------------------------------------------------------------------

    def test_create_server(self, panel, make_daemon):
        """DaemonServerRepository::create (ServerCreationService): a failure here makes the
        Panel force-delete the new server, so the create must succeed for a known server."""
        daemon = make_daemon(panel)
        uuid = panel.add(panel_document(skip_egg_scripts=True))
        body = {"uuid": uuid, "start_on_completion": False}
        status, _, _ = from_panel(daemon, "POST", "/api/servers", body)
        assert status == 202
        status, _, view = from_panel_json(daemon, "GET", f"/api/servers/{uuid}")
        assert status == 200 and view["state"] == "offline"
        assert (daemon.config.data_dir / uuid).is_dir()

    def test_create_server_started_on_completion(self, node):
        """ServerCreationService passes the admin form's "Start Server when Installed"."""
        panel = node.panel_fake
        uuid = panel.add(panel_document(skip_egg_scripts=True))
        body = {"uuid": uuid, "start_on_completion": True}
        assert from_panel(node, "POST", "/api/servers", body)[0] == 202
        server = wait_for(lambda: node.servers.get(uuid), 10, what="the new server")
        wait_for(lambda: server.state == "running", 15, what="the new server to start")

    @pytest.mark.xfail(
        not _INSTALLATION_LANDED,
        strict=True,
        reason="installation (POST /servers/{uuid}/install to the Panel) is not in this build",
    )
    def test_a_created_server_reports_its_installation(self, panel, make_daemon):
        """The Panel shows a new server as `installing` until the node POSTs
        /api/remote/servers/{uuid}/install (Remote/Servers/ServerInstallController@store);
        an egg that skips its scripts is reported installed at once (Wings: server/install.go)."""
        daemon = make_daemon(panel)
        uuid = panel.add(panel_document(skip_egg_scripts=True))
        assert (
            from_panel(
                daemon, "POST", "/api/servers", {"uuid": uuid, "start_on_completion": False}
            )[0]
            == 202
        )
        path = f"/api/remote/servers/{uuid}/install"
        report = posted_to_panel(panel, path, 10)
        assert report.body == {"successful": True, "reinstall": False}

    @pytest.mark.xfail(
        not _INSTALLATION_LANDED,
        strict=True,
        reason="POST /api/servers/{uuid}/reinstall is not in this build",
    )
    def test_reinstall(self, node):
        """DaemonServerRepository::reinstall (ReinstallServerService, admin and client
        "Reinstall"): no body; a non-2xx rolls the Panel's `installing` status back."""
        status, _, _ = from_panel(node, "POST", f"/api/servers/{node.uuid}/reinstall")
        assert status == 202
        path = f"/api/remote/servers/{node.uuid}/install"
        panel = node.panel_fake
        report = posted_to_panel(panel, path, 15)
        assert report.body["reinstall"] is True and isinstance(report.body["successful"], bool)

    def test_build_change_and_suspension_sync(self, node):
        """DaemonServerRepository::sync: BuildModificationService (result ignored) and
        SuspensionService (a non-2xx rolls the suspension back and shows Wings' error)."""
        panel, power = node.panel_fake, f"/api/servers/{node.uuid}/power"
        assert from_panel(node, "POST", power, {"action": "start"})[0] == 202
        wait_for(lambda: node.server.state == "running", 10, what="running")
        conn, _ = ws_authed(node, node.uuid)
        with conn:
            panel.merge_settings(node.uuid, {"suspended": True, "build": {"memory_limit": 2048}})
            status, _, _ = from_panel(node, "POST", f"/api/servers/{node.uuid}/sync")
            assert status == 204
            assert ws_close_code(conn) == 4409  # the console of a suspended server closes
        status, _, view = from_panel_json(node, "GET", f"/api/servers/{node.uuid}")
        assert view["is_suspended"] is True
        wait_for(lambda: node.server.state == "offline", 15, what="the suspended server to stop")
        status, headers, payload = from_panel(node, "POST", power, {"action": "start"})
        assert status == 400 and is_daemon_error(status, headers, payload)
        assert node.server.state == "offline"
        panel.merge_settings(node.uuid, {"suspended": False})
        assert from_panel(node, "POST", f"/api/servers/{node.uuid}/sync")[0] == 204
        assert from_panel_json(node, "GET", f"/api/servers/{node.uuid}")[2]["is_suspended"] is False
        assert from_panel(node, "POST", power, {"action": "start"})[0] == 202
        wait_for(lambda: node.server.state == "running", 10, what="running again")
        unknown = str(uuidlib.uuid4())
        assert is_daemon_error(*from_panel(node, "POST", f"/api/servers/{unknown}/sync"))

    def test_delete_server(self, node):
        """DaemonServerRepository::delete (ServerDeletionService: a 404 counts as deleted;
        Remote/ServerTransferController@success on the old node)."""
        root = node.server.fs.root
        (root / "world.dat").write_bytes(b"x")
        assert from_panel(node, "DELETE", f"/api/servers/{node.uuid}")[0] == 204
        wait_for(lambda: not root.exists(), 10, what="the server's files to go")
        status, headers, payload = from_panel(node, "DELETE", f"/api/servers/{node.uuid}")
        assert status == 404 and is_daemon_error(status, headers, payload)

    def test_transfer_notify(self, panel, make_daemon, tmp_path):
        """DaemonTransferRepository::notify (Admin/Servers/ServerTransferController@transfer):
        the source node gets server_id, url, "Bearer <jwt>" and a server object."""
        pair = transfer_pair(panel, make_daemon, tmp_path, panel.add(panel_document()))
        uuid, source, destination, dst_panel = (
            pair.uuid,
            pair.source,
            pair.destination,
            pair.dst_panel,
        )
        try:
            root = pair.src_root
            (root / "server.properties").write_text("motd=moved\n")
            with dst_panel.lock:
                dst_panel.transfers[uuid] = None
            with panel.lock:
                panel.transfers[uuid] = None
            body = {
                "server_id": uuid,
                "url": f"http://127.0.0.1:{destination.port}/api/transfers",
                "token": "Bearer " + transfer_token(uuid),
                "server": {"uuid": uuid, "start_on_completion": False},
            }
            status, _, _ = from_panel(source, "POST", f"/api/servers/{uuid}/transfer", body)
            assert status == 202
            wait_for(lambda: dst_panel.transfers.get(uuid) is True, 30, what="the transfer")
            moved = tmp_path / "dst" / "volumes" / uuid / "server.properties"
            assert moved.read_text() == "motd=moved\n"
        finally:
            dst_panel.close()

    # -- client: console, power, resources -----------------------------------------------------

    def test_resource_usage(self, node):
        """DaemonServerRepository::getDetails: ResourceUtilizationController (StatsTransformer)
        and ProcessScheduleService (`state` offline/stopping skips "only when online" tasks)."""
        status, _, view = from_panel_json(node, "GET", f"/api/servers/{node.uuid}")
        assert status == 200 and isinstance(view, dict)
        assert view["state"] in ("offline", "starting", "running", "stopping")
        assert view["is_suspended"] is False
        use = view["utilization"]
        for key in ("memory_bytes", "cpu_absolute", "disk_bytes", "uptime"):
            assert isinstance(use[key], (int, float)) and not isinstance(use[key], bool), key
        assert isinstance(use["network"]["rx_bytes"], int)
        assert isinstance(use["network"]["tx_bytes"], int)
        status, headers, payload = from_panel(node, "GET", f"/api/servers/{uuidlib.uuid4()}")
        assert status == 404 and is_daemon_error(status, headers, payload)

    def test_power_buttons(self, node):
        """DaemonPowerRepository::send (PowerController, RunTaskJob, p:server:bulk-power)."""
        server = node.server
        for action, state in (
            ("start", "running"),
            ("restart", "running"),
            ("stop", "offline"),
            ("start", "running"),
            ("kill", "offline"),
        ):
            status, _, _ = from_panel(
                node, "POST", f"/api/servers/{node.uuid}/power", {"action": action}
            )
            assert status == 202, action
            wait_for(lambda s=state: server.state == s, 10, what=f"{action} -> {state}")
            wait_for(lambda: DockerServers.power_idle(server), 10, what=f"{action} to finish")
        status, headers, payload = from_panel(
            node, "POST", f"/api/servers/{node.uuid}/power", {"action": "explode"}
        )
        assert status == 422 and is_daemon_error(status, headers, payload)

    def test_console_command(self, node):
        """DaemonCommandRepository::send (CommandController, RunTaskJob): a 502 from the node
        is what the Panel turns into "Server must be online in order to send commands."."""
        path = f"/api/servers/{node.uuid}/commands"
        assert from_panel(node, "POST", path, {"commands": ["say hi"]})[0] == 502
        from_panel(node, "POST", f"/api/servers/{node.uuid}/power", {"action": "start"})
        wait_for(lambda: node.server.state == "running", 10, what="running")
        status, _, _ = from_panel(node, "POST", path, {"commands": ["say hi/there"]})
        assert status == 204
        assert "> say hi/there" in node.server.env.lines

    @pytest.mark.docker
    def test_a_real_container_through_the_buttons(self, docker_servers):
        """Start, console command, resource usage, stop and delete of a server in Docker."""
        uuid = docker_servers.add()
        daemon = docker_servers.boot()
        power = f"/api/servers/{uuid}/power"
        assert from_panel(daemon, "POST", power, {"action": "start"})[0] == 202
        docker_servers.wait_state(uuid, "running")
        body = {"commands": ["echo panel-says-hi"]}
        assert from_panel(daemon, "POST", f"/api/servers/{uuid}/commands", body)[0] == 204
        docker_servers.wait_console(uuid, "panel-says-hi")

        def utilization():
            view = from_panel_json(daemon, "GET", f"/api/servers/{uuid}")[2]
            return view["utilization"] if view["utilization"]["memory_bytes"] else None

        use = wait_for(utilization, 10, what="the container's memory figure")
        assert use["memory_bytes"] > 0 and use["uptime"] > 0
        # the console's stat block and charts are fed without asking while the server runs
        conn = ws_open(daemon, uuid)
        with conn:
            ws_send(conn, "auth", ws_token(ws_claims(uuid)))
            ws_until(conn, "auth success")
            stats = json.loads(ws_until(conn, "stats", 10)[0])
            assert stats["memory_bytes"] > 0 and stats["network"]["rx_bytes"] >= 0
        assert from_panel(daemon, "POST", power, {"action": "stop"})[0] == 202
        docker_servers.wait_state(uuid, "offline")
        assert from_panel(daemon, "DELETE", f"/api/servers/{uuid}")[0] == 204
        wait_for(lambda: docker_servers.container_id(uuid) is None, 15, what="the container to go")

    def test_revoke_user_tokens(self, node):
        """DaemonServerRepository::revokeUserJTI (DetailsModificationService,
        SubuserController): jti = md5(user_id . server_uuid)."""
        claims = ws_claims(node.uuid, user_id=7)
        conn, first = ws_authed(node, node.uuid, user_id=7)
        with conn:
            assert first[0] == ("auth success", [])
            jti = hashlib.md5(f"7{node.uuid}".encode()).hexdigest()
            status, _, _ = from_panel(
                node, "POST", f"/api/servers/{node.uuid}/ws/deny", {"jtis": [jti]}
            )
            assert status == 204
            ws_until(conn, "jwt error")
            ws_send(conn, "auth", ws_token(claims))
            assert ws_until(conn, "jwt error")

    # -- the browser's console -------------------------------------------------------------------

    def test_browser_console_session(self, node):
        """resources/scripts/plugins/Websocket.ts and components/server/**: auth, "send logs" and
        "send stats" with args [null], `stats` as a JSON string the browser parses, power and
        commands, and a token refresh re-sent on the same socket."""
        conn = ws_open(node, node.uuid)
        with conn:
            ws_send(conn, "auth", ws_token(ws_claims(node.uuid)))
            assert ws_until(conn, "auth success") == []
            ws_send(conn, "send logs", None)
            ws_send(conn, "send stats", None)
            stats = json.loads(ws_until(conn, "stats")[0])
            for key in ("memory_bytes", "cpu_absolute", "disk_bytes"):
                assert isinstance(stats[key], (int, float)), key
            assert isinstance(stats["network"]["rx_bytes"], int)
            assert isinstance(stats["network"]["tx_bytes"], int)
            assert isinstance(stats.get("uptime", 0), int)
            ws_send(conn, "set state", "start")
            assert ws_until(conn, "status", match="running") == ["running"]
            ws_send(conn, "send command", "list")
            assert ws_until(conn, "console output", match="> list") == ["> list"]
            # a console opened later replays the log: "send logs" answers `console output` lines
            late = ws_open(node, node.uuid)
            with late:
                ws_send(late, "auth", ws_token(ws_claims(node.uuid)))
                ws_until(late, "auth success")
                ws_send(late, "send logs", None)
                assert ws_until(late, "console output", match="> list") == ["> list"]
            ws_send(conn, "auth", ws_token(ws_claims(node.uuid)))  # the refresh on expiring
            assert ws_until(conn, "auth success") == []
            ws_send(conn, "set state", "kill")
            assert ws_until(conn, "status", match="offline") == ["offline"]

    # -- client: files -------------------------------------------------------------------------

    def test_files_list_directory(self, node):
        """DaemonFileRepository::getDirectory -> FileObjectTransformer (name, mode, mode_bits,
        size, file, symlink, mime, created, modified) -> rawDataToFileObject in the browser."""
        root = node.server.fs.root
        (root / "plugins").mkdir()
        (root / "server.properties").write_text("motd=hi\n")
        (root / "latest.log").symlink_to("server.properties")
        status, _, listing = from_panel_json(
            node, "GET", f"/api/servers/{node.uuid}/files/list-directory", query={"directory": "/"}
        )
        assert status == 200 and isinstance(listing, list)
        by_name = {item["name"]: item for item in listing}
        assert set(by_name) == {"plugins", "server.properties", "latest.log"}
        for item in listing:
            assert isinstance(item["mode"], str) and re.fullmatch(r"[0-7]{3,4}", item["mode_bits"])
            assert isinstance(item["size"], int)
            assert isinstance(item["mime"], str) and "/" in item["mime"]
            assert carbon_parses(item["created"]) and carbon_parses(item["modified"])
        assert (
            by_name["plugins"]["file"] is False and by_name["plugins"]["mime"] == "inode/directory"
        )
        assert by_name["server.properties"]["file"] is True
        assert by_name["server.properties"]["size"] == len("motd=hi\n")
        assert by_name["server.properties"]["mime"].startswith("text/")  # editable in the browser
        assert by_name["latest.log"]["symlink"] is True
        (root / "w\u00f6rld maps").mkdir()
        (root / "w\u00f6rld maps" / "r.0.0.mca").write_bytes(b"r" * 10)
        status, _, listing = from_panel_json(
            node,
            "GET",
            f"/api/servers/{node.uuid}/files/list-directory",
            query={"directory": "/w\u00f6rld maps"},
        )
        assert status == 200 and [(i["name"], i["size"]) for i in listing] == [("r.0.0.mca", 10)]
        status, headers, payload = from_panel(
            node,
            "GET",
            f"/api/servers/{node.uuid}/files/list-directory",
            query={"directory": "/nope"},
        )
        assert status == 404 and is_daemon_error(status, headers, payload)

    def test_files_contents_and_write(self, node):
        """getContent (the Panel refuses a Content-Length over files.max_edit_size, so the answer
        must carry one) and putContent (a raw body, still labelled application/json)."""
        path = f"/api/servers/{node.uuid}/files/write"
        text = 'motd=h\u00e9llo / {"not": "json"}\n'.encode()
        status, _, _ = from_panel(node, "POST", path, raw=text, query={"file": "/conf/a b.txt"})
        assert status == 204
        assert (node.server.fs.root / "conf" / "a b.txt").read_bytes() == text
        status, headers, payload = from_panel(
            node, "GET", f"/api/servers/{node.uuid}/files/contents", query={"file": "/conf/a b.txt"}
        )
        assert status == 200 and payload == text
        assert int(headers["content-length"]) == len(text)
        status, headers, payload = from_panel(
            node, "GET", f"/api/servers/{node.uuid}/files/contents", query={"file": "/missing"}
        )
        assert status == 404 and is_daemon_error(status, headers, payload)

    def test_files_write_of_a_megabyte_waits_for_100_continue(self, node):
        """Guzzle adds `Expect: 100-Continue` to bodies of 1 MiB and more
        (PrepareBodyMiddleware) and holds the body until the node answers 100 or a second
        passes: the editor saving a big file."""
        data = os.urandom(3 * 1024 * 1024)
        path = f"/api/servers/{node.uuid}/files/write?file=%2Fbig.bin"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
            f"User-Agent: GuzzleHttp/7\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Accept: application/json\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nExpect: 100-Continue\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(head.encode())
            interim = sock.recv(4096)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
            sock.sendall(data)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 204 "), answer
        assert (node.server.fs.root / "big.bin").read_bytes() == data

    def test_files_create_directory_rename_copy_delete_chmod(self, node):
        """createDirectory {name, path}, renameFiles (PUT {root, files:[{from,to}]}), copyFile
        {location}, deleteFiles {root, files}, chmodFiles {root, files:[{file, mode}]} with the
        mode as the browser's string."""
        base, root = f"/api/servers/{node.uuid}/files", node.server.fs.root
        body = {"name": "cfg", "path": "/plugins"}
        assert from_panel(node, "POST", f"{base}/create-directory", body)[0] == 204
        assert (root / "plugins" / "cfg").is_dir()
        (root / "plugins" / "cfg" / "a.yml").write_text("a: 1\n")
        body = {"root": "/plugins/cfg", "files": [{"from": "a.yml", "to": "b.yml"}]}
        assert from_panel(node, "PUT", f"{base}/rename", body)[0] == 204
        assert (root / "plugins" / "cfg" / "b.yml").read_text() == "a: 1\n"
        # RenameFileModal's "Move": `to` relative to the directory, "../" allowed, parents made
        (root / "plugins" / "cfg" / "m.yml").write_text("m\n")
        body = {"root": "/plugins/cfg", "files": [{"from": "m.yml", "to": "../../moved/m.yml"}]}
        assert from_panel(node, "PUT", f"{base}/rename", body)[0] == 204
        assert (root / "moved" / "m.yml").read_text() == "m\n"
        assert (
            from_panel(node, "POST", f"{base}/copy", {"location": "/plugins/cfg/b.yml"})[0] == 204
        )
        assert (root / "plugins" / "cfg" / "b copy.yml").read_text() == "a: 1\n"
        body = {"root": "/plugins/cfg", "files": [{"file": "b.yml", "mode": "600"}]}
        assert from_panel(node, "POST", f"{base}/chmod", body)[0] == 204
        assert stat.S_IMODE((root / "plugins" / "cfg" / "b.yml").stat().st_mode) == 0o600
        body = {"root": "/plugins", "files": ["cfg"]}
        assert from_panel(node, "POST", f"{base}/delete", body)[0] == 204
        assert not (root / "plugins" / "cfg").exists()
        assert is_daemon_error(*from_panel(node, "POST", f"{base}/copy", {"location": "/nope"}))

    def test_files_compress_and_decompress(self, node):
        """compressFiles answers one stat object (FileObjectTransformer; the browser adds it to
        the list and offers to unarchive it when its mime is an archive type); decompressFile."""
        base, root = f"/api/servers/{node.uuid}/files", node.server.fs.root
        (root / "world").mkdir()
        (root / "world" / "level.dat").write_bytes(b"level" * 100)
        body = {"root": "/", "files": ["world"]}
        status, _, info = from_panel_json(node, "POST", f"{base}/compress", body)
        assert status == 200 and info["name"].endswith(".tar.gz") and info["file"] is True
        assert info["mime"] == "application/tar+gzip"  # Wings: router_server_files.go
        assert info["size"] == (root / info["name"]).stat().st_size > 0
        assert carbon_parses(info["created"]) and carbon_parses(info["modified"])
        # the listing the browser reloads offers "Unarchive" only for the mime types it knows
        listing = from_panel_json(node, "GET", f"{base}/list-directory", query={"directory": "/"})
        listed = next(item for item in listing[2] if item["name"] == info["name"])
        assert listed["mime"] in ("application/gzip", "application/x-gzip")
        (root / "restored").mkdir()
        (root / info["name"]).rename(root / "restored" / info["name"])
        body = {"root": "/restored", "file": info["name"]}
        assert from_panel(node, "POST", f"{base}/decompress", body)[0] == 204
        assert (root / "restored" / "world" / "level.dat").read_bytes() == b"level" * 100

    def test_files_pull(self, panel, make_daemon, origin):
        """DaemonFileRepository::pull: {url, root} with the null keys left out (array_filter)."""
        daemon, server = _fm_daemon(
            panel, make_daemon, wingslite__remote_download_allow_internal=True
        )
        origin.routes["/mods/Geyser.jar"] = (200, {}, b"G" * 3000)
        body = {"url": origin.url + "/mods/Geyser.jar", "root": "/plugins"}
        status, _, _ = from_panel(daemon, "POST", fm_path(server, "pull"), body)
        assert 200 <= status < 300
        target = server.fs.root / "plugins" / "Geyser.jar"
        wait_for(lambda: target.exists() and target.stat().st_size == 3000, 10, what="the pull")
        # every key the client API may add: file_name, use_header, foreground (answers a stat)
        body = {
            "url": origin.url + "/mods/Geyser.jar",
            "root": "/plugins",
            "file_name": "g.jar",
            "use_header": True,
            "foreground": True,
        }
        status, _, _ = from_panel(daemon, "POST", fm_path(server, "pull"), body)
        assert 200 <= status < 300
        assert (server.fs.root / "plugins" / "g.jar").read_bytes() == b"G" * 3000

    # -- the browser's signed URLs ---------------------------------------------------------------

    def test_signed_file_download(self, node):
        """Client/Servers/FileController@download: the browser opens
        {node}/download/file?token=<jwt with file_path (URL-decoded)>."""
        (node.server.fs.root / "logs").mkdir()
        (node.server.fs.root / "logs" / "latest log.txt").write_bytes(b"line\n" * 10)
        token = signed_token(node.uuid, file_path="/logs/latest log.txt")
        status, headers, data = http_raw(
            node.port, "GET", f"/download/file?token={token}", token=None
        )
        assert status == 200 and data == b"line\n" * 10
        assert "attachment" in headers.get("content-disposition", "")

    def test_signed_file_upload_from_the_panel_page(self, node):
        """FileUploadController + UploadButton.tsx: axios POSTs multipart field `files` to
        {node}/upload/file?token=...&directory=... from the Panel's origin (CORS)."""
        body, content_type = multipart_body({"a.txt": b"alpha", "b.bin": b"\x00" * 100})
        query = urllib.parse.urlencode({"token": signed_token(node.uuid), "directory": "/up"})
        origin = node.config.remote
        headers = {"Content-Type": content_type, "Origin": origin}
        status, answer_headers, _ = http_raw(
            node.port, "POST", f"/upload/file?{query}", body, headers, token=None
        )
        assert status == 200 and answer_headers["access-control-allow-origin"] == origin
        assert (node.server.fs.root / "up" / "a.txt").read_bytes() == b"alpha"
        assert (node.server.fs.root / "up" / "b.bin").read_bytes() == b"\x00" * 100

    def test_sftp_details(self, panel, make_daemon):
        """The Settings tab's "SFTP Details": sftp://<username>.<uuidShort>@<node>:<port>; the
        node asks the Panel (POST /api/remote/sftp/auth), which answers the full uuid."""
        daemon, server = _sftp_daemon(panel, make_daemon)
        with sftp_client(daemon, server) as client:
            with client.open("/hello.txt", "w") as fh:
                fh.write("from sftp\n")
            assert client.listdir("/") == ["hello.txt"]
        assert (server.fs.root / "hello.txt").read_text() == "from sftp\n"
        auth = next(r for r in panel.requests if r.path == "/api/remote/sftp/auth")
        assert auth.body["username"] == f"{SFTP_USER}.{server.uuid[:8]}"

    # -- client: backups ---------------------------------------------------------------------------

    def test_backup_create_download_restore_delete(self, node):
        """DaemonBackupRepository: backup {adapter, uuid, ignore} (InitiateBackupService),
        the wings download URL (DownloadLinkService), restore {adapter, truncate_directory,
        download_url: ""} (BackupController@restore), delete (DeleteBackupService, 404
        tolerated)."""
        panel, root = node.panel_fake, node.server.fs.root
        (root / "world").mkdir()
        (root / "world" / "level.dat").write_bytes(b"level")
        (root / "cache.tmp").write_bytes(b"tmp")
        backup = panel.add_backup(node.uuid)
        base = f"/api/servers/{node.uuid}/backup"
        body = {"adapter": "wings", "uuid": backup, "ignore": "*.tmp\nlogs/"}
        conn, _ = ws_authed(node, node.uuid)  # the Backups tab listens on the console socket
        with conn:
            assert from_panel(node, "POST", base, body)[0] == 202
            # BackupRow.tsx: `backup completed:<uuid>` with a JSON string
            event = json.loads(ws_until(conn, f"backup completed:{backup}", 20)[0])
            assert event["uuid"] == backup and event["is_successful"] is True
            assert event["checksum"] and event["checksum_type"] == "sha1"
            assert isinstance(event["file_size"], int) and event["file_size"] > 0
        report = wait_for(lambda: panel_report(panel, backup), 20, what="the backup report")
        assert report["successful"] is True
        status, data = download(node, backup_token(node.uuid, backup))
        assert status == 200 and "world/level.dat" in tar_names(data)
        assert "cache.tmp" not in tar_names(data)
        (root / "world" / "level.dat").write_bytes(b"changed")
        body = {"adapter": "wings", "truncate_directory": True, "download_url": ""}
        conn, _ = ws_authed(node, node.uuid)
        with conn:
            assert from_panel(node, "POST", f"{base}/{backup}/restore", body)[0] == 202
            ws_until(conn, "backup restore completed", 20)  # the browser reloads its file list
        restored = wait_for(lambda: restore_report(panel, backup), 20, what="the restore report")
        assert restored == {"successful": True}
        assert (root / "world" / "level.dat").read_bytes() == b"level"
        assert from_panel(node, "DELETE", f"{base}/{backup}")[0] == 204
        status, headers, payload = from_panel(node, "DELETE", f"{base}/{backup}")
        assert status == 404 and is_daemon_error(status, headers, payload)

    def test_backup_to_s3(self, node, s3):
        """The same call with adapter "s3": the node asks the Panel for presigned part URLs
        (GET /api/remote/backups/{uuid}?size=) and reports the parts' ETags."""
        panel = node.panel_fake
        s3.serve_for(panel, part_size=5 << 20)
        (node.server.fs.root / "server.properties").write_text("motd=s3\n")
        backup = panel.add_backup(node.uuid)
        body = {"adapter": "s3", "uuid": backup, "ignore": ""}
        assert from_panel(node, "POST", f"/api/servers/{node.uuid}/backup", body)[0] == 202
        report = wait_for(lambda: panel_report(panel, backup), 20, what="the backup report")
        assert report["successful"] is True and s3.parts
        # BackupController@restore hands the node a presigned S3 GET URL
        s3.objects[f"{backup}.tar.gz"] = b"".join(s3.parts[n] for n in sorted(s3.parts))
        (node.server.fs.root / "server.properties").write_text("motd=changed\n")
        body = {
            "adapter": "s3",
            "truncate_directory": False,
            "download_url": f"{s3.url}/{backup}.tar.gz?X-Amz-Signature=abc",
        }
        path = f"/api/servers/{node.uuid}/backup/{backup}/restore"
        assert from_panel(node, "POST", path, body)[0] == 202
        restored = wait_for(lambda: restore_report(panel, backup), 20, what="the restore report")
        assert restored == {"successful": True}
        assert (node.server.fs.root / "server.properties").read_text() == "motd=s3\n"


# hostile input to the Panel features ##############################################################


def _gz(*blocks: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        for block in blocks:
            gz.write(block)
    return out.getvalue()


def _tar_header(name: str, kind: bytes, size: int, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    if pax is not None:
        info.pax_headers = pax
        return info.tobuf(format=tarfile.PAX_FORMAT)
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _tar_file(name: str, data: bytes, pax: dict | None = None) -> bytes:
    padding = b"\0" * (-len(data) % 512)
    return _tar_header(name, tarfile.REGTYPE, len(data), pax) + data + padding


_TAR_END = b"\0" * 1024


def _decompress(daemon, server, name: str, data: bytes):
    (server.fs.root / name).write_bytes(data)
    server.fs.recalculate()
    before = tree_snapshot(server.fs.root)
    status, _, answer = api(
        daemon, "POST", fm_path(server, "decompress"), {"root": "/", "file": name}
    )
    return status, answer, before


class TestHostileFeatureInput:
    """What a hostile user or peer sends to the Panel features: a clear error, nothing changed."""

    def test_a_tar_header_that_claims_megabytes_is_refused_before_it_is_read(
        self, panel, make_daemon
    ):
        # tarfile reads a GNU long name / PAX header / sparse map into memory whole: a few
        # hundred KB of gzip could claim gigabytes. Go's archive/tar stops at 1 MiB.
        daemon, server = _fm_daemon(panel, make_daemon, disk_mb=64)
        huge = 8 << 20
        long_name = _tar_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, huge)
        sparse_map = _tar_header(
            "s",
            tarfile.REGTYPE,
            0,
            {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1"},
        )
        bombs = {
            "name.tar.gz": _gz(long_name, b"a" + bytes(huge - 1), _tar_file("x", b"x"), _TAR_END),
            "pax.tar.gz": _gz(
                _tar_header("p", tarfile.XGLTYPE, huge), bytes(huge), _tar_file("x", b"x")
            ),
            "sparse.tar.gz": _gz(sparse_map, b"%d\n" % huge, b"1\n" * (huge // 2), _TAR_END),
        }
        for name, data in bombs.items():
            assert len(data) < huge // 50  # the point: tiny on the wire
            status, answer, before = _decompress(daemon, server, name, data)
            assert status == 400, (name, status, answer)
            assert "header is larger than 1048576 bytes" in answer["error"]
            assert tree_snapshot(server.fs.root) == before

    def test_a_chain_of_thousands_of_long_name_headers_is_a_clear_refusal(self, panel, make_daemon):
        # tarfile recurses once per extended header: 2,000 of them were a RecursionError (500).
        daemon, server = _fm_daemon(panel, make_daemon)
        one = _tar_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 2) + b"a" + bytes(511)
        data = _gz(one * 2000, _tar_file("x", b"x"), _TAR_END)
        status, answer, before = _decompress(daemon, server, "chain.tar.gz", data)
        assert status == 400, answer
        assert "more than 16 extended headers" in answer["error"]
        assert tree_snapshot(server.fs.root) == before

    def test_a_pax_mtime_the_kernel_cannot_hold_does_not_fail_the_archive(self, panel, make_daemon):
        # PAX mtime is any decimal; "inf" was an OverflowError (500), "nan" a ValueError that
        # came out as "the path is not valid".
        daemon, server = _fm_daemon(panel, make_daemon)
        for i, when in enumerate(("inf", "nan", "-1e30")):
            data = _gz(_tar_file(f"f{i}.txt", b"kept", {"mtime": when}), _TAR_END)
            status, answer, _ = _decompress(daemon, server, f"t{i}.tar.gz", data)
            assert status == 204, (when, answer)
            assert (server.fs.root / f"f{i}.txt").read_bytes() == b"kept"

    @staticmethod
    def _rewrite_configs(tmp_path, files: dict, configs: list) -> tuple[list, list, dict]:
        """Egg config files rewritten as before a start, under a watchdog: (failed, said, after)."""
        root = tmp_path / "srv"
        root.mkdir()
        for name, text in files.items():
            (root / name).write_text(text)
        fs = w.Filesystem(root, limit_bytes=64 << 20)
        fs.recalculate()
        said: list[str] = []
        placeholders = w.NodePlaceholders(w.Config(node_config(tmp_path, "http://127.0.0.1:1")))
        result: list = []

        def rewrite() -> None:
            with w.Jail(root) as jail:
                writer = w.ConfigFileWriter(jail, placeholders, fs)
                result.append(writer.apply(configs, said.append))

        worker = threading.Thread(target=rewrite, daemon=True)
        worker.start()
        worker.join(120)  # a watchdog, not a timing claim: the old code ran for hours
        assert result, "the config files were still being rewritten after 120 s"
        return result[0], said, {n: (root / n).read_text() for n in files}

    def test_config_files_nested_too_deeply_are_skipped_with_a_clear_message(self, tmp_path):
        # json, yaml and xml parsers recurse once per level; a RecursionError escaped the writer.
        files = {
            "deep.json": "[" * 100_000 + "]" * 100_000,
            "deep.yml": "a: " + "[" * 100_000 + "]" * 100_000 + "\n",
            "deep.xml": "<a>" * 100_000 + "</a>" * 100_000,
            # block style: libyaml's C loader dies of SIGSEGV on this (the daemon with it)
            "dashes.yml": "- " * 100_000 + "x\n",
        }
        configs = [
            w.ConfigFile(name, name.rsplit(".", 1)[1].replace("yml", "yaml"), (r,))
            for name, r in zip(
                files,
                (
                    w.Replacement("a", "1"),
                    w.Replacement("a", "1"),
                    w.Replacement("a.b", "1"),
                    w.Replacement("a", "1"),
                ),
                strict=True,
            )
        ]
        failed, said, after = self._rewrite_configs(tmp_path, files, configs)
        assert failed == list(files)
        for name, line in zip(files, said, strict=True):
            assert line.startswith(f"Failed to update configuration file {name}: cannot be parsed")
            assert line.endswith("it is nested too deeply")
        assert after == files

    def test_a_yaml_config_over_its_cap_is_skipped_unread(self, tmp_path):
        # The safe loader costs ~10 s per MiB; a yaml file is read only up to YAML_MAX_BYTES.
        big = "k: v\n" * (w.YAML_MAX_BYTES // 5 + 1)
        files = {"big.yml": big}
        configs = [w.ConfigFile("big.yml", "yaml", (w.Replacement("k", "x"),))]
        failed, said, after = self._rewrite_configs(tmp_path, files, configs)
        assert failed == ["big.yml"]
        assert said == ["Failed to update configuration file big.yml: it is larger than 1 MiB"]
        assert after == files

    def test_a_yaml_alias_bomb_is_refused_not_expanded(self, tmp_path):
        # safe_load shares aliased nodes, so this loads at once; the in-place edit then compared
        # 9**12 nodes. go-yaml refuses "excessive aliasing" likewise.
        levels = [f"l0: &l0 [{', '.join(['x'] * 9)}]"]
        for n in range(1, 13):
            levels.append(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]")
        bomb = "\n".join(levels) + "\nport: 25565\n"
        cycle = "a: &a\n  b: *a\nport: 25565\n"
        files = {"bomb.yml": bomb, "cycle.yml": cycle, "fine.yml": "x: &x [1, 2]\ny: *x\nport: 1\n"}
        configs = [w.ConfigFile(n, "yaml", (w.Replacement("port", "2"),)) for n in files]
        failed, said, after = self._rewrite_configs(tmp_path, files, configs)
        assert failed == ["bomb.yml", "cycle.yml"]
        assert "aliases expand to more than 1000000 nodes" in said[0]
        assert "an alias refers to a node that encloses it" in said[1]
        assert after["bomb.yml"] == bomb and after["cycle.yml"] == cycle
        assert after["fine.yml"] == "x: &x [1, 2]\ny: *x\nport: 2\n"  # modest aliases still work

    def test_half_a_million_properties_continuation_lines_are_read_in_linear_time(self, tmp_path):
        # Each continuation line was added to one growing string: 4 MiB of them ran for hours.
        text = "motd=a\\\n" * 500_000 + "end\nserver-port=1\n"
        configs = [
            w.ConfigFile("server.properties", "properties", (w.Replacement("server-port", "2"),))
        ]
        failed, said, after = self._rewrite_configs(tmp_path, {"server.properties": text}, configs)
        assert failed == [] and said == []
        assert after["server.properties"] == text.replace("server-port=1", "server-port=2")

    def test_a_token_of_another_kind_cannot_upload(self, panel, make_daemon):
        # Every Panel token is signed with the node key and has server_uuid and unique_id; an
        # upload token has nothing else. A download, backup or websocket token (a user without
        # file.create) was accepted at /upload/file, as in Wings v1.11.
        daemon, server = _fm_daemon(panel, make_daemon)
        others = {
            "file download": {"file_path": "/server.properties"},
            "backup download": {"backup_uuid": str(uuidlib.uuid4())},
            "websocket": {"permissions": ["websocket.connect"]},
        }
        for kind, claims in others.items():
            status, _, raw = upload(daemon, signed_token(server.uuid, **claims), {"x.jar": b"!"})
            assert status == 403, (kind, status, raw)
            assert "is not a file-upload token" in json.loads(raw)["error"]
        assert not (server.fs.root / "x.jar").exists()
        download_token = signed_token(server.uuid, backup_uuid="b", file_path="/x")
        status, _, _ = http_raw(
            daemon.port, "GET", f"/download/file?token={download_token}", token=None
        )
        assert status == 403
        status, _, _ = upload(daemon, signed_token(server.uuid), {"x.jar": b"!"})
        assert status == 200 and (server.fs.root / "x.jar").read_bytes() == b"!"
        scoped = signed_token(server.uuid, scope="file-upload", permissions=["file.create"])
        assert upload(daemon, scoped, {"y.jar": b"!"})[0] == 200  # a newer Panel's scope decides

    def test_an_upload_of_thousands_of_parts_holds_one_fd_at_a_time(self, panel, make_daemon):
        # Every staged part kept its fd open to the end of the form: one request of more parts
        # than the fd limit failed with EMFILE (500), for every server of the daemon meanwhile.
        daemon, server = _fm_daemon(panel, make_daemon)
        files = {f"f{i:04}.txt": b"%d" % i for i in range(1500)}
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            status, _, raw = upload(daemon, signed_token(server.uuid), files, "/many")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert status == 200, raw
        assert sorted(p.name for p in (server.fs.root / "many").iterdir()) == sorted(files)
        assert (server.fs.root / "many" / "f1499.txt").read_bytes() == b"1499"

    def test_a_backup_ignore_rule_of_many_stars_matches_in_linear_time(self, console_node):
        # Both the backup's ignore and .pteroignore are the user's. As a backtracking regex,
        # "*a*a...*b" against a long name of "a"s ran for hours (Wings uses RE2: linear).
        daemon = console_node()
        root = daemon.config.data_dir / daemon.uuid
        root.mkdir(parents=True, exist_ok=True)
        (root / ("a" * 200)).write_bytes(b"kept")
        (root / ("a" * 199 + "b")).write_bytes(b"left out")
        (root / "x.tmp").write_bytes(b"left out")
        ignore = "*a" * 12 + "b\n*.tmp\n[z-a]\n"  # an empty range matches nothing, as in git
        report = TestBackups.backup(daemon, daemon.uuid, ignore=ignore)
        assert report["successful"] is True, report
        status, data = download(daemon, backup_token(daemon.uuid, report["uuid"]))
        assert status == 200
        assert tar_names(data) == {"a" * 200}

    def test_parallel_rewrites_of_one_file_do_not_forget_the_servers_usage(
        self, panel, make_daemon
    ):
        # Each staged rewrite credited the old file's bytes up front: ten at once credited them
        # ten times, the figure fell to zero, and the server could then write its whole limit
        # again on top of what it had -- over and over.
        daemon, server = _fm_daemon(panel, make_daemon, disk_mb=2)
        root = server.fs.root
        (root / "world.dat").write_bytes(bytes(1536 * 1024))
        (root / "big.dat").write_bytes(bytes(256 * 1024))
        server.fs.recalculate()
        socks = []
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
            sock.sendall(
                f"POST {fm_path(server, 'write', file='big.dat')} HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            socks.append(sock)
        wait_for(
            lambda: len(list(root.glob(".wingslite-*.part"))) == 10,
            what="ten rewrites staged at once",
        )
        for sock in socks:
            sock.sendall(b"x")
            assert sock.makefile("rb").readline().split()[1] == b"204"
            sock.close()
        assert (root / "big.dat").read_bytes() == b"x"
        status, _, _ = fm_write(daemon, server, "more.dat", bytes(1024 * 1024))
        assert status == 400  # 1.5 MiB + 1 MiB is past the 2 MiB limit
        assert not (root / "more.dat").exists()
        assert server.fs.usage_bytes() == server.fs.recalculate()

    def test_decompress_through_a_symlinked_directory_still_honours_the_denylist(
        self, panel, make_daemon
    ):
        # The staged entries were checked against the egg's denylist by the path as written
        # ("/ln/server.jar"), but renamed through the link to "/config/server.jar".
        daemon, server = _fm_daemon(panel, make_daemon, denylist=["config/server.jar"])
        root = server.fs.root
        (root / "config").mkdir()
        (root / "config" / "server.jar").write_bytes(b"the egg's own")
        (root / "ln").symlink_to("config")
        (root / "config" / "x.tar.gz").write_bytes(
            _gz(_tar_file("a.txt", b"fine"), _tar_file("server.jar", b"the user's"), _TAR_END)
        )
        before = tree_snapshot(root)
        status, _, answer = api(
            daemon, "POST", fm_path(server, "decompress"), {"root": "/ln", "file": "x.tar.gz"}
        )
        assert status == 403, answer
        assert answer["error"] == w.FM_DENYLIST
        assert tree_snapshot(root) == before

    def test_a_pull_to_an_internal_address_never_connects_to_it(self, panel, make_daemon):
        # The address was checked after connect(): an open internal port answered "internal
        # address", a closed one "connection refused" -- a port scanner for any user.
        daemon, server = _fm_daemon(panel, make_daemon)
        listener = socket.create_server(("127.0.0.1", 0))
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        answers = []
        try:
            for port in (listener.getsockname()[1], closed_port):
                body = {"url": f"http://127.0.0.1:{port}/x", "root": "/", "foreground": True}
                status, _, answer = api(daemon, "POST", fm_path(server, "pull"), body)
                answers.append((status, answer["error"]))
            listener.settimeout(0.5)
            with pytest.raises(TimeoutError):
                listener.accept()[0].close()  # nothing ever connected to it
        finally:
            listener.close()
        assert answers[0] == answers[1]
        assert answers[0][0] == 400 and "internal address (127.0.0.1)" in answers[0][1]

    def test_an_archive_name_past_path_max_is_refused(self, panel, make_daemon):
        # A PAX path may be a megabyte: "a/" * 3000 was a tree 3,000 levels deep (Wings makes
        # directories by full path and fails past PATH_MAX).
        daemon, server = _fm_daemon(panel, make_daemon)
        data = _gz(_tar_file("a/" * 3000 + "f", b"deep"), _TAR_END)
        status, answer, before = _decompress(daemon, server, "deep.tar.gz", data)
        assert status == 400, answer
        assert "name is longer than 4096 bytes" in answer["error"]
        assert tree_snapshot(server.fs.root) == before

    def test_an_xz_archive_that_asks_for_gigabytes_of_dictionary_is_refused(
        self, panel, make_daemon
    ):
        # The decoder allocates the dictionary the header names (up to 4 GiB) and fills it as
        # data passes; a tar member the extractor skips passes without touching the disk
        # limit: 80 KB of xz held 512 MiB. A normal archive (xz -9: 64 MiB) still extracts.
        daemon, server = _fm_daemon(panel, make_daemon)
        tar = _tar_file("f.txt", b"xz") + _TAR_END
        for dict_byte, name, expected in ((0x10, "ok.tar.xz", 204), (39, "big.tar.xz", 400)):
            xz = bytearray(
                lzma.compress(
                    tar,
                    format=lzma.FORMAT_XZ,
                    filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}],
                )
            )
            xz[16] = dict_byte  # the block header's LZMA2 dictionary size: 39 is 3 GiB
            xz[20:24] = zlib.crc32(bytes(xz[12:20])).to_bytes(4, "little")
            status, answer, _ = _decompress(daemon, server, name, bytes(xz))
            assert status == expected, (name, answer)
        assert "needs more than 256 MiB of memory" in answer["error"]
        assert (server.fs.root / "f.txt").read_bytes() == b"xz"

    def test_a_peer_sending_a_zip_stream_cannot_fill_the_hosts_temporary_directory(
        self, make_daemon, tmp_path
    ):
        # A zip's directory is at its end, so a zip that arrives as a stream is spooled to a
        # temporary file first -- without any bound: a transfer peer could fill the host's /tmp.
        dst_panel = TransferPanel()
        doc = panel_document(build__disk_space=1)  # 1 MiB
        dst_panel.add(doc)
        uuid = doc["settings"]["uuid"]
        dst_panel.unlisted.add(uuid)
        destination = make_daemon(dst_panel, token_id=DST_TOKEN_ID, token=DST_TOKEN)
        dst_panel.transfers[uuid] = None
        try:
            archive = b"PK\x03\x04" + bytes(4 << 20)
            status, body = send_archive(
                destination,
                "Bearer " + transfer_token(uuid),
                [("archive", archive), ("checksum", hashlib.sha256(archive).hexdigest().encode())],
            )
        finally:
            dst_panel.close()
        assert status == 400, body
        assert "larger than the server's free disk space" in body["error"]
        assert dst_panel.transfers[uuid] is False


# fault drills #####################################################################################


class _DrillLog(logging.Handler):
    """Collects every wingslite log record that carries a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.tracebacks: list[str] = []

    def emit(self, record):
        if record.exc_info:
            self.tracebacks.append(self.format(record))


@contextlib.contextmanager
def _no_tracebacks_logged():
    handler = _DrillLog()
    w.LOG.addHandler(handler)
    try:
        yield handler
    finally:
        w.LOG.removeHandler(handler)
    assert not handler.tracebacks, (
        f"{len(handler.tracebacks)} traceback(s) logged; the first:\n{handler.tracebacks[0]}"
    )


def _handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def _bare_daemon(tmp_path: Path, panel: FakePanel, **overrides) -> w.Daemon:
    """A daemon whose servers have no process (never Docker): for drills that send arbitrary
    requests."""
    config = w.Config(node_config(tmp_path, panel.url, **overrides), "drill")
    daemon = w.Daemon(
        config, environment_factory=lambda server: w.Environment(server.uuid, server.events)
    )
    daemon.start()
    assert daemon.wait_booted(10)
    return daemon


def _streaming_route(panel: FakePanel, path: str, answer):
    """Make ``panel`` answer ``GET path`` with ``answer(handler)``; other paths as before."""
    original = panel.route

    def route(h, req):
        if req.path == path:
            return answer(h)
        return original(h, req)

    panel.route = route


# Generated HTTP requests -------------------------------------------------------------------

_DRILL_UUID = "8d2b8c7e-4f3a-4b1d-9c6e-0a1b2c3d4e5f"
_PATHS = (
    "/api/system",
    "/api/system?v=2",
    "/api/servers",
    "/api/servers/{s}",
    "/api/servers/{s}/sync",
    "/api/servers/{s}/power",
    "/api/servers/{s}/commands",
    "/api/servers/{s}/logs?size={x}",
    "/api/servers/{s}/ws",
    "/api/servers/{s}/ws/deny",
    "/api/deauthorize-user",
    "/{x}",
    "/api/{x}/{s}",
)
_HEADER_NAMES = (
    "Content-Type",
    "Content-Length",
    "Transfer-Encoding",
    "Origin",
    "Connection",
    "Expect",
    "Upgrade",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Accept-Encoding",
    "X-Real-IP",
    "Host",
)
_TEXT = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"), max_size=40
)
_TOKEN_CHARS = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()%"),
    max_size=24,
)


def _json_containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4)


# ``extend`` is a partial, not a lambda: Hypothesis checks that it uses its argument by reading
# this file's source again at the function's line number, so a file that changed on disk after
# the import hands it some other line and a HypothesisDeprecationWarning. A partial has no source.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _TEXT,
    functools.partial(_json_containers),
    max_leaves=12,
)
_BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "action": st.sampled_from(["stop", "kill", "explode", ""])
            | _JSON,  # never "start": nothing may run here
            "wait_seconds": _JSON,
            "commands": _JSON,
            "jtis": _JSON,
            "user": _JSON,
            "servers": _JSON,
            "uuid": st.sampled_from([_DRILL_UUID, str(uuidlib.uuid4())]) | _JSON,
            "start_on_completion": _JSON,
        },
    ).map(lambda v: json.dumps(v).encode()),
)


@st.composite
def _http_request_parts(draw):
    """One generated request as parts: (method, path, version, headers, body, content-length
    mode)."""
    method = draw(
        st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
        | _TOKEN_CHARS.filter(bool)
    )
    segment = draw(
        st.sampled_from([_DRILL_UUID, _DRILL_UUID[:8], ""])
        | _TOKEN_CHARS
        | _TEXT.map(urllib.parse.quote)
    )
    path = draw(st.sampled_from(_PATHS)).format(s=segment, x=draw(_TOKEN_CHARS))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x"]))
    body = draw(_BODIES)
    headers = draw(
        st.lists(
            st.tuples(st.sampled_from(_HEADER_NAMES) | _TOKEN_CHARS.filter(bool), _TEXT), max_size=4
        )
    )
    auth = draw(
        st.sampled_from(
            [
                f"Bearer {TOKEN}",
                f"Bearer {TOKEN}",
                "Bearer wrong",
                f"bearer {TOKEN}",
                "Basic eDp5",
                "Bearer ",
                None,
            ]
        )
    )
    if auth is not None:
        headers.append(("Authorization", auth))
    length = draw(
        st.sampled_from(["exact", "exact", "none", "short", "long", "text", "negative", "huge"])
    )
    return method, path, version, headers, body, length


def _assemble_request(method, path, version, headers, body, length) -> tuple[bytes, bool]:
    """The request's bytes, and whether the server can know where it ends (so the connection may
    be reused)."""
    value = {
        "exact": str(len(body)),
        "short": str(max(0, len(body) - 1)),
        "long": str(len(body) + 7),
        "text": "ten",
        "negative": "-1",
        "huge": str(2**62),
    }.get(length)
    all_headers = (
        [("Host", "127.0.0.1")]
        + headers
        + ([("Content-Length", value)] if value is not None else [])
    )
    head = (
        f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers) + "\r\n"
    )
    framed = length == "exact" or (length == "none" and not body)
    in_step = framed and not any(
        k.lower() in ("content-length", "transfer-encoding") for k, _ in headers
    )
    return head.encode("latin-1") + body, in_step


@st.composite
def _http_request_batches(draw, size: int = 40):
    """``size`` requests: 8 drawn whole, the rest recombined from their parts (drawing each costs
    ~6 ms)."""
    parts = draw(st.lists(_http_request_parts(), min_size=8, max_size=8))
    rnd = draw(st.randoms(use_true_random=False))
    batch = [_assemble_request(*p) for p in parts]
    while len(batch) < size:
        batch.append(_assemble_request(*(rnd.choice(parts)[i] for i in range(6))))
    return batch


def _exchange(port: int, raw: bytes, in_step: bool) -> None:
    """Send one generated request; check the answer; on a kept-alive connection check it stays in
    step."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        if not in_step:
            sock.shutdown(socket.SHUT_WR)  # a body that never comes must not hold a thread forever
        resp = http.client.HTTPResponse(sock, method="HEAD" if raw.startswith(b"HEAD ") else "GET")
        resp.begin()
        body = resp.read()
        # 502 is Wings' answer to a command for a stopped server; any other 5xx would be a fault.
        expected_502 = (
            resp.status == 502 and b"Cannot send commands to a stopped server instance." in body
        )
        assert 200 <= resp.status < 600 and (resp.status not in (500, 502, 503) or expected_502), (
            resp.status,
            body,
            raw[:300],
        )
        assert b"Traceback" not in body and b"<html" not in body.lower(), body
        if body:
            parsed = json.loads(body)
            if resp.status >= 400:
                assert (
                    isinstance(parsed, dict)
                    and isinstance(parsed.get("error"), str)
                    and parsed["error"]
                ), parsed
        if in_step and not resp.will_close:
            sock.sendall(
                (
                    f"GET /api/system HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                ).encode()
            )
            follow = http.client.HTTPResponse(sock, method="GET")
            follow.begin()
            assert follow.status == 200 and json.loads(follow.read())["version"] == w.VERSION, raw[
                :300
            ]


# Generated Panel documents -----------------------------------------------------------------


def _nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


_DOC_PATHS = (
    ("settings",),
    ("settings", "uuid"),
    ("settings", "suspended"),
    ("settings", "environment"),
    ("settings", "environment", "SERVER_JARFILE"),
    ("settings", "invocation"),
    ("settings", "build"),
    ("settings", "build", "memory_limit"),
    ("settings", "build", "swap"),
    ("settings", "build", "io_weight"),
    ("settings", "build", "cpu_limit"),
    ("settings", "build", "threads"),
    ("settings", "build", "disk_space"),
    ("settings", "build", "oom_disabled"),
    ("settings", "container"),
    ("settings", "container", "image"),
    ("settings", "allocations"),
    ("settings", "allocations", "default"),
    ("settings", "allocations", "default", "port"),
    ("settings", "allocations", "mappings"),
    ("settings", "mounts"),
    ("settings", "egg"),
    ("settings", "egg", "file_denylist"),
    ("settings", "labels"),
    ("settings", "meta"),
    ("settings", "crash_detection_enabled"),
    ("process_configuration",),
    ("process_configuration", "startup"),
    ("process_configuration", "startup", "done"),
    ("process_configuration", "stop"),
    ("process_configuration", "stop", "type"),
    ("process_configuration", "configs"),
)
_DOC_VALUES = st.one_of(
    _JSON,
    st.integers(-(2**64), 2**64),
    st.floats(),  # NaN and infinities too: Python's json module reads them
    st.sampled_from(
        ["0-1,4", "4-1", "99999", "", " ", "a", "\x00", "[]", 0.5, -0.5, 1e300, [], {}]
    ),
    st.integers(1, 990).map(_nested_lists),  # deeper than ~990 never gets past json.loads
)


@st.composite
def _panel_documents(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON)
    doc = panel_document(_DRILL_UUID)
    for _ in range(draw(st.integers(1, 4))):
        *parents, last = draw(st.sampled_from(_DOC_PATHS))
        node = doc
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if draw(st.booleans()) and last in node:
            del node[last]
        else:
            node[last] = copy.deepcopy(
                draw(_DOC_VALUES)
            )  # sampled [] and {} are shared objects: never mutate them
    return doc


# Generated websocket frames ----------------------------------------------------------------

_WS_EVENTS = ("auth", "send logs", "send stats", "send command", "set state", "", "x" * 70)
_WS_TEXT = st.one_of(
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(_WS_EVENTS) | _TEXT,
            "args": st.lists(_TEXT | st.none(), max_size=2) | _JSON,
        }
    ).map(lambda m: json.dumps(m).encode()),
    _TEXT.map(lambda t: t.encode()),
    st.sampled_from(
        [b"\xff", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b'{"event":"\xe2']
    ),  # invalid or cut UTF-8
)
_WS_PAYLOADS = st.one_of(
    _WS_TEXT,
    st.binary(max_size=200),
    st.integers(0, 5000).map(lambda n: b"a" * n),  # around the 4,096-byte frame limit
    st.tuples(st.integers(0, 5100), st.text(max_size=20)).map(
        lambda c: c[0].to_bytes(2, "big") + c[1].encode()
    ),  # close payloads
)
# A length the header declares instead of the payload's own (the bytes sent stay the payload's).
_WS_LYING_LENGTHS = st.sampled_from(
    [4096, 4097, 65535, 65536, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
) | st.integers(0, 300)


def _ws_header(b0: int, mask: bool, length: int, form: str) -> bytes:
    """A frame header with ``length`` in the minimal form, or forced into the 16- or 64-bit form."""
    bit = 0x80 if mask else 0
    if form == "7" and length < 126:
        return bytes((b0, bit | length))
    if form in ("7", "16") and length < 65536:
        return bytes((b0, bit | 126)) + length.to_bytes(2, "big")
    return bytes((b0, bit | 127)) + length.to_bytes(8, "big")


@st.composite
def _ws_streams(draw):
    """Bytes for a client to send after the handshake; whether they end on a frame boundary the
    server can know (no lying length, no garbage: only then can a ping probe follow them); and the
    codes of the close frames among them (None: a close without a code), which the server may
    echo."""
    chunks: list[bytes] = []
    codes: set[int | None] = set()

    def frame(
        b0: int, payload: bytes, mask: bool = True, length: int | None = None, form: str = "7"
    ) -> None:
        key = draw(st.binary(min_size=4, max_size=4))
        body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if mask else payload
        chunks.append(
            _ws_header(b0, mask, len(payload) if length is None else length, form)
            + (key if mask else b"")
            + body
        )

    # well-framed: messages cut into fragments, pings between them; the payloads may still be bad
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            opcode = draw(st.sampled_from([0x1, 0x1, 0x2]))
            payload = draw(_WS_TEXT if opcode == 0x1 else _WS_PAYLOADS)
            cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=2)))
            parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
            for i, part in enumerate(parts):
                frame(
                    (0x80 if i == len(parts) - 1 else 0) | (opcode if i == 0 else 0x0),
                    part,
                    form=draw(st.sampled_from(["7", "7", "16", "64"])),
                )
                if draw(st.integers(0, 3)) == 0:
                    frame(0x80 | 0x9, draw(st.binary(max_size=125)))
        return b"".join(chunks), True, codes
    # Hostile: anything goes, each fault drawn now and then.
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["frame"] * 14 + ["lie", "garbage"]))
        if kind == "garbage":
            chunks.append(draw(st.binary(min_size=1, max_size=64)))
            return b"".join(chunks), False, codes
        opcode = draw(
            st.sampled_from(
                [0x1] * 5 + [0x2] * 2 + [0x0] * 3 + [0x9] * 2 + [0xA, 0x8, 0x3, 0x7, 0xB, 0xF]
            )
        )
        fin = draw(st.sampled_from([True, True, True, False]))
        rsv = draw(st.sampled_from([0] * 15 + [0x10, 0x20, 0x40]))
        mask = draw(st.sampled_from([True] * 15 + [False]))
        payload = draw(
            _WS_TEXT if opcode in (0x0, 0x1) and draw(st.integers(0, 3)) else _WS_PAYLOADS
        )
        if opcode >= 0x8 and draw(st.integers(0, 3)):
            payload = payload[:125]  # mostly legal control frames, sometimes too long ones
        length = draw(_WS_LYING_LENGTHS) if kind == "lie" else len(payload)
        frame(
            (0x80 if fin else 0) | rsv | opcode,
            payload,
            mask,
            length,
            draw(st.sampled_from(["7", "7", "7", "16", "64"])),
        )
        if opcode == 0x8:
            codes.add(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None)
        if kind == "lie" and length != len(payload):
            return b"".join(chunks), False, codes
    return b"".join(chunks), True, codes


def _ws_outcome(raw: RawWebsocket, probe: bytes | None, timeout_s: float) -> tuple[str, int | None]:
    """Read server frames until a close frame ("close", its code; None: no code), the pong that
    answers ``probe`` ("serving"), the end of the stream ("dropped") or ``timeout_s`` ("silent")."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            raw.sock.settimeout(max(0.001, deadline - time.monotonic()))
            opcode, payload = raw.frame()
            if opcode == 0x8:
                return "close", int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if opcode == 0xA and probe is not None and payload == probe:
                return "serving", None
    except TimeoutError:
        return "silent", None
    except (EOFError, ConnectionError):
        return "dropped", None


class TestFaultDrills:
    """Faults the node must survive: a failing, hanging or hostile Panel, SIGKILL, hostile clients.

    A Panel answering 500 and then recovering; a Panel that hangs (the retry budget holds, other
    servers sync meanwhile); a 256 MB or deeply nested Panel answer; SIGKILL in the middle of 100
    concurrent syncs (every saved configuration is the old or the new one); 10,000 generated HTTP
    requests; generated Panel documents; generated websocket frames. Nothing may log a traceback.
    """

    @pytest.mark.docker  # the daemon asks the engine
    def test_panel_answering_500_then_recovering(self, panel, make_daemon):
        uuids = [panel.add(panel_document()) for _ in range(6)]
        daemon = make_daemon(panel)  # remote_query.timeout: 3 s
        saved = {u: saved_document(daemon, u) for u in uuids}
        for u in uuids:
            panel.servers[u]["settings"]["build"]["memory_limit"] = 6000
        panel.down = True
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(uuids)) as pool:
            futures = [pool.submit(api, daemon, "POST", f"/api/servers/{u}/sync") for u in uuids]
            wait_for(lambda: len(panel.requests) > len(uuids), what="the syncs to reach the Panel")
            t0 = time.monotonic()
            assert (
                api(daemon, "GET", f"/api/servers/{uuids[0]}")[0] == 200
            )  # the API answers during the outage
            assert time.monotonic() - t0 < 1.0
            results = [f.result() for f in futures]
        assert time.monotonic() - started < 3 + 2, "the retry budget was not respected"
        for status, _, body in results:
            assert (
                status == 500
                and "HTTP 500" in body["error"]
                and "nothing on this node was changed" in body["error"]
            )
        assert {u: saved_document(daemon, u) for u in uuids} == saved
        assert all(daemon.servers[u].config.build.memory_mb == 4096 for u in uuids)
        panel.down = False
        with concurrent.futures.ThreadPoolExecutor(len(uuids)) as pool:
            statuses = list(
                pool.map(lambda u: api(daemon, "POST", f"/api/servers/{u}/sync")[0], uuids)
            )
        assert statuses == [204] * len(uuids)
        assert all(
            saved_document(daemon, u)["settings"]["build"]["memory_limit"] == 6000 for u in uuids
        )

    @pytest.mark.docker  # the daemon asks the engine
    def test_a_hanging_panel_respects_the_budget_and_other_servers_sync_meanwhile(
        self, panel, make_daemon
    ):
        stuck = panel.add(panel_document())
        others = [panel.add(panel_document()) for _ in range(5)]
        daemon = make_daemon(panel)  # remote_query.timeout: 3 s
        path = f"/api/remote/servers/{stuck}"
        panel.hang_s[path] = 8
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            future = pool.submit(api, daemon, "POST", f"/api/servers/{stuck}/sync")
            wait_for(lambda: panel.calls.get(path), what="the stuck sync to reach the Panel")
            for uuid in others:
                panel.servers[uuid]["settings"]["build"]["disk_space"] = 321
                t0 = time.monotonic()
                assert api(daemon, "POST", f"/api/servers/{uuid}/sync")[0] == 204
                assert time.monotonic() - t0 < 1.0, (
                    "another server's sync waited for the hanging one"
                )
                assert daemon.servers[uuid].fs.limit_bytes == 321 * 1_048_576
            status, _, body = future.result(timeout=15)
            elapsed = time.monotonic() - started
        assert (
            status == 500
            and "did not answer" in body["error"]
            and "nothing on this node was changed" in body["error"]
        ), body
        assert 2.5 < elapsed < 3 + 1.5, f"the stuck sync took {elapsed:.1f}s for a 3 s budget"
        assert daemon.servers[stuck].config.build.disk_mb == 20480

    def test_a_huge_panel_answer_is_read_only_up_to_the_limit_and_is_a_clear_500(
        self, panel, make_daemon
    ):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel, wingslite__max_panel_document_bytes=1 << 20)
        sent = []

        def endless(h):  # 256 MB, made up as it is sent: the daemon must stop reading at its limit
            total = 256 << 20
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(total))
            h.end_headers()
            chunk = b"[" * 65536
            written = 0
            try:
                while written < total:
                    h.wfile.write(chunk)
                    written += len(chunk)
            except OSError:
                pass
            sent.append(written)
            h.close_connection = True

        _streaming_route(panel, f"/api/remote/servers/{uuid}", endless)
        before = saved_document(daemon, uuid)
        status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert status == 500 and "larger than 1048576 bytes" in body["error"], body
        wait_for(lambda: sent, what="the Panel to notice the daemon hung up")
        assert sent[0] < 48 << 20, f"the daemon read {sent[0]} bytes of a 256 MB answer"
        assert saved_document(daemon, uuid) == before
        assert api(daemon, "GET", "/api/system")[0] == 200

    @pytest.mark.parametrize(
        "depth, says", [(600, "nested deeper than 64 levels"), (200_000, "not valid JSON")]
    )
    def test_a_deeply_nested_panel_document_is_a_clear_500(self, panel, make_daemon, depth, says):
        uuid = panel.add(panel_document())
        daemon = make_daemon(panel)
        text = (
            json.dumps(panel_document(uuid))[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        )

        def deep(h):
            data = text.encode()
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)

        _streaming_route(panel, f"/api/remote/servers/{uuid}", deep)
        with _no_tracebacks_logged():
            status, _, body = api(daemon, "POST", f"/api/servers/{uuid}/sync")
        assert (
            status == 500
            and says in body["error"]
            and "nothing on this node was changed" in body["error"]
        ), body

    def test_a_deeply_nested_document_in_the_boot_list_skips_only_that_server(
        self, panel, make_daemon
    ):
        good = panel.add(panel_document())
        bad = panel.add(panel_document())
        panel.servers[bad]["settings"]["labels"] = json.loads("[" * 600 + "]" * 600)
        daemon = make_daemon(panel)
        assert good in daemon.servers and bad not in daemon.servers

    def test_sigkill_during_100_concurrent_syncs_leaves_old_or_new_configurations(
        self, panel, tmp_path
    ):
        uuids = [panel.add(panel_document()) for _ in range(100)]
        raw = node_config(tmp_path, panel.url, remote_query__timeout=5)
        port = raw["api"]["port"] = free_port()
        config_path = tmp_path / "config.yml"
        config_path.write_text(yaml.safe_dump(raw))
        store = tmp_path / "root" / "wingslite" / "servers"

        def start():
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "wingslite.py"), "--config", str(config_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(lambda: _answers(port), what="the daemon to answer")
            wait_for(
                lambda: api(port, "GET", "/api/system")[2]["wingslite"]["booted"],
                what="the daemon to boot",
            )
            return proc

        def sync(uuid):
            with contextlib.suppress(OSError, http.client.HTTPException):
                return api(port, "POST", f"/api/servers/{uuid}/sync")[0]

        old = 4096
        proc = start()
        try:
            for round_no, threshold in enumerate((10, 40, 70), start=1):
                new = 5000 + round_no
                for uuid in uuids:
                    panel.servers[uuid]["settings"]["build"]["memory_limit"] = new
                fetched = sum(panel.calls.get(f"/api/remote/servers/{u}", 0) for u in uuids)
                with concurrent.futures.ThreadPoolExecutor(100) as pool:
                    futures = [pool.submit(sync, u) for u in uuids]
                    wait_for(
                        lambda fetched=fetched, threshold=threshold: (
                            sum(panel.calls.get(f"/api/remote/servers/{u}", 0) for u in uuids)
                            - fetched
                            >= threshold
                        ),
                        what=f"{threshold} syncs to reach the Panel",
                    )
                    proc.kill()
                    proc.wait(10)
                    statuses = [f.result() for f in futures]
                values = {}
                for uuid in uuids:
                    document = json.loads((store / f"{uuid}.json").read_bytes())
                    w.parse_server_document(document, expect_uuid=uuid)
                    values[uuid] = document["settings"]["build"]["memory_limit"]
                assert set(values.values()) <= {old, new}, (
                    f"round {round_no}: {set(values.values())}"
                )
                assert all(
                    values[u] == new for u, s in zip(uuids, statuses, strict=True) if s == 204
                ), "a 204 was answered before the write"
                proc = start()  # the boot brings every server to the Panel's state
                _, _, servers = api(port, "GET", "/api/servers")
                assert len(servers) == 100 and {
                    s["configuration"]["build"]["memory_limit"] for s in servers
                } == {new}
                assert all(
                    json.loads((store / f"{u}.json").read_bytes())["settings"]["build"][
                        "memory_limit"
                    ]
                    == new
                    for u in uuids
                )
                old = new
            assert api(port, "POST", f"/api/servers/{uuids[0]}/sync")[0] == 204
        finally:
            proc.kill()
            proc.wait(10)

    @pytest.mark.docker  # the daemon asks the engine
    def test_10000_generated_http_requests_get_clean_answers(self, panel, tmp_path):
        panel.add(panel_document(_DRILL_UUID))
        daemon = _bare_daemon(tmp_path, panel)
        baseline = _handler_threads()
        sent = [0]

        @settings(
            max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(_http_request_batches())
        def batch(requests):
            for raw, in_step in requests:
                _exchange(daemon.port, raw, in_step)
                sent[0] += 1

        try:
            with _no_tracebacks_logged():
                batch()
            assert sent[0] >= 10_000, f"only {sent[0]} requests were generated"
            wait_for(
                lambda: _handler_threads() <= baseline,
                timeout_s=10,
                what="every connection thread to finish",
            )
            assert api(daemon, "GET", "/api/system")[0] == 200
        finally:
            daemon.stop()

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_panel_documents())
    def test_generated_panel_documents_are_a_server_config_or_a_document_error(self, document):
        try:
            config = w.parse_server_document(document, expect_uuid=_DRILL_UUID)
        except w.DocumentError as exc:
            assert (
                exc.message.startswith("the Panel's server document is invalid: ")
                and exc.status == 500
            )
            return
        assert isinstance(config, w.ServerConfig) and config.uuid == _DRILL_UUID
        json.dumps(w.server_document_json(config))
        w.container_resources(config.build)
        w.container_environment(config)
        config.process.done_matchers()
        assert config.disk_limit_bytes >= 0

    def test_generated_websocket_frames_get_a_close_code_or_service_and_leave_no_thread(
        self, console_node, caplog
    ):
        """Real connections (``GET /api/servers/:server/ws``, the real handshake, authenticated
        or not) each get one of 300 generated streams: unknown opcodes, reserved bits, unmasked
        frames, 16- and 64-bit lengths that lie (up to 2^64 - 1), fragmented messages with pings
        between the fragments, invalid or cut UTF-8, control frames over 125 bytes, close frames
        with any code, raw garbage. Each stream ends in a close frame with an RFC 6455 code (1002,
        1007, 1009, or the client's own code echoed) or, when it is well framed, the daemon still
        answers a ping; nothing is logged as an error, the threads return to their number before
        the drill, and a normal console login works afterwards (~5 s)."""
        daemon = console_node(wingslite__websocket_max_per_server=1000)
        uuid = daemon.uuid
        baseline = threading.active_count()
        outcomes: dict[str, int] = {}

        @settings(
            max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(_ws_streams(), st.booleans())
        def exchange(stream, authenticate):
            data, clean, client_codes = stream
            raw = RawWebsocket(daemon, uuid)
            try:
                assert raw.status == 101
                if authenticate:  # so that text frames also reach the console protocol's handlers
                    raw.send_json({"event": "auth", "args": [ws_token(ws_claims(uuid))]})
                    while b"auth success" not in raw.frame()[1]:
                        pass
                probe = os.urandom(8)
                with contextlib.suppress(
                    OSError
                ):  # the server may have failed the connection already
                    raw.sock.sendall(data + (ws_frame(0x9, probe) if clean else b""))
                outcome, code = _ws_outcome(raw, probe if clean else None, 5.0 if clean else 0.1)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "close":
                    assert code in {1002, 1007, 1009} | client_codes, (code, data[:200])
                # never a hang on a stream the server can parse, never a drop without a close frame
                else:
                    assert outcome == ("serving" if clean else "silent"), (outcome, data[:200])
            finally:
                raw.close()

        with caplog.at_level(logging.DEBUG, logger="wingslite"):
            exchange()
            wait_for(
                lambda: daemon.sessions.count() == 0,
                10,
                what="every socket to leave the session table",
            )
            wait_for(
                lambda: threading.active_count() <= baseline + 2,
                10,
                what=f"the threads to return to {baseline} (+2)",
            )
        assert {"close", "serving"} <= set(outcomes), outcomes
        escaped = [
            r
            for r in caplog.records
            if r.name.startswith("wingslite") and (r.exc_info or r.levelno >= logging.ERROR)
        ]
        assert not escaped, f"{len(escaped)} error(s) logged; the first: {escaped[0].getMessage()}"
        conn, first = ws_authed(daemon, uuid)
        with conn:
            assert first[0] == ("auth success", [])


# fault drill: the Docker engine stopped and started again -- keep this LAST in the file ###########


DOCKERD_LOG = "/tmp/wingslite-dockerd.log"  # where .ci/run starts it
# The engine's shutdown sends each container SIGTERM and SIGKILLs it 10 s later; a console program
# that ends on SIGTERM (as a game server that saves and exits does) keeps the drill short.
TERM_STARTUP = 'trap "exit 0" TERM; ' + CONSOLE_STARTUP
# Stopping the engine breaks every Docker test running at the same moment, so outside CI (one run
# on its own machine) the drill runs only when asked for.
ENGINE_DRILL = (
    os.environ.get("CI", "").lower() in ("1", "true", "yes")
    or os.environ.get("WINGSLITE_ENGINE_DRILL") == "1"
)


def _engine_answers(timeout_s: float = 2) -> bool:
    import docker

    try:
        client = docker.APIClient(version="1.41", timeout=timeout_s)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _dockerd_pids() -> list[int]:
    return [
        int(pid)
        for pid in subprocess.run(
            ["pgrep", "-x", "dockerd"], capture_output=True, text=True
        ).stdout.split()
    ]


def _start_dockerd() -> None:
    """Start the engine exactly as .ci/run does, and wait until ``docker info`` answers."""
    pid_file = Path("/var/run/docker.pid")
    with contextlib.suppress(
        OSError, ValueError
    ):  # a dockerd that died leaves its pid file, and a new one refuses to start
        if not Path(f"/proc/{int(pid_file.read_text().strip())}").exists():
            pid_file.unlink()
    subprocess.run(
        ["bash", "-c", f"nohup dockerd >{DOCKERD_LOG} 2>&1 </dev/null &"],
        check=True,
        start_new_session=True,
    )
    wait_for(
        lambda: (
            subprocess.run(["timeout", "5", "docker", "info"], capture_output=True).returncode == 0
        ),
        60,
        what="dockerd to answer docker info",
        interval_s=0.2,
    )


def _restore_dockerd() -> None:
    if _engine_answers():
        return
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: not _dockerd_pids(), 30, what="the stopped dockerd to exit", interval_s=0.1
        )
    for pid in _dockerd_pids():  # still there after 30 s: it will not finish on its own
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    _start_dockerd()


@pytest.mark.docker
@pytest.mark.skipif(
    not ENGINE_DRILL,
    reason="stops the shared Docker engine: runs in CI, or with WINGSLITE_ENGINE_DRILL=1",
)
class TestFaultDrillDockerEngineRestart:
    """The Docker engine stopped (SIGTERM) and started again while syncs and GETs keep coming.

    Five threads keep sending syncs (each one changing the memory limit) and
    ``GET /api/servers/:server`` for three running servers while the shared engine is stopped;
    it is started again as .ci/run starts it (``nohup dockerd >/tmp/wingslite-dockerd.log 2>&1 &``,
    then ``docker info``), in a ``finally`` even when the test fails (~12 s). Asserted:

    - While the engine shuts down it no longer accepts connections but still serves the ones it
      has, and stops every container (live-restore is off, no restart policy): each server goes
      offline, which crash detection takes for a crash; its one restart fails on the engine
      ("Server crash was detected but an error occurred while handling it." on the console, an
      error in the log, no traceback). A sync in this window answers 204, or 500 when it races
      the container's exit.
    - Once dockerd has exited, every sync answers 500 at once: "the configuration of server ...
      was updated, but not all of it was applied: Docker engine unreachable while inspecting the
      container: ...". The new configuration is in force and saved, and ``resource limits`` is
      listed under ``wingslite.pending_next_start``. Every GET answers 200 throughout; no request
      takes 10 s.
    - When the engine is back, the containers are there, stopped, and the servers stay offline:
      nothing restarts them (the crash restart was spent while the engine was down). Syncs answer
      204 again (limits pending until the container is re-created), and the next start
      re-creates each container with the Panel's current limits.

    Keep this class the last one in the file: pytest runs tests in file order, and every Docker
    test before it needs the engine. It breaks any other Docker test running at the same moment
    on the same engine, so it runs in CI (``CI=true``) and elsewhere only with
    ``WINGSLITE_ENGINE_DRILL=1``.
    """

    def test_engine_stopped_and_started_under_load(self, docker_servers, caplog):
        import docker

        uuids = [docker_servers.add(startup=TERM_STARTUP, memory_mb=64) for _ in range(3)]
        panel = docker_servers.panel
        daemon = docker_servers.boot()
        for uuid in uuids:
            docker_servers.start(uuid)
        # up -> stopping (SIGTERM sent; the engine still serves connections it had, and stops the
        # containers) -> down (dockerd has exited) -> restarting -> back (docker info answers)
        phase = ["up"]
        calls: list[dict] = []
        sent: dict[str, list[tuple[str, int]]] = {
            u: [] for u in uuids
        }  # (phase, memory_limit) as each sync went out
        stop_load = threading.Event()

        def record(kind: str, uuid: str, call, **extra) -> None:
            began, t0 = phase[0], time.monotonic()
            status, _, body = call()
            seconds = time.monotonic() - t0
            calls.append(
                {
                    "kind": kind,
                    "uuid": uuid,
                    "phases": (began, phase[0]),
                    "status": status,
                    "body": body,
                    "s": seconds,
                    **extra,
                }
            )

        def syncs(uuid: str) -> None:
            n = 0
            while not stop_load.is_set():
                n += 1
                memory = 64 + n % 50 + 1  # a limit change with every sync
                panel.servers[uuid]["settings"]["build"]["memory_limit"] = memory
                sent[uuid].append((phase[0], memory))
                record(
                    "sync",
                    uuid,
                    lambda: api(daemon, "POST", f"/api/servers/{uuid}/sync"),
                    memory=memory,
                )
                stop_load.wait(0.05)

        def gets() -> None:
            while not stop_load.is_set():
                for uuid in uuids:
                    record(
                        "get", uuid, lambda uuid=uuid: api(daemon, "GET", f"/api/servers/{uuid}")
                    )
                stop_load.wait(0.02)

        def done(kind: str, in_phase: str, status: int | None = None) -> list[dict]:
            return [
                c
                for c in list(calls)
                if c["kind"] == kind
                and c["phases"] == (in_phase, in_phase)
                and status in (None, c["status"])
            ]

        threads = [threading.Thread(target=syncs, args=(u,), daemon=True) for u in uuids]
        threads += [threading.Thread(target=gets, daemon=True) for _ in range(2)]
        try:
            with caplog.at_level(logging.INFO, logger="wingslite"):
                for t in threads:
                    t.start()
                wait_for(
                    lambda: len(done("sync", "up", 204)) >= 2 * len(uuids),
                    20,
                    what="syncs with the engine up",
                )
                pids = _dockerd_pids()
                assert pids, "no dockerd is running"
                phase[0] = "stopping"
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                wait_for(
                    lambda: not _engine_answers(1),
                    30,
                    what="the engine to stop answering",
                    interval_s=0.05,
                )
                # live-restore is off: the engine stops the containers on its way down.
                wait_for(
                    lambda: all(daemon.get_server(u).state == "offline" for u in uuids),
                    30,
                    what="every server to go offline",
                )
                wait_for(
                    lambda: not _dockerd_pids(),
                    30,
                    what="the stopped dockerd to exit",
                    interval_s=0.05,
                )
                stopped_at = time.monotonic()
                phase[0] = "down"
                wait_for(
                    lambda: (
                        time.monotonic() - stopped_at > 3
                        and all(
                            len([c for c in done("sync", "down") if c["uuid"] == u]) >= 3
                            for u in uuids
                        )
                    ),
                    30,
                    what="three syncs per server with the engine down",
                )
                down_views = {u: api(daemon, "GET", f"/api/servers/{u}")[2] for u in uuids}
                down_saved = {
                    u: saved_document(daemon, u)["settings"]["build"]["memory_limit"] for u in uuids
                }
                down_syncs = {u: [c for c in done("sync", "down") if c["uuid"] == u] for u in uuids}
                phase[0] = "restarting"
                _start_dockerd()
                phase[0] = "back"
                wait_for(
                    lambda: all(
                        len([c for c in done("sync", "back", 204) if c["uuid"] == u]) >= 2
                        for u in uuids
                    ),
                    30,
                    what="syncs to succeed again",
                )
                stop_load.set()
                for t in threads:
                    t.join(30)
                assert not any(t.is_alive() for t in threads), "a load thread hung"

                # With the engine down: every sync a 500 naming Docker, the configuration swapped
                # all the same.
                for u in uuids:
                    for c in down_syncs[u]:
                        error = (c["body"] or {}).get("error", "")
                        assert (
                            c["status"] == 500
                            and "Docker" in error
                            and "was updated" in error
                            and "Traceback" not in error
                        ), c
                    view = down_views[u]
                    assert view["state"] == "offline"
                    assert view["configuration"]["build"]["memory_limit"] in {
                        m for p, m in sent[u] if p == "down"
                    }
                    assert down_saved[u] in {m for p, m in sent[u] if p == "down"}
                    assert "resource limits" in view["wingslite"]["pending_next_start"], view[
                        "wingslite"
                    ]
                # While the engine was stopping, a sync could still reach it over a kept-alive
                # connection (204) or race the container's exit (500): either way the configuration
                # was swapped.
                for c in [c for c in calls if c["kind"] == "sync" and "stopping" in c["phases"]]:
                    error = (c["body"] or {}).get("error", "")
                    assert c["status"] == 204 or (
                        c["status"] == 500 and "was updated" in error and "Traceback" not in error
                    ), c
                # Each process's end was taken for a crash; the one restart it allows failed on the
                # engine.
                for u in uuids:
                    console = "\n".join(docker_servers.console(u))
                    assert "Detected server process in a crashed state!" in console
                    assert (
                        "an error occurred while handling it" in console
                        or "Aborting automatic restart" in console
                    ), console
                # The daemon kept answering: every GET a 200, and nothing hung.
                assert len(done("get", "down")) >= 5
                assert all(c["status"] == 200 for c in calls if c["kind"] == "get"), [
                    c for c in calls if c["status"] != 200
                ][:3]
                slowest = max(calls, key=lambda c: c["s"])
                assert slowest["s"] < 10, slowest
                # Once the engine answers again, every server's last sync succeeded.
                for u in uuids:
                    last = [c for c in calls if c["kind"] == "sync" and c["uuid"] == u][-1]
                    assert last["status"] == 204, last

                # What the engine restart left: the containers exist, stopped; the servers offline.
                engine = docker.APIClient(version="1.41")
                for u in uuids:
                    assert not engine.inspect_container(u)["State"]["Running"]
                    assert daemon.get_server(u).state == "offline"
                # The next start re-creates the container with the limits the Panel has now.
                for u in uuids:
                    docker_servers.start(u)
                    want = panel.servers[u]["settings"]["build"]["memory_limit"]
                    assert engine.inspect_container(u)["HostConfig"][
                        "Memory"
                    ] == w.memory_limit_bytes(want)
                    assert (
                        "resource limits"
                        not in api(daemon, "GET", f"/api/servers/{u}")[2]["wingslite"][
                            "pending_next_start"
                        ]
                    )
            tracebacks = [
                r for r in caplog.records if r.name.startswith("wingslite") and r.exc_info
            ]
            assert not tracebacks, (
                f"{len(tracebacks)} traceback(s) logged; the first: {tracebacks[0].getMessage()}"
            )
        finally:
            stop_load.set()
            _restore_dockerd()
