#!/usr/bin/env python3
"""wingslite: a Pterodactyl node daemon in one file.

It speaks Wings' HTTP API to the Panel and the Panel's remote API back, runs game servers in
Docker, streams their consoles over websockets and serves their files over SFTP. Its headline is
``POST /api/servers/:server/sync``: re-read one server from the Panel and make the node match it
at once -- limits on the running container, the disk limit on the filesystem, environment for the
next start, and every websocket and SFTP client thrown out when the server is suspended.

Requires Python 3.10+, ``docker`` (Docker SDK) and ``pyyaml``; ``paramiko`` is optional (SFTP).

Run it::

    python3 wingslite.py --config /etc/pterodactyl/config.yml
    python3 wingslite.py --demo          # against an embedded demo Panel on loopback

Embed it::

    daemon = Daemon(load_config("wingslite.yml"))
    daemon.start()          # boots servers, serves the API in background threads
    ...
    daemon.stop()

Map of this file (each section sits under a ``#####`` banner; search for its title):

    constants and errors   version, logger, the exceptions that carry an HTTP status
    config                 Wings' config.yml -> frozen ``Config`` (+ wingslite's own keys)
    Panel client           ``PanelClient``: the Panel's remote API, retries, pagination
    server model           Panel JSON -> ``ServerConfig``; validation; units and Docker maths
    filesystem and disk    ``atomic_write``, ``Filesystem`` (jail, disk limit, usage), quotas
    environments           ``Environment`` (where a process runs), ``LimitReport``, cgroups
    console and events     ``EventBus``, the console log ring and throttle
    session table          ``SessionTable``: every websocket and SFTP session; ``Revocations``
    websocket              RFC 6455 framing, JWTs, Wings' console protocol
    SFTP                   paramiko server: Panel-checked logins, the jail, metered writes
    HTTP API               ``ApiServer`` / ``ApiHandler``: routes, auth, CORS, JSON errors
    daemon                 ``Server`` (one game server, its lock, the sync), ``Daemon`` (boot)
    CLI                    ``main()``, ``--demo`` and its demo Panel

What happens on sync: ``Daemon.sync_server()`` -> ``Server.sync()`` in the daemon section.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

##############################################################################
# constants and errors
##############################################################################

VERSION = "0.1.0"
LOG = logging.getLogger("wingslite")

# Wings' server states (environment/environment.go).
OFFLINE, STARTING, RUNNING, STOPPING = "offline", "starting", "running", "stopping"

# Websocket close codes wingslite uses beyond RFC 6455's own.
CLOSE_SUSPENDED = 4409  # the Panel's browser client stops reconnecting on 4409 (panel#5464)
CLOSE_REVOKED = 4401
CLOSE_SERVER_DELETED = 1001

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$")


class WingsliteError(Exception):
    """An error with the HTTP status and the text an operator (or the Panel's admin) will read."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(WingsliteError):
    status = 400


class NotFound(WingsliteError):
    status = 404


class Conflict(WingsliteError):
    status = 409


class ConfigError(WingsliteError):
    """The node config file is missing, unreadable or has a wrong value (the CLI exits 2)."""


class DocumentError(WingsliteError):
    """A Panel document that does not have the expected shape; the text names the field."""


class PanelError(WingsliteError):
    """A failed call to the Panel: its HTTP status (0 when unreachable), error code and detail."""

    def __init__(self, http_status: int, code: str, detail: str, what: str):
        self.http_status = http_status
        self.code = code
        self.detail = detail
        if http_status:
            text = f"{what}: the Panel answered HTTP {http_status} ({code}: {detail or 'no detail'})"
        else:
            text = f"{what}: {detail}"
        super().__init__(text, 500)


##############################################################################
# config
##############################################################################

# (dotted key, type, default). Wings' own keys keep Wings' defaults (config/config.go); the
# ``wingslite.*`` keys are this daemon's own and are documented in wingslite.yml.
_CONFIG_SCHEMA: tuple[tuple[str, type | tuple[type, ...], Any], ...] = (
    ("debug", bool, False),
    ("uuid", str, ""),
    ("token_id", str, None),
    ("token", str, None),
    ("remote", str, None),
    ("api.host", str, "0.0.0.0"),
    ("api.port", int, 8080),
    ("api.ssl.enabled", bool, False),
    ("api.ssl.cert", str, ""),
    ("api.ssl.key", str, ""),
    ("api.upload_limit", int, 100),
    ("system.root_directory", str, "/var/lib/pterodactyl"),
    ("system.log_directory", str, "/var/log/pterodactyl"),
    ("system.data", str, "/var/lib/pterodactyl/volumes"),
    ("system.tmp_directory", str, "/tmp/pterodactyl"),
    ("system.timezone", str, ""),
    ("system.disk_check_interval", int, 150),
    ("system.websocket_log_count", int, 150),
    ("system.check_permissions_on_boot", bool, True),
    ("system.sftp.bind_address", str, "0.0.0.0"),
    ("system.sftp.bind_port", int, 2022),
    ("system.sftp.read_only", bool, False),
    ("system.crash_detection.enabled", bool, True),
    ("system.crash_detection.detect_clean_exit_as_crash", bool, True),
    ("system.crash_detection.timeout", int, 60),
    ("docker.network.name", str, "pterodactyl_nw"),
    ("docker.network.network_mode", str, "pterodactyl_nw"),
    ("docker.network.interface", str, "172.18.0.1"),
    ("docker.network.dns", list, ["1.1.1.1", "1.0.0.1"]),
    ("docker.network.ispn", bool, False),
    ("docker.domainname", str, ""),
    ("docker.tmpfs_size", int, 100),
    ("docker.container_pid_limit", int, 512),
    ("docker.overhead.override", bool, False),
    ("docker.overhead.default_multiplier", (int, float), 1.05),
    ("docker.overhead.multipliers", dict, {}),
    ("docker.userns_mode", str, ""),
    ("throttles.enabled", bool, True),
    ("throttles.lines", int, 2000),
    ("throttles.line_reset_interval", int, 100),
    ("remote_query.timeout", int, 30),
    ("remote_query.boot_servers_per_page", int, 50),
    ("allowed_mounts", list, []),
    ("allowed_origins", list, []),
    ("allow_cors_private_network", bool, False),
    # wingslite's own settings.
    ("wingslite.boot_concurrency", int, 8),
    ("wingslite.max_request_bytes", int, 1_048_576),
    ("wingslite.max_panel_document_bytes", int, 8_388_608),
    ("wingslite.suspend_stop_grace_s", int, 60),
    ("wingslite.stop_timeout_s", int, 600),
    ("wingslite.panel_retry_initial_ms", int, 500),
    ("wingslite.disk_quota", str, "auto"),
    ("wingslite.cgroup_root", str, "/sys/fs/cgroup"),
    ("wingslite.docker_url", str, ""),
    ("wingslite.docker_network", str, "bridge"),
    ("wingslite.sftp_enabled", bool, True),
    ("wingslite.sftp_login_attempts_per_minute", int, 10),
    ("wingslite.websocket_max_per_server", int, 30),
)

_NON_NEGATIVE = {
    "api.port",
    "system.sftp.bind_port",
    "system.disk_check_interval",
    "system.websocket_log_count",
    "system.crash_detection.timeout",
    "docker.tmpfs_size",
    "docker.container_pid_limit",
    "throttles.lines",
    "throttles.line_reset_interval",
    "remote_query.timeout",
    "remote_query.boot_servers_per_page",
    "wingslite.boot_concurrency",
    "wingslite.max_request_bytes",
    "wingslite.max_panel_document_bytes",
    "wingslite.suspend_stop_grace_s",
    "wingslite.stop_timeout_s",
    "wingslite.panel_retry_initial_ms",
    "wingslite.sftp_login_attempts_per_minute",
    "wingslite.websocket_max_per_server",
}


class Config:
    """The node's configuration: an unmodified Wings ``config.yml`` plus ``wingslite.*`` keys.

    Values are read with ``config.get("system.sftp.bind_port")`` or as attributes for the ones
    used everywhere (``config.token``, ``config.remote``, ``config.data_dir``...). ``raw`` keeps
    the whole file, unknown keys included, untouched. Instances never change after loading.
    """

    def __init__(self, raw: Mapping[str, Any], source: str = "<config>"):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(raw).__name__}")
        self.source = source
        self.raw = copy.deepcopy(dict(raw))
        values: dict[str, Any] = {}
        for key, kind, default in _CONFIG_SCHEMA:
            value = _dig(self.raw, key, source)
            if value is None:
                if default is None:
                    raise ConfigError(f"{source}: {key}: required key is missing")
                value = copy.deepcopy(default)
            values[key] = _check_config_value(source, key, kind, value)
        self._values = types.MappingProxyType(values)
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", values["remote"]):
            raise ConfigError(f"{source}: remote: expected the Panel's http(s) URL, got {values['remote']!r}")
        if not values["token"]:
            raise ConfigError(f"{source}: token: must not be empty")
        for key in ("api.port", "system.sftp.bind_port"):
            if values[key] > 65535:  # 0 = any free port (tests, embedding)
                raise ConfigError(f"{source}: {key}: expected a port 0-65535, got {values[key]}")

    def get(self, key: str) -> Any:
        """The value of a dotted key of the schema (``KeyError`` for a key outside it)."""
        return self._values[key]

    def replace(self, **changes: Any) -> Config:
        """A copy with dotted keys changed, e.g. ``config.replace(**{"api.port": 0})``."""
        raw = copy.deepcopy(self.raw)
        for key, value in changes.items():
            node = raw
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return Config(raw, self.source)

    token = property(lambda self: self._values["token"])
    token_id = property(lambda self: self._values["token_id"])
    remote = property(lambda self: self._values["remote"].rstrip("/"))
    root_dir = property(lambda self: Path(self._values["system.root_directory"]))
    data_dir = property(lambda self: Path(self._values["system.data"]))


def _dig(raw: Mapping[str, Any], key: str, source: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if node is None:
            return None
        if not isinstance(node, Mapping):
            raise ConfigError(f"{source}: {key}: {part!r} sits under a value that is not a mapping")
        node = node.get(part)
    return node


def _check_config_value(source: str, key: str, kind: type | tuple[type, ...], value: Any) -> Any:
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML reads a bare `token_id: 1234` as a number
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{source}: {key}: expected {names}, got {type(value).__name__} {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{source}: {key}: must not be negative, got {value}")
    return value


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a Wings ``config.yml``; ``ConfigError`` names the file and the key on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return Config(raw if raw is not None else {}, str(path))


##############################################################################
# Panel client
##############################################################################


class PanelClient:
    """The Panel's remote API (``{remote}/api/remote/...``), as Wings calls it.

    Methods for the caller: ``get_server(uuid)``, ``list_servers()``, ``sftp_auth(...)``,
    ``reset_servers()``. Every call sends Wings' headers; 2xx answers are decoded JSON; a 4xx is
    final; 5xx, timeouts and connection errors are retried with exponential backoff until the
    total budget (``remote_query.timeout``) runs out. Every failure is a ``PanelError``.

    Class variables that may be overridden: ``backoff_factor``, ``backoff_max_s``.
    """

    backoff_factor = 1.5
    backoff_max_s = 12.0

    def __init__(
        self,
        remote: str,
        token_id: str,
        token: str,
        *,
        budget_s: float = 30.0,
        retry_initial_s: float = 0.5,
        max_document_bytes: int = 8 << 20,
    ):
        self.base = remote.rstrip("/") + "/api/remote"
        self.budget_s = budget_s
        self.retry_initial_s = retry_initial_s
        self.max_document_bytes = max_document_bytes
        self._headers = {
            "Authorization": f"Bearer {token_id}.{token}",
            "Accept": "application/vnd.pterodactyl.v1+json",
            "Content-Type": "application/json",
            "User-Agent": f"Pterodactyl Wings/v{VERSION} (id:{token_id})",
        }

    @classmethod
    def from_config(cls, config: Config) -> PanelClient:
        return cls(
            config.remote,
            config.token_id,
            config.token,
            budget_s=config.get("remote_query.timeout"),
            retry_initial_s=config.get("wingslite.panel_retry_initial_ms") / 1000,
            max_document_bytes=config.get("wingslite.max_panel_document_bytes"),
        )

    # -- calls -------------------------------------------------------------------------------

    def get_server(self, uuid: str, budget_s: float | None = None) -> dict[str, Any]:
        """``GET /servers/{uuid}``: ``{"settings": ..., "process_configuration": ...}``."""
        doc = self.request("GET", f"/servers/{urllib.parse.quote(uuid, safe='')}", budget_s=budget_s)
        if not isinstance(doc, dict):
            raise PanelError(200, "_BadShape", "expected a JSON object", f"GET /servers/{uuid}")
        return doc

    def list_servers(
        self, per_page: int = 50, concurrency: int = 8, progress: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Every server of this node: the first page, then the others concurrently (Laravel pages)."""
        first = self._page(0, per_page)  # Wings asks for page 0, which Laravel reads as page 1
        items = list(first["data"])
        last = first["meta"]["last_page"]
        total = first["meta"].get("total") if isinstance(first["meta"].get("total"), int) else None
        if progress:
            progress(len(items), total or len(items))
        start = first["meta"]["current_page"] + 1
        if last >= start:
            with concurrent.futures.ThreadPoolExecutor(max(1, concurrency), "wingslite-page") as pool:
                for page in pool.map(lambda n: self._page(n, per_page), range(start, last + 1)):
                    items.extend(page["data"])
                    if progress:
                        progress(len(items), total or len(items))
        return items

    def sftp_auth(
        self, kind: str, username: str, password: str, ip: str, session_id: bytes = b"", client_version: bytes = b""
    ) -> dict[str, Any]:
        """``POST /sftp/auth``; any 4xx means the credentials were refused."""
        body = {
            "type": kind,
            "username": username,
            "password": password,
            "ip": ip,
            "session_id": base64.b64encode(session_id).decode(),
            "client_version": base64.b64encode(client_version).decode(),
        }
        answer = self.request("POST", "/sftp/auth", body=body)
        if not isinstance(answer, dict) or not isinstance(answer.get("server"), str) or not isinstance(answer.get("user"), str):
            raise PanelError(200, "_BadShape", "expected {server, user, permissions}", "POST /sftp/auth")
        return answer

    def reset_servers(self) -> None:
        """``POST /servers/reset``: Wings calls it once after boot; the Panel clears stale installs."""
        self.request("POST", "/servers/reset", body=None)

    # -- transport ---------------------------------------------------------------------------

    def _page(self, page: int, per_page: int) -> dict[str, Any]:
        what = f"GET /servers?page={page}"
        doc = self.request("GET", "/servers", query={"page": page, "per_page": per_page})
        meta = doc.get("meta") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or not isinstance(doc.get("data"), list):
            raise PanelError(200, "_BadShape", "expected a Laravel page with data and meta", what)
        for key in ("current_page", "last_page"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
                raise PanelError(200, "_BadShape", f"meta.{key} is not a page number", what)
        return doc

    def request(
        self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body: Any = None, budget_s: float | None = None
    ) -> Any:
        """One call with retries; returns the decoded JSON body (``None`` when empty)."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        what = f"{method} {path}"
        data = json.dumps(body).encode() if method != "GET" else None
        deadline = time.monotonic() + (self.budget_s if budget_s is None else budget_s)
        delay = self.retry_initial_s
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return self._attempt(method, url, data, max(0.05, remaining), what)
            except _Retryable as exc:
                remaining = deadline - time.monotonic()
                wait = min(delay * random.uniform(0.5, 1.5), self.backoff_max_s)
                if remaining <= wait:
                    LOG.warning("%s failed after %d attempts: %s", what, attempt, exc.error.message)
                    raise exc.error from None
                LOG.debug("%s failed (%s), retrying in %.2fs", what, exc.error.message, wait)
                time.sleep(wait)
                delay *= self.backoff_factor

    def _attempt(self, method: str, url: str, data: bytes | None, timeout_s: float, what: str) -> Any:
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read(self.max_document_bytes + 1)
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw = exc.read(65536)
            except OSError:
                raw = b""
            code, detail = _panel_error_body(raw)
            error = PanelError(status, code, detail, what)
            if 400 <= status < 500:
                raise error from None
            raise _Retryable(error) from None
        except TimeoutError:
            raise _Retryable(PanelError(0, "_Timeout", f"the Panel did not answer within {timeout_s:.1f}s", what)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(PanelError(0, "_Unreachable", f"could not reach the Panel at {self.base}: {reason}", what)) from None
        if not 200 <= status < 300:
            raise _Retryable(PanelError(status, "_Unexpected", "unexpected status", what))
        if len(raw) > self.max_document_bytes:
            raise PanelError(status, "_TooLarge", f"the answer is larger than {self.max_document_bytes} bytes", what)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise PanelError(status, "_InvalidJSON", f"the answer is not valid JSON ({str(exc)[:80]})", what) from None


class _Retryable(Exception):
    def __init__(self, error: PanelError):
        super().__init__(error.message)
        self.error = error


def _panel_error_body(raw: bytes) -> tuple[str, str]:
    """The first entry of a Panel error body, or Wings' stand-in when there is none."""
    try:
        first = json.loads(raw)["errors"][0]
        return str(first.get("code", "_MissingResponseCode")), str(first.get("detail", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return "_MissingResponseCode", "No error response returned from API endpoint."


##############################################################################
# server model
##############################################################################
#
# The Panel's JSON is parsed once, at the edge, into frozen dataclasses. ``parse_server_document``
# validates the whole document before anything changes and names the field it refuses. It
# tolerates what the Panel really sends (ints written as floats, null for optional values, a PHP
# empty array ``[]`` where an object is expected, unknown keys).


@dataclasses.dataclass(frozen=True)
class Build:
    """Resource limits. Memory and swap in the Panel's MB, disk in MiB, CPU in % of one thread."""

    memory_mb: int = 0
    swap_mb: int = 0  # -1 = unlimited swap, 0 = none
    io_weight: int = 500
    cpu_percent: int = 0  # 0 = unlimited
    threads: str = ""  # cpuset, "" = not pinned
    disk_mb: int = 0  # 0 = unlimited
    oom_disabled: bool = True


@dataclasses.dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class Allocations:
    default_ip: str = "0.0.0.0"
    default_port: int = 0
    mappings: tuple[tuple[str, tuple[int, ...]], ...] = ()  # ((ip, (port, ...)), ...)
    force_outgoing_ip: bool = False


@dataclasses.dataclass(frozen=True)
class Replacement:
    match: str
    replace_with: Any
    if_value: str | None = None


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """One egg config file that is rewritten before every start (``process_configuration.configs``)."""

    file: str
    parser: str
    replace: tuple[Replacement, ...] = ()


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """How to run the process: startup ``done`` matchers, how to stop it, files to rewrite."""

    done: tuple[str, ...] = ()
    strip_ansi: bool = False
    stop_type: str = "signal"  # "command" | "signal" | "stop" (native Docker stop)
    stop_value: str = "SIGKILL"
    configs: tuple[ConfigFile, ...] = ()

    def done_matchers(self) -> list[Callable[[str], bool]]:
        """One predicate per ``done`` entry: substring, or a regex for ``regex:...`` (as Wings)."""
        matchers: list[Callable[[str], bool]] = []
        for entry in self.done:
            if entry.startswith("regex:") and len(entry) > 6:
                try:
                    matchers.append(re.compile(entry[6:]).search)  # type: ignore[arg-type]
                    continue
                except re.error:
                    LOG.warning("startup done %r is not a valid regex; matching it as text", entry)
            matchers.append(lambda line, needle=entry: needle in line)
        return matchers


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One server as the Panel describes it (``GET /api/remote/servers/{uuid}``), validated.

    ``document`` keeps the Panel's JSON as received, for persistence and for
    ``GET /api/servers/:server``; everything else is parsed from it.
    """

    uuid: str
    name: str
    description: str
    suspended: bool
    invocation: str
    skip_egg_scripts: bool
    environment: Mapping[str, Any]
    build: Build
    image: str
    allocations: Allocations
    mounts: tuple[Mount, ...]
    egg_id: str
    file_denylist: tuple[str, ...]
    labels: Mapping[str, str]
    crash_detection_enabled: bool
    process: ProcessConfig
    document: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def disk_limit_bytes(self) -> int:
        return disk_limit_bytes(self.build.disk_mb)


class _Doc:
    """A cursor over a JSON document that names the field in every error."""

    def __init__(self, value: Any, path: str):
        self.value, self.path = value, path

    def fail(self, problem: str) -> DocumentError:
        return DocumentError(f"the Panel's server document is invalid: {self.path}: {problem}")

    def at(self, key: str, required: bool = False) -> _Doc:
        obj = self.obj(required=True)
        if key not in obj and required:
            raise _Doc(None, f"{self.path}.{key}").fail("required key is missing")
        return _Doc(obj.get(key), f"{self.path}.{key}")

    def obj(self, required: bool = False) -> dict[str, Any]:
        if self.value is None or self.value == []:  # PHP serialises an empty map as []
            if required and self.value is None:
                raise self.fail("expected an object, got null")
            return {}
        if not isinstance(self.value, dict):
            raise self.fail(f"expected an object, got {_json_type(self.value)}")
        return self.value

    def list(self) -> list[Any]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {_json_type(self.value)}")
        return self.value

    def str(self, default: str = "", required: bool = False) -> str:
        if self.value is None:
            if required:
                raise self.fail("required value is missing")
            return default
        if not isinstance(self.value, str):
            raise self.fail(f"expected a string, got {_json_type(self.value)}")
        return self.value

    def bool(self, default: bool = False) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            raise self.fail(f"expected true or false, got {_json_type(self.value)}")
        return self.value

    def int(self, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        value = self.value
        if value is None:
            if default is None:
                raise self.fail("required number is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"expected a number, got {_json_type(value)} {json.dumps(value)[:40]}")
        number = round_half_away(value) if isinstance(value, float) else value
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"must be {bounds}, got {json.dumps(value)}")
        return number


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


_THREADS_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def _parse_threads(doc: _Doc) -> str:
    text = doc.str().replace(" ", "")
    if not text:
        return ""
    if not _THREADS_RE.match(text):
        raise doc.fail(f"expected a CPU list such as '0-1,4', got {text!r}")
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise doc.fail(f"range {part!r} runs backwards")
        if int(hi or lo) > 4095:
            raise doc.fail(f"CPU {hi or lo} does not exist")
    return text


def parse_server_document(document: Any, *, expect_uuid: str | None = None, crash_detection_default: bool = True) -> ServerConfig:
    """Validate the Panel's ``{"settings", "process_configuration"}`` document as a whole.

    Raises ``DocumentError`` naming the first field that is refused; returns a ``ServerConfig``
    only when every field is acceptable, so a caller can swap configurations all or nothing.
    """
    root = _Doc(document, "document")
    root.obj(required=True)
    settings = root.at("settings", required=True)
    settings.obj(required=True)
    uuid = settings.at("uuid", required=True).str(required=True)
    if expect_uuid is not None and uuid != expect_uuid:
        raise settings.at("uuid").fail(f"describes server {uuid!r}, not {expect_uuid!r}")
    if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", uuid):
        raise settings.at("uuid").fail(f"not a server uuid: {uuid!r}")

    env_doc = settings.at("environment")
    environment: dict[str, Any] = {}
    for key, value in env_doc.obj().items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise _Doc(value, f"{env_doc.path}.{key}").fail("not a valid environment variable name")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _Doc(value, f"{env_doc.path}.{key}").fail(f"expected a string or number, got {_json_type(value)}")
        environment[key] = value

    b = settings.at("build", required=True)
    b.obj(required=True)
    build = Build(
        memory_mb=b.at("memory_limit", required=True).int(lo=0),
        swap_mb=b.at("swap").int(0, lo=-1),
        io_weight=b.at("io_weight").int(500, lo=10, hi=1000),
        cpu_percent=b.at("cpu_limit", required=True).int(lo=0, hi=409_600),
        threads=_parse_threads(b.at("threads")),
        disk_mb=b.at("disk_space", required=True).int(lo=0),
        oom_disabled=b.at("oom_disabled").bool(True),
    )

    a = settings.at("allocations")
    default = a.at("default")
    mappings: list[tuple[str, tuple[int, ...]]] = []
    m = a.at("mappings")
    for ip, ports in m.obj().items():
        port_doc = _Doc(ports, f"{m.path}.{ip}")
        parsed = tuple(_Doc(p, f"{port_doc.path}[{i}]").int(lo=1, hi=65535) for i, p in enumerate(port_doc.list()))
        mappings.append((ip, parsed))
    allocations = Allocations(
        default_ip=default.at("ip").str("0.0.0.0") if default.value is not None else "0.0.0.0",
        default_port=default.at("port").int(0, lo=0, hi=65535) if default.value is not None else 0,
        mappings=tuple(mappings),
        force_outgoing_ip=a.at("force_outgoing_ip").bool() if a.value is not None else False,
    )

    mounts = []
    mounts_doc = settings.at("mounts")
    for i, item in enumerate(mounts_doc.list()):
        md = _Doc(item, f"{mounts_doc.path}[{i}]")
        md.obj(required=True)
        mounts.append(Mount(md.at("source").str(required=True), md.at("target").str(required=True), md.at("read_only").bool()))

    egg = settings.at("egg")
    egg_obj = egg.obj()
    deny_doc = _Doc(egg_obj.get("file_denylist"), f"{egg.path}.file_denylist")
    denylist = tuple(_Doc(p, f"{deny_doc.path}[{i}]").str(required=True) for i, p in enumerate(deny_doc.list()))

    labels_doc = settings.at("labels")
    labels = {k: _Doc(v, f"{labels_doc.path}.{k}").str() for k, v in labels_doc.obj().items()}
    meta = settings.at("meta")
    container = settings.at("container")
    return ServerConfig(
        uuid=uuid,
        name=meta.at("name").str() if meta.value is not None else "",
        description=meta.at("description").str() if meta.value is not None else "",
        suspended=settings.at("suspended").bool(),
        invocation=settings.at("invocation").str(),
        skip_egg_scripts=settings.at("skip_egg_scripts").bool(),
        environment=types.MappingProxyType(environment),
        build=build,
        image=container.at("image").str() if container.value is not None else "",
        allocations=allocations,
        mounts=tuple(mounts),
        egg_id=_Doc(egg_obj.get("id"), f"{egg.path}.id").str(),
        file_denylist=denylist,
        labels=types.MappingProxyType(labels),
        crash_detection_enabled=settings.at("crash_detection_enabled").bool(crash_detection_default),
        process=_parse_process(root.at("process_configuration")),
        document=types.MappingProxyType(copy.deepcopy(document)),
    )


def _parse_process(p: _Doc) -> ProcessConfig:
    if p.value is None:
        return ProcessConfig()
    p.obj(required=True)
    startup = p.at("startup")
    done_doc = startup.at("done") if startup.value is not None else _Doc(None, "")
    done_list = [done_doc.value] if isinstance(done_doc.value, str) else done_doc.list()
    done = tuple(_Doc(d, f"{done_doc.path}[{i}]").str(required=True) for i, d in enumerate(done_list))
    stop = p.at("stop")
    stop_type = stop.at("type").str("signal") if stop.value is not None else "signal"
    if stop_type not in ("command", "signal", "stop", ""):
        raise stop.at("type").fail(f"expected command, signal or stop, got {stop_type!r}")
    stop_value = stop.at("value").str() if stop.value is not None else ""
    if stop_type in ("signal", "") and not stop_value:
        stop_type, stop_value = "signal", "SIGKILL"
    configs = []
    configs_doc = p.at("configs")
    for i, item in enumerate(configs_doc.list()):
        cd = _Doc(item, f"{configs_doc.path}[{i}]")
        cd.obj(required=True)
        replaces = []
        rd = cd.at("replace")
        for j, r in enumerate(rd.list()):
            rdoc = _Doc(r, f"{rd.path}[{j}]")
            robj = rdoc.obj(required=True)
            with_value = robj.get("replace_with", robj.get("value"))
            if isinstance(with_value, (dict, list)):
                raise rdoc.at("replace_with").fail("expected a string, number or boolean")
            if_value = robj.get("if_value")
            replaces.append(Replacement(rdoc.at("match").str(required=True), with_value, None if if_value is None else str(if_value)))
        configs.append(ConfigFile(cd.at("file").str(required=True), cd.at("parser").str("file"), tuple(replaces)))
    return ProcessConfig(
        done=done,
        strip_ansi=startup.at("strip_ansi").bool() if startup.value is not None else False,
        stop_type=stop_type,
        stop_value=stop_value,
        configs=tuple(configs),
    )


# -- units and Docker maths (Wings v1.11, environment/settings.go) ------------------------------


def round_half_away(x: float) -> int:
    """Round half away from zero, as Go's math.Round; Python's round() rounds half to even."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def overhead_multiplier(memory_mb: int, config: Config | None = None) -> float:
    """Wings' memory overhead: 1.15 up to 2048 MB, 1.10 up to 4096 MB, else 1.05 (inclusive)."""
    if config is not None and config.get("docker.overhead.override"):
        table = sorted((int(k), float(v)) for k, v in config.get("docker.overhead.multipliers").items())
        for limit_mb, multiplier in table:
            if memory_mb <= limit_mb:
                return multiplier
        return float(config.get("docker.overhead.default_multiplier"))
    if memory_mb <= 2048:
        return 1.15
    if memory_mb <= 4096:
        return 1.10
    return 1.05


def memory_limit_bytes(memory_mb: int, config: Config | None = None) -> int:
    """Docker ``Memory``: MB x overhead x 1,000,000 (decimal), rounded half away from zero."""
    return round_half_away(memory_mb * overhead_multiplier(memory_mb, config) * 1_000_000)


def memory_swap_bytes(build: Build, config: Config | None = None) -> int:
    """Docker ``MemorySwap`` (memory + swap): -1 when swap is unlimited."""
    if build.swap_mb < 0:
        return -1
    return build.swap_mb * 1_000_000 + memory_limit_bytes(build.memory_mb, config)


def disk_limit_bytes(disk_mb: int) -> int:
    """Disk is MiB: MB x 1,048,576 (unlike memory). 0 = unlimited."""
    return disk_mb * 1_048_576


def container_resources(build: Build, config: Config | None = None) -> dict[str, Any]:
    """The Docker resource fields Wings sets for a server container (``AsContainerResources``).

    CPU quota and cpuset are left out when unlimited, as Wings does (panel#3988); a live update
    that must remove them is handled by the environment (cgroup writes).
    """
    memory = memory_limit_bytes(build.memory_mb, config)
    resources: dict[str, Any] = {
        "Memory": memory,
        "MemoryReservation": build.memory_mb * 1_000_000,
        "MemorySwap": memory_swap_bytes(build, config) if memory else (-1 if build.swap_mb < 0 else 0),
        "BlkioWeight": build.io_weight,
        "OomKillDisable": build.oom_disabled,
        "PidsLimit": config.get("docker.container_pid_limit") if config is not None else 512,
    }
    if build.cpu_percent > 0:
        resources.update(CpuQuota=build.cpu_percent * 1000, CpuPeriod=100_000, CpuShares=1024)
    if build.threads:
        resources["CpusetCpus"] = build.threads
    return resources


def format_env_value(value: Any) -> str:
    """A Panel environment value as text. Numbers stay plain (``25565``, not Wings' ``25565.000000``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def container_environment(server: ServerConfig, timezone: str = "UTC") -> list[str]:
    """``KEY=value`` lines for the container: Wings' five first, then the Panel's (upper-cased)."""
    first = {
        "TZ": timezone or "UTC",
        "STARTUP": server.invocation,
        "SERVER_MEMORY": str(server.build.memory_mb),
        "SERVER_IP": server.allocations.default_ip,
        "SERVER_PORT": str(server.allocations.default_port),
    }
    lines = [f"{k}={v}" for k, v in first.items()]
    for key, value in server.environment.items():
        if key.upper() not in first:
            lines.append(f"{key.upper()}={format_env_value(value)}")
    return lines


def server_document_json(server: ServerConfig) -> dict[str, Any]:
    """The Panel document as plain JSON-ready dicts (``document`` is a read-only view)."""
    return json.loads(json.dumps(server.document, default=dict))


##############################################################################
# filesystem and disk
##############################################################################


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` so that a crash at any instant leaves the old or the new bytes, never a mix.

    Write a temporary file beside it, fsync it, rename it over the target, fsync the directory.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class QuotaBackend:
    """A kernel-enforced disk limit for server directories. This base class enforces nothing.

    Methods that may be overridden: ``prepare(root)`` (make the directory able to carry a limit,
    before anything is written into it), ``set_limit(root, limit_bytes)`` (0 removes it; returns
    notes for the sync record), ``usage_bytes(root)`` (``None`` when the backend cannot tell).
    Class variables: ``name`` and ``reason`` (why this backend is in force, for ``/api/system``).
    """

    name = "soft"
    reason = "no kernel quota in force: the daemon's own write paths check the limit, and a server over it is stopped"

    def prepare(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)

    def set_limit(self, root: Path, limit_bytes: int) -> list[str]:
        return []

    def usage_bytes(self, root: Path) -> int | None:
        return None


class Filesystem:
    """One server's data directory, its disk limit and its usage accounting.

    Methods for the caller: ``set_limit(limit_bytes)``, ``usage_bytes(allow_stale=True)``,
    ``recalculate()``, ``has_space(n_bytes)``, ``reserve(n_bytes)``, ``add_usage(delta_bytes)``,
    ``set_denylist(patterns)``, ``is_denied(relpath)``.

    Usage is the apparent size of every regular file under the root (as Wings), cached for
    ``check_interval_s`` seconds; a stale read returns the cached figure at once and refreshes in the
    background, so no caller (boot included) waits on a walk unless it asks to. Metered writers
    call ``reserve()`` before each write, which checks and books the bytes in one step.
    """

    def __init__(self, root: Path, limit_bytes: int = 0, check_interval_s: float = 150, quota: QuotaBackend | None = None):
        self.root = Path(root)
        self.check_interval_s = check_interval_s
        self.quota = quota or QuotaBackend()
        self._limit = max(0, limit_bytes)
        self._usage = 0
        self._measured_at: float | None = None
        self._lock = threading.Lock()
        self._walking = False
        self._denylist: tuple[str, ...] = ()
        self._deny_re: re.Pattern[str] | None = None

    @property
    def limit_bytes(self) -> int:
        return self._limit

    def ensure(self) -> None:
        """Create the directory (through the quota backend, which may need to make it itself)."""
        if not self.root.is_dir():
            self.quota.prepare(self.root)
            self.quota.set_limit(self.root, self._limit)

    def set_limit(self, limit_bytes: int) -> list[str]:
        """The new limit governs the next write at once; the quota backend gets it too."""
        with self._lock:
            self._limit = max(0, limit_bytes)
        notes = list(self.quota.set_limit(self.root, self._limit)) if self.root.is_dir() else []
        usage = self.usage_bytes()
        if self._limit and usage > self._limit:
            notes.append(f"disk usage {usage} bytes is over the new limit of {self._limit} bytes: writes are refused")
        return notes

    def usage_bytes(self, allow_stale: bool = True) -> int:
        quota_usage = self.quota.usage_bytes(self.root)
        if quota_usage is not None:
            return quota_usage
        with self._lock:
            fresh = self._measured_at is not None and time.monotonic() - self._measured_at < self.check_interval_s
            if fresh or (allow_stale and self._measured_at is not None):
                if not fresh and not self._walking:
                    self._walking = True
                    threading.Thread(target=self._background_walk, name="wingslite-du", daemon=True).start()
                return self._usage
        if allow_stale:
            # Never measured: answer 0 now, measure in the background (boot must not wait on walks).
            with self._lock:
                if not self._walking:
                    self._walking = True
                    threading.Thread(target=self._background_walk, name="wingslite-du", daemon=True).start()
                return self._usage
        return self.recalculate()

    def _background_walk(self) -> None:
        try:
            self.recalculate()
        except Exception:  # a vanished directory must not kill anything
            LOG.exception("disk usage walk of %s failed", self.root)
        finally:
            with self._lock:
                self._walking = False

    def recalculate(self) -> int:
        """Walk the directory now (lstat, symlinks not followed) and cache the figure."""
        total = 0
        stack = [str(self.root)]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                total += entry.stat(follow_symlinks=False).st_size
                        except OSError:
                            continue
            except OSError:
                continue
        with self._lock:
            self._usage, self._measured_at = total, time.monotonic()
        return total

    def has_space(self, n_bytes: int = 0) -> bool:
        """True when ``n_bytes`` more still fit (usage == limit is allowed, as Wings)."""
        if self._limit == 0:
            return True
        return self.usage_bytes() + max(0, n_bytes) <= self._limit

    def reserve(self, n_bytes: int) -> bool:
        """Book ``n_bytes`` against the limit if they fit; False (nothing booked) if they do not."""
        if n_bytes <= 0:
            return True
        self.usage_bytes()  # make sure a first measurement is under way
        with self._lock:
            if self._limit and self._usage + n_bytes > self._limit:
                return False
            self._usage += n_bytes
            return True

    def add_usage(self, delta_bytes: int) -> None:
        with self._lock:
            self._usage = max(0, self._usage + delta_bytes)

    def set_denylist(self, patterns: Iterable[str]) -> None:
        """The egg's ``file_denylist`` (gitignore-like globs) that no file operation may touch."""
        patterns = tuple(p.strip() for p in patterns if p and p.strip() and not p.strip().startswith("#"))
        self._denylist = patterns
        parts = [_glob_to_regex(p) for p in patterns]
        self._deny_re = re.compile("|".join(parts)) if parts else None

    def is_denied(self, relpath: str) -> bool:
        """True when ``relpath`` (relative to the root, '/'-separated) matches the denylist."""
        if self._deny_re is None:
            return False
        path = "/" + relpath.strip("/")
        return bool(self._deny_re.search(path))


def _glob_to_regex(pattern: str) -> str:
    """A gitignore-style glob as a regex over '/'-rooted paths (``*.jar``, ``/config/**``, ``logs/``)."""
    anchored = pattern.startswith("/")
    body = pattern.strip("/")
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if body.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)))
        i += 1
    prefix = "^/" if anchored or "/" in body else "(^|/)"
    return f"(?:{prefix}{''.join(out)}(/|$))"


##############################################################################
# environments
##############################################################################


@dataclasses.dataclass
class LimitReport:
    """What a limit update did: applied live, pending until the next start, failed (with why)."""

    applied: list[str] = dataclasses.field(default_factory=list)
    pending: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)


class Environment:
    """Where one server's process runs. This base class runs nothing (no Docker on this node).

    Methods for the caller (the ``Server``): ``state``, ``exists()``, ``apply_limits(config)``,
    ``start(config)``, ``stop(config, timeout_s)``, ``kill()``, ``destroy()``,
    ``send_command(line)``, ``logs(lines)``, ``stats()``, ``attach_if_running(config)``, ``close()``.
    Subclasses override them all and publish ``("status", state)``, ``("console output", line)``
    and ``("stats", json_text)`` on ``events``.
    """

    kind = "none"

    def __init__(self, server_uuid: str, events: EventBus):
        self.server_uuid = server_uuid
        self.events = events

    @property
    def state(self) -> str:
        return OFFLINE

    def exists(self) -> bool:
        return False

    def apply_limits(self, config: ServerConfig) -> LimitReport:
        return LimitReport(pending=["resource limits: no container exists; they apply when it is created at the next start"])

    def start(self, config: ServerConfig) -> None:
        raise WingsliteError("this node has no environment that can run servers (is the Docker engine reachable?)")

    def stop(self, config: ServerConfig, timeout_s: float) -> None:
        return None

    def kill(self) -> None:
        return None

    def destroy(self) -> None:
        return None

    def send_command(self, line: str) -> None:
        raise WingsliteError("Cannot send commands to a stopped server instance.", 502)

    def logs(self, lines: int) -> list[str]:
        return []

    def stats(self) -> dict[str, Any]:
        return {"memory_bytes": 0, "memory_limit_bytes": 0, "cpu_absolute": 0.0, "network": {"rx_bytes": 0, "tx_bytes": 0}, "uptime": 0}

    def attach_if_running(self, config: ServerConfig) -> bool:
        return False

    def exit_status(self) -> tuple[int, bool]:
        """The last process exit: ``(exit code, killed for running out of memory)``."""
        return 1, False

    def close(self) -> None:
        return None


##############################################################################
# console and events
##############################################################################


class EventBus:
    """A server's events (``status``, ``console output``, ``stats``...) fanned out to subscribers.

    Subscribers are plain callables ``fn(event, *args)`` run on the publisher's thread; they must
    never block (a websocket puts the event on its own bounded queue). A subscriber that raises
    is logged and kept.
    """

    def __init__(self) -> None:
        self._subscribers: dict[int, Callable[..., None]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def subscribe(self, fn: Callable[..., None]) -> int:
        with self._lock:
            self._next += 1
            self._subscribers[self._next] = fn
            return self._next

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subscribers.pop(token, None)

    def publish(self, event: str, *args: Any) -> None:
        with self._lock:
            subscribers = list(self._subscribers.values())
        for fn in subscribers:
            try:
                fn(event, *args)
            except Exception:
                LOG.exception("event subscriber failed on %r", event)


class LogRing:
    """The last ``maxlen`` console lines of a server (thread-safe)."""

    def __init__(self, maxlen: int = 150):
        self._lines: deque[str] = deque(maxlen=max(1, maxlen))
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def tail(self, n: int) -> list[str]:
        with self._lock:
            return list(self._lines)[-n:] if n > 0 else []


def daemon_message(text: str, app_name: str = "Pterodactyl") -> str:
    """A console line from the daemon itself, coloured as Wings colours it (server/console.go)."""
    return f"\x1b[33m\x1b[1m[{app_name} Daemon]:\x1b[39m {text}\x1b[0m"


##############################################################################
# session table
##############################################################################


class Session:
    """One open websocket or SFTP session: whose it is, and how to close it now."""

    __slots__ = ("_close", "id", "kind", "opened_at", "server_uuid", "user_uuid")

    def __init__(self, server_uuid: str, user_uuid: str, kind: str, close: Callable[[int, str], None]):
        self.id = uuidlib.uuid4().hex
        self.server_uuid, self.user_uuid, self.kind = server_uuid, user_uuid, kind
        self.opened_at = time.time()
        self._close = close

    def close(self, code: int, reason: str) -> None:
        self._close(code, reason)

    def __repr__(self) -> str:
        return f"<Session {self.kind} server={self.server_uuid} user={self.user_uuid}>"


class SessionTable:
    """Every open websocket and SFTP session of the node, by server and by user.

    Suspension, deletion and deauthorisation close exactly the sessions they concern, and they
    are closed by the time ``close_server()`` / ``close_user()`` return. A closer that raises is
    logged; the others are still closed.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def register(self, server_uuid: str, user_uuid: str, kind: str, close: Callable[[int, str], None]) -> Session:
        session = Session(server_uuid, user_uuid, kind, close)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def unregister(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)

    def sessions(self, server_uuid: str | None = None, user_uuid: str | None = None, kind: str | None = None) -> list[Session]:
        with self._lock:
            return [
                s
                for s in self._sessions.values()
                if (server_uuid is None or s.server_uuid == server_uuid)
                and (user_uuid is None or s.user_uuid == user_uuid)
                and (kind is None or s.kind == kind)
            ]

    def count(self, server_uuid: str | None = None, kind: str | None = None) -> int:
        return len(self.sessions(server_uuid=server_uuid, kind=kind))

    def close_server(self, server_uuid: str, code: int, reason: str, kind: str | None = None) -> int:
        """Close every session of a server (of one kind, if given); returns how many."""
        return self._close(self.sessions(server_uuid=server_uuid, kind=kind), code, reason)

    def close_user(
        self, user_uuid: str, server_uuids: Iterable[str] | None = None, code: int = CLOSE_REVOKED, reason: str = "access revoked"
    ) -> int:
        """Close a user's sessions on the given servers (every server when ``None``)."""
        wanted = None if server_uuids is None else set(server_uuids)
        chosen = [s for s in self.sessions(user_uuid=user_uuid) if wanted is None or s.server_uuid in wanted]
        return self._close(chosen, code, reason)

    def _close(self, sessions: list[Session], code: int, reason: str) -> int:
        with self._lock:
            for session in sessions:
                self._sessions.pop(session.id, None)
        for session in sessions:
            try:
                session.close(code, reason)
            except Exception:
                LOG.exception("closing %r failed", session)
        return len(sessions)


class Revocations:
    """Which websocket JWTs are no longer accepted, and since when.

    A token is refused when it was issued before the daemon started (Wings does the same), when
    its ``jti`` was denied at or after its ``iat`` (``POST /ws/deny``), or when its user was
    deauthorised for its server at or after its ``iat`` (``POST /api/deauthorize-user``). ``iat``
    has one-second granularity, so "at" counts as before.
    """

    def __init__(self) -> None:
        self.boot_time = time.time()
        self._jtis: dict[str, float] = {}
        self._users: dict[tuple[str, str | None], float] = {}
        self._lock = threading.Lock()

    def deny_jtis(self, jtis: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            for jti in jtis:
                self._jtis[jti] = now

    def revoke_user(self, user_uuid: str, server_uuids: Iterable[str] | None = None) -> None:
        now = time.time()
        with self._lock:
            for server in [None] if server_uuids is None else list(server_uuids):
                self._users[(user_uuid, server)] = now

    def check(self, jti: str, user_uuid: str, server_uuid: str, iat: float) -> str | None:
        """``None`` when the token may be used, else Wings' ``jwt error`` text."""
        if iat < int(self.boot_time):
            return "jwt: created too far in past (denylist)"
        with self._lock:
            cutoffs = [self._jtis.get(jti), self._users.get((user_uuid, None)), self._users.get((user_uuid, server_uuid))]
        if any(c is not None and iat <= int(c) for c in cutoffs):
            return "jwt: created too far in past (denylist)"
        return None


##############################################################################
# websocket
##############################################################################


def serve_websocket(handler: Any, daemon: Any, server: Any) -> None:
    """Serve ``GET /api/servers/:server/ws`` on the handler's connection."""
    raise WingsliteError("the websocket console is not available in this build", 501)


##############################################################################
# SFTP
##############################################################################


def sftp_available() -> bool:
    """True when paramiko can be imported (SFTP is optional)."""
    try:
        import paramiko  # noqa: F401
    except ImportError:
        return False
    return True


class SftpServer:
    """The node's SFTP server (needs paramiko)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.port = 0

    def start(self) -> None:
        LOG.warning("SFTP server is not available in this build")

    def stop(self) -> None:
        return None


##############################################################################
# HTTP API
##############################################################################

_SERVER = r"/api/servers/(?P<server>[^/]+)"

# (method, path regex, handler method name, needs the node token)
_ROUTES: tuple[tuple[str, re.Pattern[str], str, bool], ...] = tuple(
    (method, re.compile(f"^{path}$"), name, auth)
    for method, path, name, auth in (
        ("GET", r"/api/system", "system_info", True),
        ("GET", r"/api/servers", "list_servers", True),
        ("POST", r"/api/servers", "create_server", True),
        ("POST", r"/api/deauthorize-user", "deauthorize_user", True),
        ("GET", _SERVER, "get_server", True),
        ("DELETE", _SERVER, "delete_server", True),
        ("POST", _SERVER + r"/sync", "sync_server", True),
        ("POST", _SERVER + r"/power", "power", True),
        ("POST", _SERVER + r"/commands", "commands", True),
        ("GET", _SERVER + r"/logs", "logs", True),
        ("POST", _SERVER + r"/ws/deny", "ws_deny", True),
        ("GET", _SERVER + r"/ws", "websocket", False),  # authenticated by the JWT inside
    )
)

_CORS_HEADERS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET, POST, PATCH, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Accept, Accept-Encoding, Authorization, Cache-Control, Content-Type, Content-Length, Origin, X-Real-IP, X-CSRF-Token",
    "Access-Control-Max-Age": "7200",
}


class ApiServer(http.server.ThreadingHTTPServer):
    """The node's HTTP API server: one thread per connection, bound to ``daemon``.

    Class variables that may be overridden: ``daemon_threads``, ``allow_reuse_address``,
    ``request_queue_size``, ``handler_class``.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], daemon: Daemon, handler_class: type[ApiHandler] | None = None):
        self.daemon = daemon
        super().__init__(address, handler_class or ApiHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.exception("unhandled error on a connection from %s", client_address[0] if client_address else "?")


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """Wings' HTTP API: Bearer auth, CORS, JSON bodies, JSON errors with request ids.

    Every answer is written in one ``send`` (headers and body together) on a ``TCP_NODELAY``
    socket, which avoids the 40 ms Nagle/delayed-ACK stall of http.server's default two writes.
    Route handlers are the ``route_<name>`` methods; each returns ``(status, body)`` where body is
    JSON-ready data, ``None`` (no body) or raises ``WingsliteError``.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"wingslite/{VERSION}"
    sys_version = ""
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    server: ApiServer

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request_id = ""

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long) as JSON, never HTML."""
        self.close_connection = True
        self._respond(code, {"error": message or http.HTTPStatus(code).phrase})

    def _respond(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        all_headers = {"Date": self.date_time_string(), "Server": self.server_version}
        all_headers.update(self._cors_headers())
        if self.request_id:
            all_headers["X-Request-Id"] = self.request_id
        if body is not None:
            all_headers["Content-Type"] = "application/json; charset=utf-8"
        if status != 204:
            all_headers["Content-Length"] = str(len(payload))
        if self.close_connection:
            all_headers["Connection"] = "close"
        all_headers.update(headers or {})
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        with contextlib.suppress(OSError):
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        self.last_status = status

    def _cors_headers(self) -> dict[str, str]:
        daemon = self.server.daemon
        headers = {"Access-Control-Allow-Origin": daemon.config.remote, **_CORS_HEADERS}
        origin = self.headers.get("Origin") if hasattr(self, "headers") and self.headers else None
        allowed = daemon.config.get("allowed_origins")
        if origin and origin != daemon.config.remote:
            if "*" in allowed:
                headers["Access-Control-Allow-Origin"] = "*"
            elif origin in allowed:
                headers["Access-Control-Allow-Origin"] = origin
        if daemon.config.get("allow_cors_private_network"):
            headers["Access-Control-Request-Private-Network"] = "true"
        return headers

    def _error(self, status: int, message: str) -> None:
        self._respond(status, {"error": message, "request_id": self.request_id})

    def do_OPTIONS(self) -> None:
        self.request_id = str(uuidlib.uuid4())
        self._respond(204)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self.request_id = str(uuidlib.uuid4())
        self.body_read = False
        try:
            path = urllib.parse.urlsplit(self.path).path
            self.query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            matches = [(m, pattern.match(path), name, auth) for m, pattern, name, auth in _ROUTES]
            matches = [(m, match, name, auth) for m, match, name, auth in matches if match]
            chosen = next(((match, name, auth) for m, match, name, auth in matches if m == method), None)
            if chosen is None or chosen[2]:
                self._authorize()  # as Wings: unknown routes answer 401 to strangers, not 404
            if chosen is None:
                if matches:
                    allowed = ", ".join(sorted({m for m, *_ in matches}))
                    raise WingsliteError(f"method {method} is not allowed on {path} (allowed: {allowed})", 405)
                raise NotFound(f"no route for {method} {path}")
            match, name, _ = chosen
            args = match.groupdict()
            if "server" in args:
                args["server"] = self.server.daemon.get_server(urllib.parse.unquote(args["server"]))
            status, body = getattr(self, f"route_{name}")(**args)
            if status is not None:  # None: the route wrote its own answer (websocket)
                self._drain_unread_body()
                self._respond(status, body)
        except WingsliteError as exc:
            self._drain_unread_body()
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            if exc.status == 405:
                headers = {"Allow": exc.message.rsplit("allowed: ", 1)[-1].rstrip(")")}
            self._respond(exc.status, {"error": exc.message, "request_id": self.request_id}, headers)
        except Exception:
            LOG.exception("request %s %s failed (request id %s)", method, self.path, self.request_id)
            self.close_connection = True
            self._error(500, "An unexpected error was encountered while processing this request")

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token or " " in token:
            raise WingsliteError("The required authorization heads were not present in the request.", 401)
        if not hmac.compare_digest(token.encode(), self.server.daemon.config.token.encode()):
            raise WingsliteError("You are not authorized to access this endpoint.", 403)

    def read_json(self, required: bool = True) -> Any:
        """The request body as JSON: 411/413/400 with a clear text when it cannot be had."""
        self.body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise WingsliteError("chunked request bodies are not supported; send Content-Length", 411)
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else 0
        except ValueError:
            self.close_connection = True
            raise BadRequest("the Content-Length header is not a number") from None
        if length < 0:
            self.close_connection = True
            raise BadRequest("the Content-Length header is negative")
        limit = self.server.daemon.config.get("wingslite.max_request_bytes")
        if length > limit:
            self.close_connection = True
            raise WingsliteError(f"the request body is {length} bytes; the limit is {limit}", 413)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            self.close_connection = True
            raise BadRequest("the request body ended early")
        if not raw.strip():
            if required:
                raise BadRequest("The data passed in the request was not in a parsable format. Please try again.")
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("The data passed in the request was not in a parsable format. Please try again.") from None

    def _drain_unread_body(self) -> None:
        """Keep the connection in step: read (or give up on) a body the route did not read."""
        if self.body_read or self.close_connection:
            return
        self.body_read = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or length < 0 or length > 65536:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    # -- routes --------------------------------------------------------------------------------

    def route_system_info(self) -> tuple[int, Any]:
        return 200, self.server.daemon.system_info(detailed=self.query.get("v") == ["2"])

    def route_list_servers(self) -> tuple[int, Any]:
        return 200, [s.api_view() for s in self.server.daemon.all_servers()]

    def route_create_server(self) -> tuple[int, Any]:
        body = self.read_json()
        if not isinstance(body, dict) or not isinstance(body.get("uuid"), str) or not _UUID_RE.match(body["uuid"]):
            raise WingsliteError("The data provided in the request could not be validated.", 422)
        start = body.get("start_on_completion", False)
        if not isinstance(start, bool):
            raise WingsliteError("start_on_completion must be true or false", 422)
        self.server.daemon.create_server(body["uuid"], start_on_completion=start)
        return 202, None

    def route_get_server(self, server: Server) -> tuple[int, Any]:
        return 200, server.api_view()

    def route_delete_server(self, server: Server) -> tuple[int, Any]:
        self.server.daemon.delete_server(server)
        return 204, None

    def route_sync_server(self, server: Server) -> tuple[int, Any]:
        self._drain_unread_body()  # the sync takes no body; one sent anyway is ignored
        self.server.daemon.sync_server(server)
        return 204, None

    def route_power(self, server: Server) -> tuple[int, Any]:
        body = self.read_json()
        action = body.get("action") if isinstance(body, dict) else None
        if action not in ("start", "stop", "restart", "kill"):
            raise WingsliteError('The power action provided was not valid, should be one of "stop", "start", "restart", "kill"', 422)
        wait = body.get("wait_seconds", 0)
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 <= wait <= 300:
            wait = 30  # Wings: outside 0..300 becomes 30
        server.request_power(action, float(wait))
        return 202, None

    def route_commands(self, server: Server) -> tuple[int, Any]:
        if server.state in (OFFLINE, STOPPING) and not server.env.exists():
            raise WingsliteError("Cannot send commands to a stopped server instance.", 502)
        body = self.read_json()
        commands = body.get("commands") if isinstance(body, dict) else None
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise WingsliteError('expected {"commands": ["..."]}', 422)
        for command in commands:
            server.send_command(command)
        return 204, None

    def route_logs(self, server: Server) -> tuple[int, Any]:
        try:
            size = int(self.query.get("size", ["100"])[0])
        except ValueError:
            size = 100
        size = 100 if size <= 0 or size > 100 else size  # Wings clamps to 1..100
        lines = server.logs(size)
        return 200, {"data": lines}

    def route_ws_deny(self, server: Server) -> tuple[int, Any]:
        body = self.read_json()
        jtis = body.get("jtis") if isinstance(body, dict) else None
        if not isinstance(jtis, list) or not all(isinstance(j, str) for j in jtis):
            raise WingsliteError('expected {"jtis": ["..."]}', 422)
        self.server.daemon.revocations.deny_jtis(jtis)
        return 204, None

    def route_deauthorize_user(self) -> tuple[int, Any]:
        body = self.read_json()
        user = body.get("user") if isinstance(body, dict) else None
        servers = body.get("servers") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            raise WingsliteError('expected {"user": "<uuid>", "servers": ["<uuid>", ...]}', 422)
        if servers is not None and (not isinstance(servers, list) or not all(isinstance(s, str) for s in servers)):
            raise WingsliteError("servers must be a list of server uuids", 422)
        self.server.daemon.deauthorize_user(user, servers or None)
        return 204, None

    def route_websocket(self, server: Server) -> tuple[int | None, Any]:
        serve_websocket(self, self.server.daemon, server)
        return None, None


##############################################################################
# daemon
##############################################################################


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ConfigStore:
    """Each server's last good Panel document, one JSON file per server, written atomically."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._digests: dict[str, str] = {}
        self._lock = threading.Lock()

    def path(self, uuid: str) -> Path:
        return self.directory / f"{uuid}.json"

    def save(self, config: ServerConfig) -> bool:
        """Write the document unless the same bytes are already on disk; True when written."""
        data = json.dumps(server_document_json(config), sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self._digests.get(config.uuid) == digest:
                return False
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(config.uuid), data)
        with self._lock:
            self._digests[config.uuid] = digest
        return True

    def load_all(self) -> list[tuple[str, Any]]:
        """``(uuid, document)`` for every readable file; unreadable ones are logged and skipped."""
        found = []
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = path.read_bytes()
                found.append((path.stem, json.loads(data)))
                with self._lock:
                    self._digests[path.stem] = hashlib.sha256(data).hexdigest()
            except (OSError, ValueError) as exc:
                LOG.error("ignoring unreadable saved configuration %s: %s", path, exc)
        return found

    def delete(self, uuid: str) -> None:
        with self._lock:
            self._digests.pop(uuid, None)
        with contextlib.suppress(FileNotFoundError):
            self.path(uuid).unlink()


# Fields whose change needs a new container: they are stored now and take effect at the next start.
_NEXT_START_FIELDS = (
    ("invocation", "startup command"),
    ("environment", "environment variables"),
    ("image", "image"),
    ("allocations", "port bindings"),
    ("mounts", "mounts"),
    ("labels", "labels"),
)


class Server:
    """One game server on this node: its configuration, files, process and sessions' owner.

    Methods for the caller: ``sync()`` (fetch from the Panel and apply), ``apply(config)``,
    ``power(action, wait_s)`` / ``request_power(...)``, ``send_command(line)``, ``logs(n)``,
    ``api_view()``. ``lock`` (re-entrant) serialises syncs and power actions on this server;
    different servers never share a lock.
    """

    def __init__(self, daemon: Daemon, config: ServerConfig):
        self.daemon = daemon
        self.uuid = config.uuid
        self.config = config
        self.lock = threading.RLock()
        self.events = EventBus()
        self.console = LogRing(daemon.config.get("system.websocket_log_count"))
        self.fs = Filesystem(
            daemon.config.data_dir / config.uuid,
            config.disk_limit_bytes,
            daemon.config.get("system.disk_check_interval"),
            quota=daemon.quota,
        )
        self.fs.set_denylist(config.file_denylist)
        self.last_sync: dict[str, Any] | None = None
        self.pending_next_start: dict[str, str] = {}
        self._limits_pending = False
        self._last_state = OFFLINE
        self._last_crash: float | None = None
        self.events.subscribe(self._on_event)
        self.env: Environment = daemon.environment_factory(self)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.env.state

    @property
    def suspended(self) -> bool:
        return self.config.suspended

    def console_message(self, text: str) -> None:
        """A daemon line on the server's console (seen by websockets and in the log ring)."""
        self.events.publish("console output", daemon_message(text))

    def _on_event(self, event: str, *args: Any) -> None:
        if event == "console output" and args:
            self.console.append(args[0])
        elif event == "status" and args:
            previous, self._last_state = self._last_state, args[0]
            self.daemon.record_state(self.uuid, args[0])
            # Crash detection only counts starting/running -> offline; every intentional stop
            # passes through "stopping" first (Wings server/listeners.go).
            if args[0] == OFFLINE and previous in (STARTING, RUNNING):
                threading.Thread(target=self._handle_crash, name=f"wingslite-crash-{self.uuid[:8]}", daemon=True).start()

    # -- the sync ------------------------------------------------------------------------------

    def sync(self) -> dict[str, Any]:
        """Re-read this server from the Panel and make the node match it (SPEC, "The sync")."""
        with self.lock:
            try:
                document = self.daemon.panel.get_server(self.uuid)
            except PanelError as exc:
                if exc.http_status == 404:
                    raise NotFound(
                        f"the Panel no longer knows server {self.uuid} (it answered 404); nothing on this node was changed"
                    ) from None
                raise WingsliteError(
                    f"could not fetch server {self.uuid} from the Panel: {exc.message}; nothing on this node was changed"
                ) from None
            try:
                config = parse_server_document(
                    document,
                    expect_uuid=self.uuid,
                    crash_detection_default=self.daemon.config.get("system.crash_detection.enabled"),
                )
            except DocumentError as exc:
                raise WingsliteError(f"{exc.message}; nothing on this node was changed") from None
            return self.apply(config)

    def apply(self, new: ServerConfig) -> dict[str, Any]:
        """Swap in a validated configuration and apply it; the record says what happened."""
        with self.lock:
            started = time.monotonic()
            old = self.config
            try:
                self.daemon.store.save(new)  # persisted first: if this fails, nothing has changed
            except OSError as exc:
                raise WingsliteError(
                    f"could not save the configuration of server {self.uuid}: {exc}; nothing on this node was changed"
                ) from None
            self.config = new
            applied: list[str] = []
            pending: list[str] = []
            failed: list[str] = []

            try:
                applied.append(f"disk limit {new.disk_limit_bytes} bytes" if new.disk_limit_bytes else "disk limit removed")
                pending_notes = self.fs.set_limit(new.disk_limit_bytes)
                applied.extend(pending_notes)
            except Exception as exc:  # a quota tool failing must not undo the swap
                LOG.exception("server %s: setting the disk limit failed", self.uuid)
                failed.append(f"disk limit: {exc}")
            self.fs.set_denylist(new.file_denylist)

            if new.build != old.build or self._limits_pending:
                try:
                    report = self.env.apply_limits(new)
                except Exception as exc:
                    LOG.exception("server %s: applying resource limits failed", self.uuid)
                    report = LimitReport(failed=[f"resource limits: {exc}"])
                applied += report.applied
                pending += report.pending
                failed += report.failed
                self._limits_pending = bool(report.failed or report.pending)
                if self._limits_pending:
                    self.pending_next_start["resource limits"] = "resource limits"

            for field, label in _NEXT_START_FIELDS:
                if getattr(new, field) != getattr(old, field):
                    self.pending_next_start[field] = label
            if new.process != old.process:
                self.pending_next_start["process"] = "process configuration (stop, done, config files)"
            pending += [f"{label} (next start)" for label in self.pending_next_start.values() if label != "resource limits"]
            if new.crash_detection_enabled != old.crash_detection_enabled:
                applied.append(f"crash detection {'on' if new.crash_detection_enabled else 'off'} (next exit)")

            if new.suspended:
                closed = self.daemon.sessions.close_server(self.uuid, CLOSE_SUSPENDED, "server suspended")
                applied.append(f"suspended: {closed} session(s) closed")
                if self.env.state != OFFLINE:
                    applied.append("suspended: stopping the process")
                    threading.Thread(target=self._stop_suspended, name=f"wingslite-suspend-{self.uuid[:8]}", daemon=True).start()

            record = {
                "at": _now_iso(),
                "result": "failed" if failed else "ok",
                "applied": applied,
                "pending": pending,
                "failed": failed,
                "duration_ms": round((time.monotonic() - started) * 1000, 2),
            }
            self.last_sync = record
            LOG.info("server %s synced: applied %s; pending %s; failed %s", self.uuid, applied, pending or "nothing", failed or "nothing")
            if failed:
                raise WingsliteError(
                    f"the configuration of server {self.uuid} was updated, but not all of it was applied: {'; '.join(failed)}"
                )
            return record

    def _stop_suspended(self) -> None:
        try:
            self.console_message("Server is suspended: stopping the process.")
            self.env.stop(self.config, self.daemon.config.get("wingslite.suspend_stop_grace_s"))
        except Exception:
            LOG.exception("server %s: stopping the suspended server failed", self.uuid)

    # -- power ---------------------------------------------------------------------------------

    def request_power(self, action: str, wait_s: float = 0) -> None:
        """The HTTP form: refuse what is refused now, then run the action in the background (202)."""
        if action in ("start", "restart") and self.config.suspended:
            raise BadRequest("Cannot start or restart a server that is suspended.")
        threading.Thread(target=self._power_logged, args=(action, wait_s), name=f"wingslite-power-{self.uuid[:8]}", daemon=True).start()

    def _power_logged(self, action: str, wait_s: float) -> None:
        try:
            self.power(action, wait_s)
        except WingsliteError as exc:
            LOG.error("server %s: power action %s failed: %s", self.uuid, action, exc.message)
        except Exception:
            LOG.exception("server %s: power action %s failed", self.uuid, action)

    def power(self, action: str, wait_s: float = 0) -> None:
        """Run a power action now. ``wait_s`` 0 tries the lock once (as Wings); kill never waits."""
        if action == "kill":
            self.env.kill()
            return
        if action not in ("start", "stop", "restart"):
            raise WingsliteError(f"attempting to handle unknown power action {action!r}", 422)
        acquired = self.lock.acquire(timeout=wait_s) if wait_s > 0 else self.lock.acquire(blocking=False)
        if not acquired:
            raise Conflict("another power action is currently being processed for this server, please try again later")
        try:
            if action in ("stop", "restart"):
                self.env.stop(self.config, self.daemon.config.get("wingslite.stop_timeout_s"))
            if action in ("start", "restart"):
                self._start()
        finally:
            self.lock.release()

    def _start(self) -> None:
        if self.env.state != OFFLINE:
            raise Conflict("the server is already running")
        try:
            self.sync()  # every start runs the sync first: the Panel is the source of truth
        except WingsliteError as exc:
            self.console_message(f"Unable to sync server data from the Panel, the start was aborted: {exc.message}")
            raise WingsliteError(f"unable to sync server data from Panel instance: {exc.message}", exc.status) from None
        if self.config.suspended:
            self.console_message("This server is suspended and cannot be started.")
            raise BadRequest("server is currently in a suspended state")
        if self.fs.limit_bytes:
            self.console_message("Checking server disk space usage, this could take a few seconds...")
            if not self.fs.has_space() or self.fs.recalculate() > self.fs.limit_bytes:
                self.console_message("Not enough disk space is available to start this server.")
                raise WingsliteError("There is not enough disk space available to perform that action.", 400)
        self.env.start(self.config)
        self.pending_next_start.clear()
        self._limits_pending = False

    def _handle_crash(self) -> None:
        """Restart a crashed server once per ``crash_detection.timeout`` window (Wings server/crash.go)."""
        cfg, node = self.config, self.daemon.config
        if self.env.state != OFFLINE:
            return
        if not cfg.crash_detection_enabled:
            self.console_message("Aborting automatic restart, crash detection is disabled for this instance.")
            return
        exit_code, oom_killed = self.env.exit_status()
        if exit_code == 0 and not oom_killed and not node.get("system.crash_detection.detect_clean_exit_as_crash"):
            return
        self.console_message("---------- Detected server process in a crashed state! ----------")
        self.console_message(f"Exit code: {exit_code}")
        self.console_message(f"Out of memory: {'true' if oom_killed else 'false'}")
        window = node.get("system.crash_detection.timeout")
        now = time.monotonic()
        if window and self._last_crash is not None and now - self._last_crash < window:
            self.console_message(f"Aborting automatic restart, last crash occurred less than {window} seconds ago.")
            return
        self._last_crash = now
        try:
            self.power("start", wait_s=10)
        except Exception as exc:
            LOG.error("server %s: restart after a crash failed: %s", self.uuid, exc)
            self.console_message("Server crash was detected but an error occurred while handling it.")

    # -- console -------------------------------------------------------------------------------

    def send_command(self, line: str) -> None:
        if self.env.state == OFFLINE:
            raise WingsliteError("Cannot send commands to a stopped server instance.", 502)
        self.env.send_command(line)

    def logs(self, lines: int) -> list[str]:
        return self.env.logs(lines) or self.console.tail(lines)

    # -- views ---------------------------------------------------------------------------------

    def utilization(self) -> dict[str, Any]:
        stats = dict(self.env.stats())
        stats.setdefault("network", {"rx_bytes": 0, "tx_bytes": 0})
        stats["state"] = self.state
        stats["disk_bytes"] = self.fs.usage_bytes()
        return stats

    def api_view(self) -> dict[str, Any]:
        """Wings' server object (``GET /api/servers/:server``) plus a ``wingslite`` key."""
        settings = dict(server_document_json(self.config).get("settings") or {})
        settings["crash_detection_enabled"] = self.config.crash_detection_enabled
        return {
            "state": self.state,
            "is_suspended": self.config.suspended,
            "utilization": self.utilization(),
            "configuration": settings,
            "wingslite": {
                "last_sync": self.last_sync,
                "pending_next_start": sorted(self.pending_next_start.values()),
                "environment": self.env.kind,
                "disk": {"limit_bytes": self.fs.limit_bytes, "quota": self.fs.quota.name},
            },
        }


class Daemon:
    """The node: its servers, the HTTP API, SFTP, and the link to the Panel.

    Methods for the caller: ``start()`` / ``stop()`` (or ``serve_forever()`` / ``shutdown()``),
    ``wait_booted(timeout_s)``, ``get_server(uuid)``, ``sync_server(server)``,
    ``create_server(uuid)``, ``delete_server(server)``, ``deauthorize_user(user, servers)``.
    Attributes: ``config``, ``panel``, ``servers``, ``sessions``, ``revocations``, ``http``,
    ``sftp``. Constructor arguments that may be replaced: ``panel`` (a ``PanelClient``),
    ``environment_factory`` (``fn(server) -> Environment``), ``quota`` (a ``QuotaBackend``).
    Two daemons in one process share nothing.
    """

    def __init__(
        self,
        config: Config,
        *,
        panel: PanelClient | None = None,
        environment_factory: Callable[[Server], Environment] | None = None,
        quota: QuotaBackend | None = None,
    ):
        self.config = config
        self.panel = panel or PanelClient.from_config(config)
        self.environment_factory = environment_factory or self._default_environment
        self.quota = quota or QuotaBackend()
        self.servers: dict[str, Server] = {}
        self.sessions = SessionTable()
        self.revocations = Revocations()
        self.store = ConfigStore(config.root_dir / "wingslite" / "servers")
        self.http: ApiServer | None = None
        self.sftp: SftpServer | None = None
        self._servers_lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._states_lock = threading.Lock()
        self._stopping = threading.Event()
        self._booted = threading.Event()
        self._threads: list[threading.Thread] = []

    def _default_environment(self, server: Server) -> Environment:
        return Environment(server.uuid, server.events)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load saved configurations, serve the API, then load every server from the Panel.

        The API answers as soon as the saved configurations are loaded; the Panel is read in the
        background and retried until it answers (``wait_booted()`` waits for it).
        """
        for directory in (self.config.root_dir, self.config.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._load_saved()
        host, port = self.config.get("api.host"), self.config.get("api.port")
        self.http = ApiServer((host, port), self)
        self._spawn(lambda: self.http.serve_forever(poll_interval=0.1), "wingslite-http")
        LOG.info("wingslite %s serving the API on %s:%d", VERSION, host, self.http.server_address[1])
        if not self.config.get("wingslite.sftp_enabled"):
            LOG.info("SFTP is off (wingslite.sftp_enabled is false)")
        elif not sftp_available():
            LOG.warning("SFTP is off: the paramiko package is not installed (pip install paramiko)")
        else:
            self.sftp = SftpServer(self)
            self.sftp.start()
        self._spawn(self._boot_loop, "wingslite-boot")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving. Game servers keep running; the next start re-attaches to them."""
        self._stopping.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.sftp is not None:
            self.sftp.stop()
        for server in self.all_servers():
            with contextlib.suppress(Exception):
                server.env.close()
        for thread in self._threads:
            thread.join(timeout=5)

    serve_forever_poll_s = 0.5

    def serve_forever(self) -> None:
        """``start()`` and block until ``shutdown()``."""
        self.start()
        while not self._stopping.wait(self.serve_forever_poll_s):
            pass

    def shutdown(self) -> None:
        self.stop()

    def wait_booted(self, timeout_s: float | None = None) -> bool:
        """True once every server was loaded from the Panel."""
        return self._booted.wait(timeout_s)

    @property
    def port(self) -> int:
        return self.http.server_address[1] if self.http else 0

    # -- boot ----------------------------------------------------------------------------------

    def _load_saved(self) -> None:
        crash_default = self.config.get("system.crash_detection.enabled")
        for uuid, document in self.store.load_all():
            try:
                config = parse_server_document(document, expect_uuid=uuid, crash_detection_default=crash_default)
            except DocumentError as exc:
                LOG.error("ignoring saved configuration of %s: %s", uuid, exc.message)
                continue
            self._add(Server(self, config))
        self._states = self._read_states()
        if self.servers:
            LOG.info("loaded %d saved server configurations", len(self.servers))

    def _boot_loop(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                self.load_from_panel()
                break
            except PanelError as exc:
                LOG.error(
                    "could not load the servers from the Panel (%s); serving the last saved configurations, retrying in %.0fs",
                    exc.message,
                    delay,
                )
            except Exception:
                LOG.exception("loading the servers from the Panel failed; retrying in %.0fs", delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 60.0)
        self._restore_states()
        with contextlib.suppress(PanelError):
            self.panel.reset_servers()  # as Wings: the Panel clears installs left over from before
        self._booted.set()

    def load_from_panel(self) -> None:
        """Fetch every server of the node; add, update or drop local servers to match."""
        per_page = self.config.get("remote_query.boot_servers_per_page") or 50
        concurrency = self.config.get("wingslite.boot_concurrency")
        last_logged = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last_logged[0] > 1 or done >= total:
                last_logged[0] = time.monotonic()
                LOG.info("loaded %d/%d servers", done, total)

        items = self.panel.list_servers(per_page, concurrency, progress)
        crash_default = self.config.get("system.crash_detection.enabled")
        seen = set()
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise DocumentError("a list item is not an object")
                document = {"settings": item.get("settings"), "process_configuration": item.get("process_configuration")}
                config = parse_server_document(document, crash_detection_default=crash_default)
            except DocumentError as exc:
                LOG.error("skipping a server the Panel listed: %s", exc.message)
                continue
            seen.add(config.uuid)
            existing = self.servers.get(config.uuid)
            try:
                if existing is None:
                    self.store.save(config)
                    self._add(Server(self, config))
                elif config.document != existing.config.document:
                    existing.apply(config)
            except Exception as exc:  # one server's fault never stops the boot
                LOG.error("server %s: could not be loaded: %s", config.uuid, exc)
        for uuid in set(self.servers) - seen:
            LOG.warning("server %s is no longer on this node according to the Panel; dropping it", uuid)
            server = self.servers.pop(uuid)
            server.env.close()
            self.store.delete(uuid)

    def _add(self, server: Server) -> None:
        with self._servers_lock:
            self.servers[server.uuid] = server

    # -- states (which servers were running, for the next boot) -----------------------------

    def _states_path(self) -> Path:
        return self.config.root_dir / "states.json"

    def _read_states(self) -> dict[str, str]:
        try:
            states = json.loads(self._states_path().read_bytes())
            return {k: v for k, v in states.items() if isinstance(k, str) and v in (OFFLINE, STARTING, RUNNING, STOPPING)}
        except (OSError, ValueError, AttributeError):
            return {}

    def record_state(self, uuid: str, state: str) -> None:
        with self._states_lock:
            if self._states.get(uuid) == state:
                return
            self._states[uuid] = state
            data = json.dumps(self._states, sort_keys=True).encode()
            with contextlib.suppress(OSError):
                atomic_write(self._states_path(), data)

    def _restore_states(self) -> None:
        """Re-attach to running containers; start servers that were running and are not."""
        previous = dict(self._states)
        for server in self.all_servers():
            try:
                if server.env.attach_if_running(server.config):
                    continue
                if previous.get(server.uuid) in (STARTING, RUNNING) and not server.config.suspended:
                    server.request_power("start", 30)
            except Exception as exc:
                LOG.error("server %s: restoring its state failed: %s", server.uuid, exc)

    # -- servers -------------------------------------------------------------------------------

    def all_servers(self) -> list[Server]:
        with self._servers_lock:
            return list(self.servers.values())

    def get_server(self, uuid: str) -> Server:
        server = self.servers.get(uuid)
        if server is None:
            raise NotFound("The requested resource does not exist on this instance.")
        return server

    def sync_server(self, server: Server) -> dict[str, Any]:
        """``POST /api/servers/:server/sync``: waits its turn on the server's lock, then syncs."""
        if not server.lock.acquire(timeout=max(1.0, float(self.config.get("remote_query.timeout")))):
            raise Conflict("another sync or power action is still running on this server; try again")
        try:
            return server.sync()
        finally:
            server.lock.release()

    def create_server(self, uuid: str, start_on_completion: bool = False) -> Server:
        """``POST /api/servers``: fetch the configuration, make the directory, register the server."""
        if uuid in self.servers:
            raise Conflict(f"server {uuid} already exists on this node")
        try:
            document = self.panel.get_server(uuid)
        except PanelError as exc:
            if exc.http_status == 404:
                raise NotFound(f"the Panel does not know server {uuid}") from None
            raise WingsliteError(f"could not fetch server {uuid} from the Panel: {exc.message}") from None
        try:
            config = parse_server_document(
                document, expect_uuid=uuid, crash_detection_default=self.config.get("system.crash_detection.enabled")
            )
        except DocumentError as exc:
            raise WingsliteError(exc.message) from None
        try:
            self.store.save(config)
        except OSError as exc:
            raise WingsliteError(f"could not save the configuration of server {uuid}: {exc}") from None
        server = Server(self, config)
        server.fs.ensure()
        with self._servers_lock:
            if uuid in self.servers:
                raise Conflict(f"server {uuid} already exists on this node")
            self.servers[uuid] = server
        LOG.info("server %s created", uuid)
        if start_on_completion:
            server.request_power("start", 30)
        return server

    def delete_server(self, server: Server) -> None:
        """``DELETE /api/servers/:server``: close its sessions, remove its container, files, config."""
        if not server.lock.acquire(timeout=30):
            raise Conflict("another sync or power action is still running on this server; try again")
        try:
            self.sessions.close_server(server.uuid, CLOSE_SERVER_DELETED, "server deleted")
            server.env.destroy()
            with self._servers_lock:
                self.servers.pop(server.uuid, None)
            self.store.delete(server.uuid)
            server.env.close()
        finally:
            server.lock.release()
        threading.Thread(target=_remove_tree, args=(server.fs.root,), name="wingslite-rm", daemon=True).start()
        LOG.info("server %s deleted", server.uuid)

    def deauthorize_user(self, user_uuid: str, server_uuids: list[str] | None = None) -> int:
        """Close a user's websockets and SFTP sessions now and refuse their older tokens."""
        self.revocations.revoke_user(user_uuid, server_uuids)
        return self.sessions.close_user(user_uuid, server_uuids, CLOSE_REVOKED, "access revoked")

    def system_info(self, detailed: bool = False) -> dict[str, Any]:
        machine = platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        info: dict[str, Any] = {
            "architecture": arch,
            "cpu_count": os.cpu_count() or 1,
            "kernel_version": platform.release(),
            "os": "linux",
            "version": VERSION,
        }
        info["wingslite"] = {
            "servers": len(self.servers),
            "booted": self._booted.is_set(),
            "disk_quota": {"backend": self.quota.name, "reason": self.quota.reason},
            "sftp": bool(self.sftp),
        }
        return info


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.error("could not remove %s: %s", path, exc)


##############################################################################
# CLI
##############################################################################

_DEMO_EGG_PROCESS = {
    "startup": {"done": ["Server ready"], "user_interaction": [], "strip_ansi": False},
    "stop": {"type": "command", "value": "stop"},
    "configs": [],
}


def demo_document(uuid: str, name: str, memory_mb: int, image: str = "wingslite-test:latest") -> dict[str, Any]:
    """A Panel server document as the Panel builds it (panel-contract.md §1.4), for the demo."""
    startup = 'echo Server ready; while read line; do [ "$line" = stop ] && exit 0; echo "> $line"; done'
    return {
        "settings": {
            "uuid": uuid,
            "meta": {"name": name, "description": ""},
            "suspended": False,
            "environment": {"STARTUP": startup, "P_SERVER_LOCATION": "demo", "P_SERVER_UUID": uuid, "P_SERVER_ALLOCATION_LIMIT": 0},
            "invocation": startup,
            "skip_egg_scripts": False,
            "build": {
                "memory_limit": memory_mb,
                "swap": 0,
                "io_weight": 500,
                "cpu_limit": 100,
                "threads": None,
                "disk_space": 1024,
                "oom_disabled": True,
            },
            "container": {"image": image, "oom_disabled": True, "requires_rebuild": False},
            "allocations": {"force_outgoing_ip": False, "default": {"ip": "127.0.0.1", "port": 25565}, "mappings": {"127.0.0.1": [25565]}},
            "mounts": [],
            "egg": {"id": "5a0f2c1e-7b3d-4c8e-9f60-2d1e3a4b5c6d", "file_denylist": []},
        },
        "process_configuration": copy.deepcopy(_DEMO_EGG_PROCESS),
    }


class DemoPanel:
    """A tiny stand-in for the Panel's remote API on loopback, for ``--demo``.

    It serves ``GET /api/remote/servers[/{uuid}]``, ``POST /api/remote/servers/reset`` and
    ``POST /api/remote/sftp/auth`` (user ``demo``, password ``demo``) like the Panel, plus
    ``POST /demo/servers/{uuid}`` which merges a JSON object into a server's ``settings`` so that
    a sync has something to pick up.
    """

    def __init__(self, token_id: str, token: str, documents: list[dict[str, Any]]):
        self.token_id, self.token = token_id, token
        self.documents = {d["settings"]["uuid"]: d for d in documents}
        self.lock = threading.Lock()
        panel = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.path.startswith("/demo/"):
                    return True
                if self.headers.get("Authorization") == f"Bearer {panel.token_id}.{panel.token}":
                    return True
                self._send(
                    403,
                    {
                        "errors": [
                            {
                                "code": "AccessDeniedHttpException",
                                "status": "403",
                                "detail": "You are not authorized to access this resource.",
                            }
                        ]
                    },
                )
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                path = urllib.parse.urlsplit(self.path).path
                with panel.lock:
                    if path == "/api/remote/servers":
                        data = [{"uuid": u, **copy.deepcopy(d)} for u, d in panel.documents.items()]
                        n = len(data)
                        meta = {"current_page": 1, "from": 1 if n else None, "last_page": 1, "per_page": 50, "to": n or None, "total": n}
                        return self._send(200, {"data": data, "links": {}, "meta": meta})
                    uuid = path.rsplit("/", 1)[-1]
                    if path.startswith("/api/remote/servers/") and uuid in panel.documents:
                        return self._send(200, panel.documents[uuid])
                self._send(404, {"errors": [{"code": "RecordNotFoundException", "status": "404", "detail": ""}]})

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                path = urllib.parse.urlsplit(self.path).path
                if path == "/api/remote/servers/reset":
                    return self._send(204)
                if path == "/api/remote/sftp/auth":
                    user, _, short = str(body.get("username", "")).rpartition(".")
                    match = [u for u in panel.documents if u.startswith(short) and short]
                    if user == "demo" and body.get("password") == "demo" and match:
                        return self._send(200, {"server": match[0], "user": "00000000-0000-4000-8000-000000000000", "permissions": ["*"]})
                    return self._send(
                        403,
                        {
                            "errors": [
                                {
                                    "code": "HttpForbiddenException",
                                    "status": "403",
                                    "detail": "Authorization credentials were not correct, please try again.",
                                }
                            ]
                        },
                    )
                uuid = path.rsplit("/", 1)[-1]
                if path.startswith("/demo/servers/") and uuid in panel.documents and isinstance(body, dict):
                    with panel.lock:
                        settings = panel.documents[uuid]["settings"]
                        for key, value in body.items():
                            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                                settings[key].update(value)
                            else:
                                settings[key] = value
                        return self._send(200, panel.documents[uuid])
                self._send(
                    404,
                    {
                        "errors": [
                            {
                                "code": "NotFoundHttpException",
                                "status": "404",
                                "detail": "The requested resource could not be found on the server.",
                            }
                        ]
                    },
                )

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="wingslite-demo-panel", daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _demo(args: Any) -> int:
    import secrets
    import tempfile

    token_id, token = secrets.token_hex(8), secrets.token_hex(32)
    servers = [demo_document(str(uuidlib.uuid4()), "Demo Survival", 1024), demo_document(str(uuidlib.uuid4()), "Demo Creative", 2048)]
    panel = DemoPanel(token_id, token, servers)
    panel.start()
    root = Path(tempfile.mkdtemp(prefix="wingslite-demo-"))
    raw = {
        "uuid": str(uuidlib.uuid4()),
        "token_id": token_id,
        "token": token,
        "remote": panel.url,
        "api": {"host": "127.0.0.1", "port": args.port},
        "system": {
            "root_directory": str(root),
            "data": str(root / "volumes"),
            "sftp": {"bind_address": "127.0.0.1", "bind_port": args.sftp_port},
        },
        "remote_query": {"timeout": 5},
    }
    daemon = Daemon(Config(raw, "--demo"))
    daemon.start()
    daemon.wait_booted(10)
    base = f"http://127.0.0.1:{daemon.port}"
    first = servers[0]["settings"]["uuid"]
    auth = f"-H 'Authorization: Bearer {token}'"
    print(
        f"""
wingslite {VERSION} demo: the daemon is on {base}, its demo Panel on {panel.url}
data directory: {root}
node token: {token}

  curl -s {auth} {base}/api/servers | python3 -m json.tool
  # change the server's memory and disk on the (demo) Panel, then sync the node:
  curl -s -X POST -d '{{"build": {{"memory_limit": 4096, "disk_space": 2048}}}}' {panel.url}/demo/servers/{first} >/dev/null
  curl -si -X POST {auth} {base}/api/servers/{first}/sync
  curl -s {auth} {base}/api/servers/{first} | python3 -m json.tool
  # suspend it (every websocket and SFTP session of the server is closed by the sync):
  curl -s -X POST -d '{{"suspended": true}}' {panel.url}/demo/servers/{first} >/dev/null
  curl -si -X POST {auth} {base}/api/servers/{first}/sync

Press Ctrl-C to stop.""",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        daemon.stop()
        panel.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``wingslite.py [--config PATH] [--demo] [--debug] [--version]``."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="wingslite", description="A Pterodactyl node daemon in one file.")
    parser.add_argument("--config", help="the node's config.yml (default: /etc/pterodactyl/config.yml, else ./wingslite.yml)")
    parser.add_argument("--demo", action="store_true", help="run against an embedded demo Panel on loopback")
    parser.add_argument("--port", type=int, default=8080, help="API port for --demo (default 8080)")
    parser.add_argument("--sftp-port", type=int, default=2022, help="SFTP port for --demo (default 2022)")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"wingslite {VERSION}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.demo:
        return _demo(args)
    path = args.config or next(
        (p for p in ("/etc/pterodactyl/config.yml", "wingslite.yml") if Path(p).exists()), "/etc/pterodactyl/config.yml"
    )
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"wingslite: {exc.message}", file=sys.stderr)
        return 2
    if config.get("debug"):
        logging.getLogger().setLevel(logging.DEBUG)
    daemon = Daemon(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        daemon.start()
    except OSError as exc:
        print(f"wingslite: cannot start: {exc}", file=sys.stderr)
        return 1
    while not stop.wait(1):
        pass
    LOG.info("shutting down")
    daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
