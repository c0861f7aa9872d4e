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
    filesystem and disk    ``atomic_write``, ``Filesystem`` (disk limit, usage, denylist), ``Jail``
                           (paths that cannot leave a server's directory), quota backends
                           (``BtrfsQuota``, ``ProjectQuota``, soft) and ``select_quota_backend``
    environments           ``Environment`` (where a process runs), ``LimitReport``, ``Cgroup``
                           (v1/v2 files), ``DockerEnvironment`` (containers, live limits, stats)
    console and events     ``EventBus``, ``LogRing``, ``LineSplitter``, ``ConsoleThrottle``,
                           ``ConsolePipeline`` (done detection)
    session table          ``SessionTable``: every websocket and SFTP session; ``Revocations``
    websocket              ``WebSocket`` (RFC 6455), ``decode_jwt``, ``ConsoleSocket`` (Wings'
                           console protocol), ``serve_websocket``
    SFTP                   ``SftpServer`` (paramiko): Panel-checked logins, the jail, metered writes
    HTTP API               ``ApiServer`` / ``ApiHandler``: routes, auth, CORS, JSON errors
    daemon                 ``ConfigStore``, ``Server`` (one game server: its lock, the sync, power,
                           crash detection), ``Daemon`` (boot, servers, system info)
    CLI                    ``main()``, ``--demo`` and its ``DemoPanel``

Where to look first:

    what happens on sync     ``Server.sync()`` -> ``Server.apply()`` (daemon section)
    a start                  ``Server.power()`` -> ``Server._start()`` -> ``DockerEnvironment.start()``
    limits on a live server  ``DockerEnvironment.apply_limits()`` and ``Cgroup``
    suspension               ``Server.apply()`` -> ``SessionTable.close_server()``
"""

from __future__ import annotations

import base64
import codecs
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import hmac
import http.client
import http.server
import json
import logging
import math
import os
import platform
import posixpath
import random
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# constants and errors #############################################################################

VERSION = "0.1.0"
LOG = logging.getLogger("wingslite")

# Wings' server states (environment/environment.go).
OFFLINE, STARTING, RUNNING, STOPPING = "offline", "starting", "running", "stopping"

# Websocket close codes wingslite uses beyond RFC 6455's own.
CLOSE_SUSPENDED = 4409  # the Panel's browser client stops reconnecting on 4409 (panel#5464)
CLOSE_REVOKED = 4401
CLOSE_SERVER_DELETED = 1001

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)


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
            text = (
                f"{what}: the Panel answered HTTP {http_status} ({code}: {detail or 'no detail'})"
            )
        else:
            text = f"{what}: {detail}"
        super().__init__(text, 500)


# config ###########################################################################################

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
    ("system.username", str, "pterodactyl"),
    ("system.user.uid", int, -1),  # -1: not set (the user's, else WINGS_UID, else 988)
    ("system.user.gid", int, -1),
    ("system.user.rootless.enabled", bool, False),
    ("system.user.rootless.container_uid", int, 0),
    ("system.user.rootless.container_gid", int, 0),
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
    ("docker.installer_limits.memory", int, 1024),
    ("docker.installer_limits.cpu", int, 100),
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
    ("wingslite.sftp_max_connections", int, 64),
    ("wingslite.websocket_max_per_server", int, 30),
)

_CHOICES = {
    "wingslite.disk_quota": ("auto", "btrfs", "project", "soft", "off"),
}

_NON_NEGATIVE = {
    "api.port",
    "system.sftp.bind_port",
    "system.disk_check_interval",
    "system.websocket_log_count",
    "system.crash_detection.timeout",
    "docker.tmpfs_size",
    "docker.container_pid_limit",
    "docker.installer_limits.memory",
    "docker.installer_limits.cpu",
    "system.user.rootless.container_uid",
    "system.user.rootless.container_gid",
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
    "wingslite.sftp_max_connections",
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
            raise ConfigError(
                f"{source}: the top level must be a mapping of keys, not {type(raw).__name__}"
            )
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
            raise ConfigError(
                f"{source}: remote: expected the Panel's http(s) URL, got {values['remote']!r}"
            )
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
        raise ConfigError(
            f"{source}: {key}: expected {names}, got {type(value).__name__} {value!r}"
        )
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{source}: {key}: must not be negative, got {value}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(
            f"{source}: {key}: must be one of {', '.join(_CHOICES[key])}, got {value!r}"
        )
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
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None
    return Config(raw if raw is not None else {}, str(path))


@dataclasses.dataclass(frozen=True)
class NodeUser:
    """Who owns the servers' files on the host (``uid``, ``gid``) and who their processes run as
    inside containers (``container_user``, Docker's ``uid:gid``). ``note`` says where it came from.
    """

    name: str
    uid: int
    gid: int
    container_user: str
    exists: bool
    note: str


def resolve_node_user(config: Config, environ: Mapping[str, str] | None = None) -> NodeUser:
    """The node's user, as Wings settles it at boot (config/config.go ``EnsurePterodactylUser``).

    ``system.user.uid``/``gid`` when set; else the host's user ``system.username``; else
    ``WINGS_UID``/``WINGS_GID`` (default 988:988, what Wings uses in containers). Unlike Wings,
    a missing user is not created (no ``useradd`` from a daemon): the numbers are used as they are.
    Rootless (``system.user.rootless.enabled``): files are this process's, and containers run as
    ``rootless.container_uid:container_gid``, as Wings does.
    """
    import pwd  # POSIX only; the daemon needs Linux anyway

    environ = os.environ if environ is None else environ
    name = config.get("system.username")
    if config.get("system.user.rootless.enabled"):
        uid, gid = os.getuid(), os.getgid()
        inside = (
            f"{config.get('system.user.rootless.container_uid')}:"
            f"{config.get('system.user.rootless.container_gid')}"
        )
        return NodeUser(name, uid, gid, inside, True, "rootless: this process's own user")
    uid, gid = config.get("system.user.uid"), config.get("system.user.gid")
    note = "system.user.uid/gid"
    if uid < 0 or gid < 0:
        try:
            entry = pwd.getpwnam(name)
            uid, gid, note = entry.pw_uid, entry.pw_gid, f"the host's user {name}"
        except KeyError:
            try:
                uid = int(environ.get("WINGS_UID") or 988)
                gid = int(environ.get("WINGS_GID") or 988)
            except ValueError:
                raise ConfigError("WINGS_UID and WINGS_GID must be numbers") from None
            note = "WINGS_UID/WINGS_GID" if environ.get("WINGS_UID") else "Wings' default"
    try:
        pwd.getpwuid(uid)
        exists = True
    except KeyError:
        exists = False
    return NodeUser(name, uid, gid, f"{uid}:{gid}", exists, note)


# Panel client #####################################################################################


class PanelClient:
    """The Panel's remote API (``{remote}/api/remote/...``), as Wings calls it.

    Methods for the caller: ``get_server(uuid)``, ``list_servers()``, ``sftp_auth(...)``,
    ``get_install_script(uuid)``, ``set_install_status(...)``, ``reset_servers()``. Every call
    sends Wings' headers; 2xx answers are decoded JSON; a 4xx is final; 5xx, timeouts and
    connection errors are retried with exponential backoff until the total budget
    (``remote_query.timeout``) runs out. Every failure is a ``PanelError``.

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
        doc = self.request(
            "GET", f"/servers/{urllib.parse.quote(uuid, safe='')}", budget_s=budget_s
        )
        if not isinstance(doc, dict):
            raise PanelError(200, "_BadShape", "expected a JSON object", f"GET /servers/{uuid}")
        return doc

    def list_servers(
        self,
        per_page: int = 50,
        concurrency: int = 8,
        progress: Callable[[int, int], None] | None = None,
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
            with concurrent.futures.ThreadPoolExecutor(
                max(1, concurrency), "wingslite-page"
            ) as pool:
                for page in pool.map(lambda n: self._page(n, per_page), range(start, last + 1)):
                    items.extend(page["data"])
                    if progress:
                        progress(len(items), total or len(items))
        return items

    def sftp_auth(
        self,
        kind: str,
        username: str,
        password: str,
        ip: str,
        session_id: bytes = b"",
        client_version: bytes = b"",
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
        if (
            not isinstance(answer, dict)
            or not isinstance(answer.get("server"), str)
            or not isinstance(answer.get("user"), str)
        ):
            raise PanelError(
                200, "_BadShape", "expected {server, user, permissions}", "POST /sftp/auth"
            )
        return answer

    def get_install_script(self, uuid: str) -> dict[str, str]:
        """``GET /servers/{uuid}/install``: the egg's install image, entrypoint and script.

        ``PanelError`` when the answer lacks any of them (the Panel sends ``script: null`` for an
        egg without one: there is nothing to install with).
        """
        what = f"GET /servers/{uuid}/install"
        doc = self.request("GET", f"/servers/{urllib.parse.quote(uuid, safe='')}/install")
        if not isinstance(doc, dict):
            raise PanelError(200, "_BadShape", "expected a JSON object", what)
        for key in ("container_image", "entrypoint", "script"):
            if not isinstance(doc.get(key), str) or not doc[key].strip():
                raise PanelError(200, "_BadShape", f"the egg has no install {key}", what)
        return {k: doc[k] for k in ("container_image", "entrypoint", "script")}

    def set_install_status(self, uuid: str, successful: bool, reinstall: bool) -> None:
        """``POST /servers/{uuid}/install``: how the (re)install ended (ServerInstallController)."""
        body = {"successful": successful, "reinstall": reinstall}
        self.request("POST", f"/servers/{urllib.parse.quote(uuid, safe='')}/install", body=body)

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
            if (
                not isinstance(meta.get(key), int)
                or isinstance(meta.get(key), bool)
                or meta[key] < 1
            ):
                raise PanelError(200, "_BadShape", f"meta.{key} is not a page number", what)
        return doc

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        budget_s: float | None = None,
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

    def _attempt(
        self, method: str, url: str, data: bytes | None, timeout_s: float, what: str
    ) -> Any:
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
            raise _Retryable(
                PanelError(0, "_Timeout", f"the Panel did not answer within {timeout_s:.1f}s", what)
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(
                PanelError(
                    0, "_Unreachable", f"could not reach the Panel at {self.base}: {reason}", what
                )
            ) from None
        if not 200 <= status < 300:
            raise _Retryable(PanelError(status, "_Unexpected", "unexpected status", what))
        if len(raw) > self.max_document_bytes:
            raise PanelError(
                status,
                "_TooLarge",
                f"the answer is larger than {self.max_document_bytes} bytes",
                what,
            )
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise PanelError(
                status, "_InvalidJSON", f"the answer is not valid JSON ({str(exc)[:80]})", what
            ) from None


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


# server model #####################################################################################
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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise self.fail(f"expected a number, got {_json_type(value)} {json.dumps(value)[:40]}")
        number = round_half_away(value) if isinstance(value, float) else value
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"must be {bounds}, got {json.dumps(value)}")
        return number


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


_THREADS_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")

# A real Panel document is about six levels deep. Deeper ones are refused before anything
# recursive (deepcopy, json.dumps) sees them: nesting of a few hundred levels parses as JSON
# but would exhaust the interpreter's recursion limit further on.
_MAX_DOCUMENT_DEPTH = 64


def _check_depth(document: Any, limit: int = _MAX_DOCUMENT_DEPTH) -> None:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise DocumentError(
                f"the Panel's server document is invalid: it is nested deeper than {limit} levels"
            )
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


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


def parse_server_document(
    document: Any, *, expect_uuid: str | None = None, crash_detection_default: bool = True
) -> ServerConfig:
    """Validate the Panel's ``{"settings", "process_configuration"}`` document as a whole.

    Raises ``DocumentError`` naming the first field that is refused; returns a ``ServerConfig``
    only when every field is acceptable, so a caller can swap configurations all or nothing.
    """
    root = _Doc(document, "document")
    root.obj(required=True)
    _check_depth(document)
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
            raise _Doc(value, f"{env_doc.path}.{key}").fail(
                f"expected a string or number, got {_json_type(value)}"
            )
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
        parsed = tuple(
            _Doc(p, f"{port_doc.path}[{i}]").int(lo=1, hi=65535)
            for i, p in enumerate(port_doc.list())
        )
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
        mounts.append(
            Mount(
                md.at("source").str(required=True),
                md.at("target").str(required=True),
                md.at("read_only").bool(),
            )
        )

    egg = settings.at("egg")
    egg_obj = egg.obj()
    deny_doc = _Doc(egg_obj.get("file_denylist"), f"{egg.path}.file_denylist")
    denylist = tuple(
        _Doc(p, f"{deny_doc.path}[{i}]").str(required=True) for i, p in enumerate(deny_doc.list())
    )

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
        crash_detection_enabled=settings.at("crash_detection_enabled").bool(
            crash_detection_default
        ),
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
    done = tuple(
        _Doc(d, f"{done_doc.path}[{i}]").str(required=True) for i, d in enumerate(done_list)
    )
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
            replaces.append(
                Replacement(
                    rdoc.at("match").str(required=True),
                    with_value,
                    None if if_value is None else str(if_value),
                )
            )
        configs.append(
            ConfigFile(
                cd.at("file").str(required=True), cd.at("parser").str("file"), tuple(replaces)
            )
        )
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
        table = sorted(
            (int(k), float(v)) for k, v in config.get("docker.overhead.multipliers").items()
        )
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
        "MemorySwap": memory_swap_bytes(build, config)
        if memory
        else (-1 if build.swap_mb < 0 else 0),
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


# filesystem and disk ##############################################################################


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
    notes for the sync record), ``usage_bytes(root)`` (``None`` when the backend cannot tell),
    ``enforced(root)`` (True when the kernel holds this directory to its limit).
    Class variables: ``name`` and ``reason`` (why this backend is in force, for ``/api/system``),
    ``stops_running_servers`` (stop a running server over its limit that no kernel quota holds).
    The backends are at the end of this section.
    """

    name = "soft"
    reason = "no kernel quota in force: the daemon's own write paths check the limit, and a server over it is stopped"
    stops_running_servers = True

    def prepare(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)

    def set_limit(self, root: Path, limit_bytes: int) -> list[str]:
        return []

    def usage_bytes(self, root: Path) -> int | None:
        return None

    def enforced(self, root: Path) -> bool:
        return False


class Filesystem:
    """One server's data directory, its disk limit and its usage accounting.

    Methods for the caller: ``set_limit(limit_bytes)``, ``usage_bytes(allow_stale=True)``,
    ``recalculate()``, ``has_space(n_bytes)``, ``reserve(n_bytes)``, ``add_usage(delta_bytes)``,
    ``set_denylist(patterns)``, ``is_denied(relpath)``, ``jail()``, ``chown_all(budget_s)``.
    ``owner`` (``(uid, gid)`` or None) is the node user every file the daemon makes belongs to.

    Usage is the apparent size of every regular file under the root (as Wings), cached for
    ``check_interval_s`` seconds; a stale read returns the cached figure at once and refreshes in the
    background, so no caller (boot included) waits on a walk unless it asks to. Metered writers
    call ``reserve()`` before each write, which checks and books the bytes in one step.
    """

    def __init__(
        self,
        root: Path,
        limit_bytes: int = 0,
        check_interval_s: float = 150,
        quota: QuotaBackend | None = None,
        owner: tuple[int, int] | None = None,
    ):
        self.root = Path(root)
        self.check_interval_s = check_interval_s
        self.quota = quota or QuotaBackend()
        self.owner = owner
        self._limit = max(0, limit_bytes)
        self._usage = 0
        self._measured_at: float | None = None
        self._lock = threading.Lock()
        self._walking = False
        self._booked_total = 0  # every byte ever booked or freed, so a walk can add what raced it
        self._quota_limit: int | None = None  # the limit the quota backend last accepted
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
            self._quota_limit = self._limit
            if self.owner is not None:
                os.chown(self.root, *self.owner, follow_symlinks=False)

    def jail(self) -> Jail:
        """A ``Jail`` on this directory with its denylist; what it creates belongs to ``owner``."""
        return Jail(self.root, is_denied=self.is_denied, owner=self.owner)

    def chown_all(self, budget_s: float = 60.0) -> tuple[int, bool]:
        """Give every file and directory beneath the root to ``owner``; ``(entries, finished)``.

        Walks by directory fd and changes each entry with no-follow semantics, so a symlink the
        game made is changed itself and never leads the walk (or the chown) out of the directory.
        Stops after ``budget_s`` so that a huge tree cannot hold a start forever (Wings chowns
        everything before each start, system.check_permissions_on_boot).
        """
        if self.owner is None or not self.root.is_dir():
            return 0, True
        uid, gid = self.owner
        deadline = time.monotonic() + budget_s
        count = 0
        os.chown(self.root, uid, gid, follow_symlinks=False)
        for _, dirs, files, dir_fd in os.fwalk(self.root, follow_symlinks=False):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                count += 1
            if time.monotonic() > deadline:
                return count, False
        return count, True

    def set_limit(self, limit_bytes: int) -> list[str]:
        """The new limit governs the next write at once; the quota backend gets it too."""
        with self._lock:
            self._limit = max(0, limit_bytes)
        notes: list[str] = []
        # The quota backend is only asked when its limit changes: a sync that changes nothing
        # costs no quota tool call (btrfs takes ~13 ms a call).
        if self.root.is_dir() and self._quota_limit != self._limit:
            notes = list(self.quota.set_limit(self.root, self._limit))
            self._quota_limit = self._limit
        usage = self.usage_bytes()
        if self._limit and usage > self._limit:
            notes.append(
                f"disk usage {usage} bytes is over the new limit of {self._limit} bytes: writes are refused"
            )
        return notes

    def usage_bytes(self, allow_stale: bool = True) -> int:
        quota_usage = self.quota.usage_bytes(self.root)
        if quota_usage is not None:
            with self._lock:  # reserve() books on top of the kernel's figure
                self._usage, self._measured_at = quota_usage, time.monotonic()
            return quota_usage
        with self._lock:
            fresh = (
                self._measured_at is not None
                and time.monotonic() - self._measured_at < self.check_interval_s
            )
            if fresh or (allow_stale and self._measured_at is not None):
                if not fresh and not self._walking:
                    self._walking = True
                    threading.Thread(
                        target=self._background_walk, name="wingslite-du", daemon=True
                    ).start()
                return self._usage
        if allow_stale:
            # Never measured: answer 0 now, measure in the background (boot must not wait on walks).
            with self._lock:
                if not self._walking:
                    self._walking = True
                    threading.Thread(
                        target=self._background_walk, name="wingslite-du", daemon=True
                    ).start()
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
        """Walk the directory now (lstat, symlinks not followed) and cache the figure.

        Bytes booked or freed while the walk runs are added to its result: a write that raced the
        walk may be counted twice until the next walk, never zero times.
        """
        with self._lock:
            booked_at_start = self._booked_total
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
            self._usage = max(0, total + self._booked_total - booked_at_start)
            self._measured_at = time.monotonic()
            return self._usage

    def has_space(self, n_bytes: int = 0) -> bool:
        """True when ``n_bytes`` more still fit (usage == limit is allowed, as Wings)."""
        if self._limit == 0:
            return True
        return self.usage_bytes() + max(0, n_bytes) <= self._limit

    def reserve(self, n_bytes: int) -> bool:
        """Book ``n_bytes`` against the limit if they fit; False (nothing booked) if they do not."""
        if n_bytes <= 0:
            return True
        if self._limit and self._measured_at is None and self.quota.usage_bytes(self.root) is None:
            self.recalculate()  # the first metered write of a never-measured server waits for a real figure
        else:
            self.usage_bytes()
        with self._lock:
            if self._limit and self._usage + n_bytes > self._limit:
                return False
            self._usage += n_bytes
            self._booked_total += n_bytes
            return True

    def add_usage(self, delta_bytes: int) -> None:
        with self._lock:
            self._usage = max(0, self._usage + delta_bytes)
            self._booked_total += delta_bytes

    def set_denylist(self, patterns: Iterable[str]) -> None:
        """The egg's ``file_denylist`` (gitignore-like globs) that no file operation may touch."""
        patterns = tuple(
            p.strip() for p in patterns if p and p.strip() and not p.strip().startswith("#")
        )
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


# -- the path jail ------------------------------------------------------------------------------
#
# A client's path (SFTP today) names something beneath a server's directory, and nothing else:
# not through "..", not through an absolute path, not through a symlink the game server made,
# not through one swapped in while an operation runs.


class PathEscape(PermissionError):
    """A path that would leave the jail (``..`` above the root, an absolute symlink, a NUL byte)."""

    def __init__(self, what: str):
        super().__init__(errno.EACCES, f"path escapes the server directory: {what}")


@dataclasses.dataclass(frozen=True)
class _Where:
    dir_fd: int  # the directory that holds ``name`` (or the target itself when ``name`` is None)
    name: str | None
    relpath: str  # the resolved path, relative to the jail root ("" for the root)


class Jail:
    """Every path resolved beneath one directory, never through a symlink that leads out of it.

    Methods for the caller (paths as a client writes them; ``/`` is the jail's root, ``..`` may not
    climb above it): ``normalize``, ``resolve``, ``open``, ``stat``, ``lstat``, ``listdir``,
    ``mkdir``, ``rmdir``, ``remove``, ``rename``, ``symlink``, ``readlink``, ``chmod``, ``chown``,
    ``utime``, ``close``. Errors are ``OSError``; escapes are ``PathEscape`` (EACCES).
    ``is_denied(relpath)`` (the egg's ``file_denylist``) is asked about the path as written and the
    path a symlink resolves to; a match is refused (EACCES) before any operation.

    Class variables that may be overridden: ``max_symlinks``, ``max_entries``.

    How: the root is held open as a directory fd. A path is cleaned lexically, then walked one
    component at a time with ``os.open(name, O_NOFOLLOW | O_DIRECTORY, dir_fd=parent)``, so the
    kernel never follows a symlink on our behalf. A symlink met on the way is read and its target
    spliced into the rest of the walk -- ``..`` pops our own stack of directory fds and may not pop
    the root, an absolute target is refused -- which is what ``openat2(RESOLVE_BENEATH)`` does. The
    last component is always operated on with no-follow semantics (``O_NOFOLLOW``,
    ``follow_symlinks=False``), so a symlink swapped in after the walk looked fails with ELOOP or
    acts on the link itself; it is never followed. (``realpath`` and a prefix compare would race.)
    """

    max_symlinks = 40
    max_entries = 100_000  # a listing larger than this is refused rather than built in memory

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(
        self,
        root: str | os.PathLike[str],
        is_denied: Callable[[str], bool] | None = None,
        owner: tuple[int, int] | None = None,
    ):
        self.root = os.fspath(root)
        self.is_denied = is_denied
        self.owner = owner  # (uid, gid) given to every file, directory and link the jail creates
        self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Jail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ---------------------------------------------------------------------------------

    @staticmethod
    def parts(path: str) -> list[str]:
        """``path`` cleaned lexically into components; ``PathEscape`` if it climbs above the root."""
        if "\x00" in path:
            raise PathEscape("NUL byte in path")
        out: list[str] = []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    raise PathEscape(repr(path))
                out.pop()
            else:
                out.append(part)
        return out

    def normalize(self, path: str) -> str:
        """The absolute jail path (``/a/b``) a client path names, without touching the disk."""
        return "/" + "/".join(self.parts(path))

    @contextlib.contextmanager
    def resolve(self, path: str, follow: bool = True) -> Iterator[_Where]:
        """Walk ``path`` beneath the root; yields where its last component lives.

        ``follow`` resolves a symlink in the last component too (staying inside); without it the
        last component is the link itself. The directory fds are closed when the block ends.
        """
        if self._fd < 0:
            raise OSError(errno.EBADF, "the jail is closed")
        stack = [self._fd]
        names: list[str] = []
        asked = self.parts(path)
        pending = deque(asked)
        links = 0
        try:
            while pending:
                name = pending.popleft()
                if (
                    name == ".."
                ):  # only link targets bring these; the client's own were cleaned away
                    if not names:
                        raise PathEscape(f"a symlink climbs above the root ({path!r})")
                    os.close(stack.pop())
                    names.pop()
                    continue
                last = not pending
                if last:
                    target = self._link_target(stack[-1], name) if follow else None
                    if target is None:
                        yield self._checked(
                            asked, _Where(stack[-1], name, "/".join([*names, name]))
                        )
                        return
                else:
                    try:
                        fd = os.open(name, self._DIR_FLAGS, dir_fd=stack[-1])
                    except OSError as exc:
                        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        target = self._link_target(stack[-1], name)
                        if target is None:
                            raise OSError(
                                errno.ENOTDIR, f"not a directory: {'/'.join([*names, name])}"
                            ) from None
                    else:
                        stack.append(fd)
                        names.append(name)
                        continue
                links += 1
                if links > self.max_symlinks:
                    raise OSError(errno.ELOOP, f"too many levels of symbolic links: {path!r}")
                if target.startswith("/") or "\x00" in target:
                    raise PathEscape(f"{'/'.join([*names, name])} is a symlink to an absolute path")
                pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            yield self._checked(asked, _Where(stack[-1], None, "/".join(names)))
        finally:
            for fd in stack[1:]:
                os.close(fd)

    def _checked(self, asked: list[str], where: _Where) -> _Where:
        if self.is_denied is not None and (
            self.is_denied("/".join(asked)) or self.is_denied(where.relpath)
        ):
            raise PermissionError(
                errno.EACCES, "this file is in the egg's file_denylist", "/".join(asked)
            )
        return where

    @staticmethod
    def _link_target(dir_fd: int, name: str) -> str | None:
        """The target when ``name`` is a symlink; None when it is something else or missing."""
        try:
            return os.readlink(name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return None
            raise

    def _check_link_target(self, link_parts: list[str], target: str) -> None:
        """Refuse a symlink target that would point outside the root from where the link sits."""
        if not target or "\x00" in target:
            raise OSError(errno.EINVAL, "empty symlink target")
        if target.startswith("/"):
            raise PathEscape(f"symlink to an absolute path {target!r}")
        depth = len(link_parts) - 1
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    raise PathEscape(f"symlink target {target!r} leads outside")
            elif part not in ("", "."):
                depth += 1

    # -- operations ----------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """A file descriptor for a regular file (never a device, FIFO, directory or symlink).

        ``O_TRUNC`` is dropped: the caller truncates, so that it can account for the freed bytes.
        """
        flags = (flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK) & ~os.O_TRUNC
        with self.resolve(path) as where:
            if where.name is None:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            fd = os.open(where.name, flags, mode, dir_fd=where.dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EPERM, kind, path)
            if flags & os.O_CREAT and self.owner and (st.st_uid, st.st_gid) != self.owner:
                os.fchown(fd, *self.owner)
            os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from hanging the open
        except BaseException:
            os.close(fd)
            raise
        return fd

    def stat(self, path: str) -> os.stat_result:
        """Like ``os.stat``: a symlink inside the jail is followed (never out of it)."""
        with self.resolve(path) as where:
            if where.name is None:
                return os.fstat(where.dir_fd)
            return os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)

    def lstat(self, path: str) -> os.stat_result:
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                return os.fstat(where.dir_fd)
            return os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)

    def listdir(self, path: str) -> list[tuple[str, os.stat_result]]:
        """``(name, lstat)`` of every entry of a directory (entries that vanish meanwhile are skipped)."""
        with self.resolve(path) as where:
            fd = os.open(where.name or ".", self._DIR_FLAGS, dir_fd=where.dir_fd)
        try:
            out = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    if len(out) >= self.max_entries:
                        raise OSError(
                            errno.EFBIG, f"more than {self.max_entries} entries in {path!r}"
                        )
                    with contextlib.suppress(FileNotFoundError):
                        out.append((entry.name, entry.stat(follow_symlinks=False)))
            return out
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise FileExistsError(errno.EEXIST, "exists", path)
            os.mkdir(where.name, mode, dir_fd=where.dir_fd)
            self._own(where)

    def rmdir(self, path: str) -> None:
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise PermissionError(errno.EPERM, "the root cannot be removed", path)
            os.rmdir(where.name, dir_fd=where.dir_fd)

    def remove(self, path: str) -> os.stat_result:
        """Unlink a file or symlink (the link itself, never its target); returns what it was."""
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            st = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            os.unlink(where.name, dir_fd=where.dir_fd)
            return st

    def rename(self, src: str, dst: str, overwrite: bool = True) -> os.stat_result | None:
        """Move ``src`` to ``dst``; returns the lstat of a file that was replaced (for accounting)."""
        dst_parts = self.parts(dst)
        with self.resolve(src, follow=False) as a, self.resolve(dst, follow=False) as b:
            if a.name is None or b.name is None:
                raise PermissionError(errno.EPERM, "the root cannot be renamed or replaced")
            st = os.stat(a.name, dir_fd=a.dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):  # a relative link may point elsewhere from its new place
                self._check_link_target(dst_parts, os.readlink(a.name, dir_fd=a.dir_fd))
            try:
                old = os.stat(b.name, dir_fd=b.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and not overwrite:
                raise FileExistsError(errno.EEXIST, "the target exists", dst)
            os.rename(a.name, b.name, src_dir_fd=a.dir_fd, dst_dir_fd=b.dir_fd)
            return old

    def symlink(self, target: str, path: str) -> None:
        """Create ``path`` -> ``target``; refused when the target would point outside the root."""
        self._check_link_target(self.parts(path), target)
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise FileExistsError(errno.EEXIST, "exists", path)
            os.symlink(target, where.name, dir_fd=where.dir_fd)
            self._own(where)

    def readlink(self, path: str) -> str:
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise OSError(errno.EINVAL, "not a symlink", path)
            return os.readlink(where.name, dir_fd=where.dir_fd)

    def chmod(self, path: str, mode: int) -> None:
        """chmod that never follows a symlink (Linux cannot chmod a link itself: EPERM)."""
        with self.resolve(path, follow=False) as where:
            fd = os.open(
                where.name or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where.dir_fd
            )
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise PermissionError(errno.EPERM, "a symlink's mode cannot be changed", path)
            # An O_PATH fd cannot fchmod; its /proc/self/fd entry names exactly this inode.
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def _own(self, where: _Where) -> None:
        """Give what was just created to the node user (the link itself for a symlink)."""
        if self.owner is not None and where.name is not None:
            os.chown(where.name, *self.owner, dir_fd=where.dir_fd, follow_symlinks=False)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.resolve(path, follow=False) as where:
            os.chown(where.name or ".", uid, gid, dir_fd=where.dir_fd, follow_symlinks=False)

    def utime(self, path: str, times: tuple[float, float]) -> None:
        with self.resolve(path, follow=False) as where:
            os.utime(where.name or ".", times, dir_fd=where.dir_fd, follow_symlinks=False)


# -- disk quota backends ------------------------------------------------------------------------
#
# A limit that only wingslite's own write paths respect is not a limit: the game server writes to
# /home/container directly (panel#4554: an 858 GB file on a 1 GB server). Where the data
# directory's filesystem can, the kernel holds each server directory to its limit. Chosen once per
# node by ``wingslite.disk_quota`` (``select_quota_backend``), strongest first:
#
#   btrfs     each server directory is a subvolume; its qgroup carries the limit (``btrfs`` CLI)
#   project   ext4/xfs project quotas: the directory's project id carries a hard block limit
#   soft      no kernel limit (``QuotaBackend``): wingslite's writes are checked, and a running
#             server over its limit is stopped, as Wings does
#   off       wingslite's writes are checked; a running server is never stopped for its disk


class NoQuota(QuotaBackend):
    """``wingslite.disk_quota: off``: only wingslite's own writes are checked against the limit."""

    name = "off"
    reason = "wingslite.disk_quota is off: only the daemon's own write paths check the limit"
    stops_running_servers = False


def mount_of(path: str | os.PathLike[str], mountinfo: str | None = None) -> tuple[str, str, str]:
    """``(mount point, filesystem type, source)`` of the mount holding ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            mountinfo = fh.read()
    best, best_len = ("/", "", ""), -1
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        point = _unescape_mount(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if (
            inside and len(point) >= best_len
        ):  # on equal points the later line wins: it is mounted on top
            best, best_len = (point, tail[0], _unescape_mount(tail[1])), len(point)
    return best


def _unescape_mount(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


class BtrfsQuota(QuotaBackend):
    """Each server directory a btrfs subvolume whose qgroup ``0/<subvolume id>`` carries the limit.

    Needs the ``btrfs`` command (btrfs-progs). A server directory that already existed as a plain
    directory cannot become a subvolume: that server is soft (its sync record says so).
    """

    name = "btrfs"
    usage_ttl_s = (
        1.0  # metered writers ask before every chunk; the kernel enforces whatever this says
    )
    _SUBVOLUME_ROOT_INODE = 256  # BTRFS_FIRST_FREE_OBJECTID: the root directory of every subvolume

    def __init__(
        self,
        btrfs: str = "btrfs",
        reason: str = "",
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    ):
        self.reason = reason
        self._btrfs = btrfs
        self._run = run
        self._lock = threading.Lock()
        self._usage_cache: dict[str, tuple[float, int]] = {}

    @classmethod
    def probe(cls, data_dir: Path, fstype: str) -> tuple[BtrfsQuota | None, str]:
        """The backend for ``data_dir``, turning btrfs quotas on if they are off; else ``None`` and why not."""
        if fstype != "btrfs":
            return None, f"{data_dir} is on {fstype or 'an unknown filesystem'}, not btrfs"
        exe = shutil.which("btrfs")
        if exe is None:
            return (
                None,
                f"{data_dir} is on btrfs but the btrfs command (btrfs-progs) is not installed",
            )
        backend = cls(exe)
        try:
            backend._cli("qgroup", "show", "--raw", str(data_dir))
        except OSError:
            try:
                backend._cli("quota", "enable", str(data_dir))
            except OSError as exc:
                return None, f"{data_dir} is on btrfs but its quotas cannot be enabled: {exc}"
            LOG.info("disk quota: enabled btrfs quotas on the filesystem holding %s", data_dir)
        backend.reason = f"{data_dir} is on btrfs with quotas on: each server directory is a subvolume with a qgroup limit"
        return backend, backend.reason

    def _cli(self, *args: str) -> str:
        try:
            done = self._run([self._btrfs, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(f"btrfs {' '.join(args)}: {exc}") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(
                f"btrfs {' '.join(args)}: {lines[-1] if lines else f'exit status {done.returncode}'}"
            )
        return done.stdout

    def enforced(self, root: Path) -> bool:
        try:
            st, parent = os.stat(root), os.stat(Path(root).parent)
        except OSError:
            return False
        return st.st_ino == self._SUBVOLUME_ROOT_INODE and st.st_dev != parent.st_dev

    def prepare(self, root: Path) -> None:
        if root.is_dir():
            if not self.enforced(root):
                LOG.warning("disk quota: %s", self._soft_note(root))
            return
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._cli("subvolume", "create", str(root))
        except OSError as exc:
            LOG.warning("disk quota: %s; %s is a plain directory, soft for this server", exc, root)
            root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _soft_note(root: Path) -> str:
        return (
            f"disk limit: soft for this server: {root} is a plain directory, not a btrfs subvolume, so the kernel cannot hold it"
            " to the limit (the daemon's writes are checked and the running server is stopped when over it)"
        )

    def set_limit(self, root: Path, limit_bytes: int) -> list[str]:
        if not self.enforced(root):
            return [self._soft_note(root)]
        qgroup = f"0/{int(self._cli('inspect-internal', 'rootid', str(root)).strip())}"
        # Name the qgroup and point the command at the parent: run against the subvolume itself, btrfs
        # charges the command's own metadata to that qgroup and refuses (EDQUOT) once it is over its
        # limit, so a full server could never have its limit raised or removed.
        self._cli(
            "qgroup",
            "limit",
            str(limit_bytes) if limit_bytes > 0 else "none",
            qgroup,
            str(root.parent),
        )
        # qgroup figures move at transaction commits; commit now so the sync record's usage is today's
        self._read_usage(root, "--sync")
        return [
            f"disk limit: btrfs qgroup {qgroup} limit "
            + (f"{limit_bytes} bytes" if limit_bytes > 0 else "removed")
        ]

    def usage_bytes(self, root: Path) -> int | None:
        key, now = str(root), time.monotonic()
        with self._lock:
            cached = self._usage_cache.get(key)
        if cached and now - cached[0] < self.usage_ttl_s:
            return cached[1]
        return self._read_usage(root) if self.enforced(root) else None

    def _read_usage(self, root: Path, *flags: str) -> int | None:
        try:
            used = parse_qgroup_referenced(
                self._cli("qgroup", "show", "--raw", *flags, "-f", str(root))
            )
        except (OSError, ValueError) as exc:
            LOG.warning("disk quota: cannot read the btrfs qgroup usage of %s: %s", root, exc)
            return None
        with self._lock:
            self._usage_cache[str(root)] = (time.monotonic(), used)
        return used


def parse_qgroup_referenced(text: str, qgroup: str | None = None) -> int:
    """Referenced bytes of ``qgroup`` (default: the level-0 one) in ``btrfs qgroup show --raw`` output."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        if parts[0] == qgroup or (qgroup is None and parts[0].startswith("0/")):
            return int(parts[1])
    raise ValueError(f"no qgroup {qgroup or '0/*'} in the output of btrfs qgroup show")


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: direction (2 bits), size (14), type (8), number (8)
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


FSXATTR = struct.Struct("=IIIII8x")  # struct fsxattr: xflags, extsize, nextents, projid, cowextsize
FS_IOC_FSGETXATTR = _ioc(2, "X", 31, FSXATTR.size)
FS_IOC_FSSETXATTR = _ioc(1, "X", 32, FSXATTR.size)
FS_XFLAG_PROJINHERIT = 0x200  # what is created inside inherits the directory's project id
IF_DQBLK = struct.Struct(
    "=QQQQQQQQI4x"
)  # struct if_dqblk, padded to 8 bytes as the kernel lays it out
IF_DQINFO = struct.Struct("=QQII")  # struct if_dqinfo
Q_GETINFO, Q_GETQUOTA, Q_SETQUOTA = 0x800005, 0x800007, 0x800008
PRJQUOTA = 2
QIF_BLIMITS = 1
QUOTA_BLOCK_BYTES = 1024  # if_dqblk's block limits count 1 KiB blocks; dqb_curspace is in bytes


def qcmd(cmd: int, quota_type: int) -> int:
    return (cmd << 8) | (quota_type & 0xFF)


def setquota_block(limit_bytes: int) -> bytes:
    """The ``if_dqblk`` for ``Q_SETQUOTA``: a hard (and soft) block limit rounded up to whole KiB; 0 = none."""
    blocks = -(-limit_bytes // QUOTA_BLOCK_BYTES) if limit_bytes > 0 else 0
    return IF_DQBLK.pack(blocks, blocks, 0, 0, 0, 0, 0, 0, QIF_BLIMITS)


class KernelCalls:
    """The two system calls project quotas need (``ioctl``, ``quotactl``); tests substitute a recorder."""

    def ioctl(self, fd: int, request: int, buf: bytearray) -> None:
        fcntl.ioctl(fd, request, buf)

    def quotactl(self, cmd: int, device: str, ident: int, buf: bytearray) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        addr = (ctypes.c_char * len(buf)).from_buffer(buf)
        if libc.quotactl(ctypes.c_int(cmd), os.fsencode(device), ctypes.c_int(ident), addr) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"quotactl: {os.strerror(err)}")


class ProjectQuota(QuotaBackend):
    """ext4/xfs project quotas: each server directory tagged with its own project id, which carries a hard limit.

    The id lives on the directory itself (``FS_IOC_FSSETXATTR`` with inheritance), so it survives
    restarts without a table; it is derived from the directory name and stepped past ids that other
    server directories already hold. Needs a kernel with ``CONFIG_QUOTA`` and a ``prjquota`` mount.
    """

    name = "project"

    def __init__(
        self, data_dir: Path, device: str, reason: str = "", calls: KernelCalls | None = None
    ):
        self.data_dir = Path(data_dir)
        self.device = device
        self.reason = reason
        self._calls = calls or KernelCalls()
        self._lock = threading.Lock()

    @classmethod
    def probe(
        cls, data_dir: Path, fstype: str, device: str, calls: KernelCalls | None = None
    ) -> tuple[ProjectQuota | None, str]:
        if fstype not in ("ext4", "xfs"):
            return None, f"{data_dir} is on {fstype or 'an unknown filesystem'}, not ext4 or xfs"
        calls = calls or KernelCalls()
        try:
            calls.quotactl(qcmd(Q_GETINFO, PRJQUOTA), device, 0, bytearray(IF_DQINFO.size))
        except OSError as exc:
            why = {
                errno.ENOSYS: "this kernel has no quota support (CONFIG_QUOTA)",
                errno.ESRCH: f"project quotas are not on for {device} (it needs a prjquota mount, which needs a kernel with CONFIG_QUOTA)",
                errno.EPERM: "managing quotas needs root",
            }.get(exc.errno or 0, str(exc))
            return None, f"{data_dir} is on {fstype} but {why}"
        backend = cls(data_dir, device, calls=calls)
        backend.reason = f"{data_dir} is on {fstype} ({device}) with project quotas on: each server directory has its own project id"
        return backend, backend.reason

    def _xattr(self, fd: int) -> tuple[int, ...]:
        buf = bytearray(FSXATTR.size)
        self._calls.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        return FSXATTR.unpack(buf)

    def _tag(self, path: Path, project_id: int, inherit: bool) -> None:
        # O_NONBLOCK: the game server may have made a FIFO, whose plain open waits for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            xflags, extsize, nextents, _, cow = self._xattr(fd)
            xflags = xflags | FS_XFLAG_PROJINHERIT if inherit else xflags
            self._calls.ioctl(
                fd,
                FS_IOC_FSSETXATTR,
                bytearray(FSXATTR.pack(xflags, extsize, nextents, project_id, cow)),
            )
        finally:
            os.close(fd)

    def project_id(self, root: Path) -> int:
        """The directory's project id (0: none yet)."""
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._xattr(fd)[3]
        finally:
            os.close(fd)

    def choose_project_id(self, root: Path) -> int:
        taken = set()
        for sibling in self.data_dir.iterdir() if self.data_dir.is_dir() else ():
            if sibling.name != root.name and sibling.is_dir() and not sibling.is_symlink():
                with contextlib.suppress(OSError):
                    taken.add(self.project_id(sibling))
        candidate = zlib.crc32(root.name.encode()) & 0x7FFFFFFF
        while candidate in taken or candidate == 0:
            candidate = (candidate + 1) & 0x7FFFFFFF
        return candidate

    def enforced(self, root: Path) -> bool:
        try:
            return self.project_id(root) != 0
        except OSError:
            return False

    def prepare(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.project_id(root):
                return
            project_id = self.choose_project_id(root)
            self._tag(root, project_id, inherit=True)
        # What was there before the tag belongs to no project: tag it too, once.
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                if not os.path.islink(os.path.join(dirpath, name)):
                    with contextlib.suppress(OSError):
                        self._tag(Path(dirpath, name), project_id, inherit=name in dirnames)
        LOG.info("disk quota: project id %d assigned to %s", project_id, root)

    def set_limit(self, root: Path, limit_bytes: int) -> list[str]:
        if not self.enforced(root):
            self.prepare(root)
        project_id = self.project_id(root)
        self._calls.quotactl(
            qcmd(Q_SETQUOTA, PRJQUOTA),
            self.device,
            project_id,
            bytearray(setquota_block(limit_bytes)),
        )
        return [
            f"disk limit: project {project_id} hard limit "
            + (f"{limit_bytes} bytes" if limit_bytes > 0 else "removed")
        ]

    def usage_bytes(self, root: Path) -> int | None:
        try:
            project_id = self.project_id(root)
            if not project_id:
                return None
            buf = bytearray(IF_DQBLK.size)
            self._calls.quotactl(qcmd(Q_GETQUOTA, PRJQUOTA), self.device, project_id, buf)
        except OSError as exc:
            LOG.warning("disk quota: cannot read the project quota usage of %s: %s", root, exc)
            return None
        return IF_DQBLK.unpack(buf)[2]


QUOTA_MODES = _CHOICES["wingslite.disk_quota"]


def select_quota_backend(
    mode: str, data_dir: Path, *, mountinfo: str | None = None, calls: KernelCalls | None = None
) -> QuotaBackend:
    """The backend for ``wingslite.disk_quota``; ``auto`` takes the strongest the data directory's filesystem supports.

    ``btrfs`` or ``project`` that cannot work here fall back to soft, with a warning that says why.
    """
    if mode not in QUOTA_MODES:
        raise ConfigError(
            f"wingslite.disk_quota must be one of {', '.join(QUOTA_MODES)}, not {mode!r}"
        )
    if mode == "off":
        return NoQuota()
    soft = QuotaBackend()
    if mode == "soft":
        soft.reason = "wingslite.disk_quota is soft: the daemon's own write paths check the limit, and a server over it is stopped"
        return soft
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    _, fstype, device = mount_of(data_dir, mountinfo)
    reasons = []
    if mode in ("auto", "btrfs"):
        backend, why = BtrfsQuota.probe(data_dir, fstype)
        if backend:
            return backend
        reasons.append(why)
    if mode in ("auto", "project"):
        backend, why = ProjectQuota.probe(data_dir, fstype, device, calls)
        if backend:
            return backend
        reasons.append(why)
    prefix = (
        "no kernel quota here"
        if mode == "auto"
        else f"wingslite.disk_quota is {mode}, but it cannot work here"
    )
    soft.reason = f"{prefix} ({'; '.join(reasons)}): the daemon's own write paths check the limit, and a server over it is stopped"
    (LOG.info if mode == "auto" else LOG.warning)("disk quota: soft: %s", soft.reason)
    return soft


def must_stop_for_disk(fs: Filesystem) -> bool:
    """True when a running server is over its disk limit and no kernel quota holds it there.

    Wings stops such a server ("Server is exceeding the assigned disk space limit, stopping process
    now.", server/listeners.go); under a kernel quota the writes are refused instead and the server runs on.
    """
    return (
        bool(fs.limit_bytes)
        and fs.quota.stops_running_servers
        and not fs.quota.enforced(fs.root)
        and not fs.has_space()
    )


# environments #####################################################################################


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
    ``send_command(line)``, ``logs(lines)``, ``stats()``, ``attach_if_running(config)``,
    ``prepare(config)``, ``exit_status()``, ``install(...)``, ``abort_install()``, ``close()``.
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
        return LimitReport(
            pending=[
                "resource limits: no container exists; they apply when it is created at the next start"
            ]
        )

    def start(self, config: ServerConfig) -> None:
        raise WingsliteError(
            "this node has no environment that can run servers (is the Docker engine reachable?)"
        )

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
        return {
            "memory_bytes": 0,
            "memory_limit_bytes": 0,
            "cpu_absolute": 0.0,
            "network": {"rx_bytes": 0, "tx_bytes": 0},
            "uptime": 0,
        }

    def attach_if_running(self, config: ServerConfig) -> bool:
        return False

    def prepare(self, config: ServerConfig) -> None:
        """Do the slow part of a coming start (e.g. fetch the image) without holding the server's lock."""
        return None

    def exit_status(self) -> tuple[int, bool]:
        """The last process exit: ``(exit code, killed for running out of memory)``."""
        return 1, False

    def install(
        self,
        config: ServerConfig,
        script: Mapping[str, str],
        on_output: Callable[[bytes], None],
        log_path: Path,
    ) -> int:
        """Run the egg's install ``script`` against the server's files; its exit code."""
        raise WingsliteError(
            "this node has no environment that can run install scripts"
            " (is the Docker engine reachable?)"
        )

    def abort_install(self) -> bool:
        """Kill a running install now (from any thread); True when there was one."""
        return False

    def close(self) -> None:
        return None


# -- cgroups -------------------------------------------------------------------------------------
#
# Docker's update API cannot lift a memory limit (``Memory: 0`` means "unchanged" and ``-1`` is
# refused), does not lift a memory+swap limit when sent ``MemorySwap: -1``, and cannot unpin a
# cpuset (moby#41946). wingslite writes those into the container's cgroup files directly; the
# process keeps running in the same container. Docker's inspect output keeps the old values
# afterwards, so what the kernel enforces is read back from the same files.

# cgroup v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 on x86-64).
_CGROUP_NO_LIMIT = 1 << 62
_PAGE = 4096


@dataclasses.dataclass(frozen=True)
class CgroupLimits:
    """What the kernel enforces on one container, read from its cgroup files (``None`` = no limit).

    ``swap_bytes`` is memory+swap on cgroup v1 (``memory.memsw.limit_in_bytes``) and swap alone on
    v2 (``memory.swap.max``), as each kernel interface defines it; ``None`` also when the kernel
    does not account swap. ``cpuset`` is the container's own list ("" on v2 = inherited).
    """

    memory_bytes: int | None
    swap_bytes: int | None
    cpu_quota_us: int | None
    cpu_period_us: int
    cpuset: str
    all_cpus: str
    pids: int | None


class Cgroup:
    """The cgroup directories of one container, and the writes Docker cannot make live.

    Methods for the caller: ``Cgroup.locate(root, container_id, driver=..., parent=..., pid=...)``,
    ``read()``, ``lift_memory_limit()``, ``lift_swap_limit()``, ``lift_cpu_quota()``,
    ``lift_cpuset()``. Every failure is a ``WingsliteError`` naming the file.
    """

    V1_CONTROLLERS = ("memory", "cpu", "cpuset", "pids")

    def __init__(self, version: int, dirs: Mapping[str, Path]):
        self.version = version
        self.dirs = dict(dirs)

    @classmethod
    def locate(
        cls,
        root: str | os.PathLike[str],
        container_id: str,
        *,
        driver: str = "cgroupfs",
        parent: str = "",
        pid: int = 0,
    ) -> Cgroup:
        """Find a container's cgroup the way the engine lays it out (cgroupfs or systemd driver).

        The hierarchy version is read from ``root`` itself (v2 has ``cgroup.controllers`` at its
        top). When the expected directory is missing, ``/proc/<pid>/cgroup`` of the container's
        main process is consulted (nested or unusual ``cgroup_parent`` layouts).
        """
        root = Path(root)
        rel = _container_cgroup_relpath(container_id, driver, parent)
        proc: dict[str, str] | None = None
        if (root / "cgroup.controllers").is_file():
            found = root / rel
            if not found.is_dir() and pid:
                proc = _proc_cgroup_paths(pid)
                if "" in proc:
                    found = root / proc[""].lstrip("/")
            if not found.is_dir():
                raise WingsliteError(
                    f"the cgroup of container {container_id[:12]} is not at {root / rel} (cgroup v2, {driver} driver)"
                )
            return cls(2, {c: found for c in cls.V1_CONTROLLERS})
        dirs = {}
        for controller in cls.V1_CONTROLLERS:
            found = root / controller / rel
            if not found.is_dir() and pid:
                proc = proc if proc is not None else _proc_cgroup_paths(pid)
                if controller in proc:
                    found = root / controller / proc[controller].lstrip("/")
            dirs[controller] = found
        if not dirs["memory"].is_dir():
            raise WingsliteError(
                f"the cgroup of container {container_id[:12]} is not at {dirs['memory']} (cgroup v1, {driver} driver)"
            )
        return cls(1, dirs)

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> CgroupLimits:
        mem, cpu, cpuset, pids = (self.dirs[c] for c in self.V1_CONTROLLERS)
        if self.version == 1:
            memsw = mem / "memory.memsw.limit_in_bytes"
            quota = _read_int(cpu / "cpu.cfs_quota_us")
            return CgroupLimits(
                memory_bytes=_limit(_read_int(mem / "memory.limit_in_bytes")),
                swap_bytes=_limit(_read_int(memsw)) if memsw.exists() else None,
                cpu_quota_us=None if quota is None or quota < 0 else quota,
                cpu_period_us=_read_int(cpu / "cpu.cfs_period_us") or 100_000,
                cpuset=_read_text(cpuset / "cpuset.cpus"),
                all_cpus=_read_text(cpuset.parent / "cpuset.cpus"),
                pids=_limit(_read_int(pids / "pids.max")),
            )
        quota_text, _, period_text = (_read_text(cpu / "cpu.max") or "max").partition(" ")
        swap = mem / "memory.swap.max"
        all_cpus = cpuset.parent / "cpuset.cpus.effective"
        return CgroupLimits(
            memory_bytes=_limit(_read_int(mem / "memory.max")),
            swap_bytes=_limit(_read_int(swap)) if swap.exists() else None,
            cpu_quota_us=None if quota_text == "max" else int(quota_text),
            cpu_period_us=int(period_text or 100_000),
            cpuset=_read_text(cpuset / "cpuset.cpus") if (cpuset / "cpuset.cpus").exists() else "",
            all_cpus=_read_text(all_cpus) if all_cpus.exists() else "",
            pids=_limit(_read_int(pids / "pids.max")),
        )

    # -- writing (only lifting: everything else goes through Docker) -------------------------------

    def lift_memory_limit(self) -> None:
        """No memory limit, no swap limit, no reservation."""
        self.lift_swap_limit()  # v1: memory+swap must stay >= memory, so it is raised first
        mem = self.dirs["memory"]
        if self.version == 1:
            _write(mem / "memory.limit_in_bytes", "-1")
            _write(mem / "memory.soft_limit_in_bytes", "-1", optional=True)
        else:
            _write(mem / "memory.max", "max")
            _write(mem / "memory.low", "0", optional=True)

    def lift_swap_limit(self) -> None:
        mem = self.dirs["memory"]
        if self.version == 1:
            _write(mem / "memory.memsw.limit_in_bytes", "-1", optional=True)
        else:
            _write(mem / "memory.swap.max", "max", optional=True)

    def lift_cpu_quota(self) -> None:
        if self.version == 1:
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", "-1")
        else:
            _write(self.dirs["cpu"] / "cpu.max", "max")

    def lift_cpuset(self) -> None:
        """Unpin: v1 copies the parent's CPU list (v1 has no "inherit"); v2 empties the list."""
        path = self.dirs["cpuset"] / "cpuset.cpus"
        if self.version == 1:
            _write(path, _read_text(self.dirs["cpuset"].parent / "cpuset.cpus"))
        else:
            _write(path, "\n")


def _container_cgroup_relpath(container_id: str, driver: str, parent: str) -> str:
    """Where the engine puts a container's cgroup below a hierarchy's root (moby's layout)."""
    if driver == "systemd":
        return f"{_expand_slice(parent or 'system.slice')}/docker-{container_id}.scope".lstrip("/")
    return f"{(parent or '/docker').strip('/')}/{container_id}"


def _expand_slice(name: str) -> str:
    """systemd nests ``a-b.slice`` inside ``a.slice``: ``a-b-c.slice`` -> ``a.slice/a-b.slice/a-b-c.slice``."""
    if name in ("", "-.slice"):
        return ""
    if not name.endswith(".slice"):
        return name.strip("/")
    parts = name[: -len(".slice")].split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _proc_cgroup_paths(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as ``{controller: path}`` (the v2 entry under ``""``)."""
    paths: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise WingsliteError(f"cannot read {path}: {exc.strerror}") from None


def _read_int(path: Path) -> int | None:
    """An integer cgroup value; ``None`` for ``max``."""
    text = _read_text(path).split(" ")[0]
    return None if text == "max" else int(text)


def _limit(value: int | None) -> int | None:
    return None if value is None or value < 0 or value >= _CGROUP_NO_LIMIT else value


def _write(path: Path, value: str, optional: bool = False) -> None:
    if not path.exists():
        if optional:  # e.g. memory.memsw.* without swap accounting
            return
        raise WingsliteError(f"cannot write {path}: no such cgroup file")
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise WingsliteError(
            f"cannot write {value.strip() or 'an empty list'} to {path}: {exc.strerror}"
        ) from None


def _cpu_set(text: str) -> frozenset[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in filter(None, text.replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


# -- Docker ---------------------------------------------------------------------------------------

# Wings' dropped capabilities (environment/docker/container.go).
_CAP_DROP = (
    "setpcap",
    "mknod",
    "audit_write",
    "net_raw",
    "dac_override",
    "fowner",
    "fsetid",
    "net_bind_service",
    "sys_chroot",
    "setfcap",
)
_SIGNALS = frozenset(s.name for s in signal.Signals if not s.name.startswith("SIG_"))


def _docker() -> Any:
    import docker  # a required package, imported on first use: ~9 MB that embedders without Docker do not pay

    return docker


def docker_client(config: Config) -> Any:
    """A low-level Docker API client for ``wingslite.docker_url`` (else ``DOCKER_HOST``, else the socket).

    No engine is contacted here: the API version is fixed (1.41, Docker 20.10, understood by every
    later engine), so a daemon starts while the engine is still down.
    """
    docker = _docker()
    kwargs = docker.utils.kwargs_from_env()
    if config.get("wingslite.docker_url"):
        kwargs["base_url"] = config.get("wingslite.docker_url")
    # Each running server holds one pooled connection for its stats stream.
    return docker.APIClient(version="1.41", timeout=60, max_pool_size=256, **kwargs)


def signal_name(value: str) -> str:
    """A stop signal as Docker wants it (``SIGTERM``). Unknown names become SIGKILL, as in Wings.

    Wings v1.11 passed Go's signal description ("terminated") and so only SIGKILL ever worked
    (panel#4783); wingslite sends the real name.
    """
    name = value.strip().upper()
    if name == "C":  # the Panel turns an egg's "^C" (Ctrl-C) into "C"
        return "SIGINT"
    if name and not name.startswith("SIG"):
        name = "SIG" + name
    return name if name in _SIGNALS else "SIGKILL"


class DockerEnvironment(Environment):
    """A server's process in a Docker container named by the server's uuid.

    Every start re-creates the container from the current configuration (as Wings), so a new
    image, startup command, environment, port binding or mount takes effect there; limits also
    change live through ``apply_limits()``. The container's output is read from an attach stream
    (opened before the container starts, so nothing is missed) and fed to ``console``, an object
    with ``begin(matchers, strip_ansi, on_done)``, ``feed(bytes)``, ``end()`` and
    ``daemon_message(text)`` (``ConsolePipeline`` of the console section). A daemon that stops
    leaves containers running; ``attach_if_running()`` picks them up again.

    Methods for the caller: those of ``Environment`` plus ``exit_status()`` and ``cgroup()``.
    Class variables that may be overridden: ``kill_wait_s``, ``log_config``.
    """

    kind = "docker"
    kill_wait_s = 30.0
    log_config = {
        "type": "local",
        "config": {"max-size": "5m", "max-file": "1", "compress": "false", "mode": "non-blocking"},
    }

    def __init__(
        self,
        server_uuid: str,
        events: EventBus,
        *,
        client: Any,
        config: Config,
        data_dir: Path,
        console: ConsolePipeline,
        disk_bytes: Callable[[], int] | None = None,
        user: str = "",
    ):
        super().__init__(server_uuid, events)
        self.name = server_uuid
        self.user = user  # "uid:gid" the game runs as ("" = the image's user)
        self._installer: DockerInstaller | None = None
        self.client = client
        self.config = config
        self.data_dir = Path(data_dir)
        self.console = console
        self._disk_bytes = disk_bytes or (lambda: 0)
        self._lock = threading.RLock()
        self._state = OFFLINE
        self._generation = 0  # bumped whenever the attach stream is dropped on purpose
        self._sock: Any = None
        self._sock_owner: Any = None
        self._exited = threading.Event()
        self._exited.set()
        self._exit: tuple[int, bool] | None = None
        self._process = ProcessConfig()
        self._started_at = 0.0
        self._stats = _zero_stats()
        self._driver: str | None = None
        self._running_info: dict[str, Any] | None = None  # inspect of the attached container

    # -- state -----------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        # Published under the lock so that subscribers see the transitions in order.
        with self._lock:
            if self._state == state:
                return
            self._state = state
            self.events.publish("status", state)
            if state == OFFLINE:
                self._stats = _zero_stats()
                self.events.publish(
                    "stats",
                    json.dumps(
                        {**self._stats, "state": OFFLINE, "disk_bytes": self._safe_disk_bytes()}
                    ),
                )

    def _on_done(self) -> None:
        with self._lock:
            if self._state == STARTING:
                self._set_state(RUNNING)

    # -- Docker helpers --------------------------------------------------------------------------

    def _inspect(self) -> dict[str, Any] | None:
        docker = _docker()
        try:
            return self.client.inspect_container(self.name)
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("inspecting the container", exc) from None

    def exists(self) -> bool:
        return self._inspect() is not None

    def exit_status(self) -> tuple[int, bool]:
        """``(exit code, killed by the OOM killer)`` of the last exit; a missing container is (1, False)."""
        if self._exit is not None:
            return self._exit
        try:
            info = self._inspect()
        except WingsliteError:
            info = None
        if info is None:
            return 1, False
        return int(info["State"].get("ExitCode") or 0), bool(info["State"].get("OOMKilled"))

    def cgroup(self, info: dict[str, Any] | None = None) -> Cgroup:
        """The running container's cgroup, found from the engine's driver and the container's id."""
        info = info or self._inspect()
        if info is None:
            raise WingsliteError(f"container {self.name} does not exist")
        driver = self._cgroup_driver()
        return Cgroup.locate(
            self.config.get("wingslite.cgroup_root"),
            info["Id"],
            driver=driver,
            parent=(info.get("HostConfig") or {}).get("CgroupParent") or "",
            pid=int(info["State"].get("Pid") or 0),
        )

    def _cgroup_driver(self) -> str:
        if self._driver is None:
            try:
                self._driver = str(self.client.info().get("CgroupDriver") or "cgroupfs")
            except Exception:  # the engine's default layout; asked again next time
                return "cgroupfs"
        return self._driver

    # -- limits ----------------------------------------------------------------------------------

    def apply_limits(self, config: ServerConfig) -> LimitReport:
        """Make the running container's limits match ``config.build`` now (SPEC sync step 6).

        What Docker's update API can express goes through it (one raw ``POST /containers/{id}/update``
        so that ``PidsLimit`` goes too, which the SDK lacks); lifting a memory, swap or CPU limit or a
        cpuset is written into the cgroup files. The kernel's files are then read back: what they
        do not show is reported as failed. A stopped container is left alone: the next start
        re-creates it with the new limits.
        """
        build = config.build
        everything = "resource limits (memory, swap, cpu, cpuset, io weight, pids)"
        docker = _docker()
        # The container this environment started or attached to: no inspect on the sync's path.
        info = self._running_info if self._state in (STARTING, RUNNING) else None
        try:
            info = info or self._inspect()
        except WingsliteError as exc:
            return LimitReport(pending=[f"{everything} (next start)"], failed=[exc.message])
        if info is None:
            return LimitReport(pending=[f"{everything} (no container yet; next start)"])
        if not info["State"].get("Running"):
            return LimitReport(
                pending=[f"{everything} (container stopped; next start re-creates it)"]
            )

        resources = container_resources(build, self.config)
        body: dict[str, Any] = {
            "BlkioWeight": build.io_weight,
            "PidsLimit": resources["PidsLimit"] or -1,
        }
        if resources["Memory"]:
            body.update(
                Memory=resources["Memory"],
                MemoryReservation=resources["MemoryReservation"],
                MemorySwap=resources["MemorySwap"],
            )
        if build.cpu_percent:
            body.update(
                CpuQuota=resources["CpuQuota"],
                CpuPeriod=resources["CpuPeriod"],
                CpuShares=resources["CpuShares"],
            )
        else:
            body["CpuQuota"] = -1
        if build.threads:
            body["CpusetCpus"] = build.threads
        report = LimitReport()
        try:
            answer = self.client._result(
                self.client._post_json(
                    self.client._url("/containers/{0}/update", info["Id"]), data=body
                ),
                True,
            )
        except docker.errors.NotFound:
            if info is not self._running_info:
                return LimitReport(pending=[f"{everything} (no container yet; next start)"])
            self._running_info = None  # replaced behind our back: look again
            return self.apply_limits(config)
        except (docker.errors.DockerException, OSError) as exc:
            error = _docker_error("updating the container's limits", exc)
            report.failed.append(error.message)
            report.pending.append(f"{everything} (next start)")
            return report
        warnings = [w for w in (answer or {}).get("Warnings") or [] if w]
        blkio_unsupported = any("Block I/O weight" in w or "blkio" in w.lower() for w in warnings)
        for warning in warnings:
            LOG.info(
                "server %s: Docker warned while updating limits: %s", self.server_uuid, warning
            )

        try:
            cgroup = self.cgroup(info)
            kernel = cgroup.read()
            if not resources["Memory"] and kernel.memory_bytes is not None:
                cgroup.lift_memory_limit()
            elif resources["MemorySwap"] < 0 and kernel.swap_bytes is not None:
                cgroup.lift_swap_limit()  # the engine ignores MemorySwap -1 on update
            if not build.cpu_percent and kernel.cpu_quota_us is not None:
                cgroup.lift_cpu_quota()
            if not build.threads and _cpu_set(kernel.cpuset or kernel.all_cpus) != _cpu_set(
                kernel.all_cpus
            ):
                cgroup.lift_cpuset()
            kernel = cgroup.read()
        except WingsliteError as exc:
            try:
                still_running = bool((self._inspect() or {}).get("State", {}).get("Running"))
            except WingsliteError:
                still_running = True
            if not still_running:  # the process exited under us: its cgroup went with it
                return LimitReport(
                    pending=[f"{everything} (container stopped; next start re-creates it)"]
                )
            report.failed.append(f"cgroup: {exc.message}")
            return report

        def check(what: str, ok: bool, shows: Any, text: str) -> None:
            (report.applied if ok else report.failed).append(
                text if ok else f"{what}: the kernel enforces {shows}, expected {text}"
            )

        memory, swap = resources["Memory"] or None, resources["MemorySwap"]
        check(
            "memory",
            _pages(kernel.memory_bytes) == _pages(memory),
            kernel.memory_bytes,
            f"memory {memory} bytes" if memory else "memory unlimited",
        )
        if kernel.swap_bytes is not None or swap > 0:
            expect_swap = (
                None
                if swap < 0 or memory is None
                else (swap if cgroup.version == 1 else swap - memory)
            )
            shown = "memory+swap" if cgroup.version == 1 else "swap"
            check(
                "swap",
                _pages(kernel.swap_bytes) == _pages(expect_swap),
                kernel.swap_bytes,
                f"{shown} {expect_swap} bytes" if expect_swap is not None else f"{shown} unlimited",
            )
        quota = resources.get("CpuQuota")
        check(
            "cpu",
            kernel.cpu_quota_us == quota,
            kernel.cpu_quota_us,
            f"cpu quota {quota}/{kernel.cpu_period_us} us" if quota else "cpu quota unlimited",
        )
        expect_cpus = build.threads or kernel.all_cpus
        check(
            "cpuset",
            _cpu_set(kernel.cpuset or kernel.all_cpus) == _cpu_set(expect_cpus),
            kernel.cpuset,
            f"cpuset {build.threads or 'all (' + kernel.all_cpus + ')'}",
        )
        pids = resources["PidsLimit"] or None
        check("pids", kernel.pids == pids, kernel.pids, f"pids {pids or 'unlimited'}")
        if blkio_unsupported:
            report.applied.append(
                f"io weight {build.io_weight}: not supported by this kernel, skipped"
            )
        else:
            report.applied.append(f"io weight {build.io_weight}")
        return report

    # -- start -----------------------------------------------------------------------------------

    def start(self, config: ServerConfig) -> None:
        """Re-create the container from ``config``, attach, start. Returns once it is started.

        The state is ``starting`` until a ``done`` line is seen. On any failure the state goes
        ``stopping`` -> ``offline`` (never counted as a crash) and a ``WingsliteError`` says why.
        """
        info = self._inspect()
        if info is not None and info["State"].get("Running"):
            self.attach_if_running(config)  # as Wings: already running means running
            return
        with self._lock:
            self._process = config.process
            self._exit = None
            self.console.begin(
                config.process.done_matchers(), config.process.strip_ansi, self._on_done
            )
            self._set_state(STARTING)
        docker = _docker()
        try:
            image = self._ensure_image(config.image)
            self._remove_container()
            self._create_container(config, image)
            info = self._inspect()
            self._attach(info)  # before the start, so that no early output is lost
            if self._state == STARTING:
                self.client.start(self.name)
            if self._state not in (
                STARTING,
                RUNNING,
            ):  # a kill landed while the container was made: it wins
                self._kill_now()
                raise WingsliteError(
                    "the start was cancelled: the server was killed while it was starting"
                )
            info = self._inspect() or info
            self._running_info = info
            self._started_at = _docker_time(info["State"].get("StartedAt"))
        except (WingsliteError, docker.errors.DockerException, OSError) as exc:
            error = (
                exc
                if isinstance(exc, WingsliteError)
                else _docker_error("starting the container", exc)
            )
            with self._lock:
                if self._state != OFFLINE:
                    self._set_state(STOPPING)
                self._detach()
            self.console.daemon_message(f"The server could not be started: {error.message}")
            self._set_state(OFFLINE)
            raise error from None

    def prepare(self, config: ServerConfig) -> None:
        """Pull the server's image now if it is not on the node (called before the start's lock)."""
        self._ensure_image(config.image)

    def _ensure_image(self, image: str) -> str:
        """The image to run: local if present, else pulled. ``~image`` means local only (as Wings).

        Unlike Wings, a local image is not pulled again at every start: nodes without a registry
        would pay a failed pull per start, and a Panel image change names a new tag anyway.
        """
        docker = _docker()
        name = image.lstrip("~").strip()
        if not name:
            raise WingsliteError("the server has no Docker image configured")
        try:
            self.client.inspect_image(name)
            return name
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error(f"looking up image {name}", exc) from None
        if image.startswith("~"):
            raise WingsliteError(
                f"image {name} is not on this node and is marked local-only ('~'), so it is not pulled"
            )
        self.console.daemon_message(
            "Pulling Docker container image, this could take a few minutes to complete..."
        )
        repository, tag = docker.utils.parse_repository_tag(name)
        try:
            self.client.pull(repository, tag=tag or "latest")
            self.client.inspect_image(name)
        except (docker.errors.DockerException, OSError) as exc:
            reason = getattr(exc, "explanation", None) or str(exc)
            raise WingsliteError(
                f"image {name} is neither on this node nor pullable: {reason}"
            ) from None
        self.console.daemon_message("Finished pulling Docker container image")
        return name

    def _remove_container(self) -> None:
        docker = _docker()
        try:
            self.client.remove_container(self.name, force=True)
        except docker.errors.NotFound:
            pass

    def _create_container(self, config: ServerConfig, image: str) -> None:
        """Create the container as Wings does (environment/docker/container.go), see the README."""
        docker = _docker()
        node = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        mounts = [
            docker.types.Mount("/home/container", str(self.data_dir), type="bind", read_only=False)
        ]
        for mount in self.allowed_mounts(config):
            mounts.append(
                docker.types.Mount(
                    mount.target, mount.source, type="bind", read_only=mount.read_only
                )
            )
        bindings: dict[str, list[tuple[str, int]]] = {}
        for ip, ports in config.allocations.mappings:
            for port in ports:
                for proto in ("tcp", "udp"):
                    bindings.setdefault(f"{port}/{proto}", []).append((ip, port))
        host_config = self.client.create_host_config(
            mounts=mounts,
            port_bindings=bindings,
            tmpfs={"/tmp": f"rw,exec,nosuid,size={node.get('docker.tmpfs_size')}M"},
            security_opt=["no-new-privileges"],
            read_only=True,
            cap_drop=list(_CAP_DROP),
            dns=[str(d) for d in node.get("docker.network.dns")],
            network_mode=node.get("wingslite.docker_network"),
            log_config=self.log_config,
            userns_mode=node.get("docker.userns_mode") or None,
        )
        host_config.update(container_resources(config.build, node))
        labels = {str(k): str(v) for k, v in config.labels.items()}
        labels.update(Service="Pterodactyl", ContainerType="server_process")
        container = self.client.create_container_config(
            image,
            None,
            hostname=self.name,
            domainname=node.get("docker.domainname") or None,
            environment=container_environment(config, _timezone(node)),
            labels=labels,
            user=self.user or None,
            ports=[(int(key.split("/")[0]), key.split("/")[1]) for key in bindings],
            tty=True,
            stdin_open=True,
            host_config=host_config,
        )
        # docker-py sets StdinOnce with stdin_open: the engine would then close the process's
        # stdin when the first attach ends, e.g. when the daemon restarts. Wings leaves it off.
        container["StdinOnce"] = False
        try:
            self.client.create_container_from_config(container, self.name)
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("creating the container", exc) from None

    def allowed_mounts(self, config: ServerConfig) -> list[Mount]:
        """The server's custom mounts that ``allowed_mounts`` permits, compared as resolved paths.

        Wings compares by string prefix (``/srv/data`` would allow ``/srv/database``) and does
        not resolve symlinks; here the source's real path must equal or lie below an allowed one.
        Refused mounts are logged and skipped.
        """
        allowed = [
            Path(os.path.realpath(a))
            for a in self.config.get("allowed_mounts")
            if isinstance(a, str) and a.strip()
        ]
        accepted = []
        for mount in config.mounts:
            source = Path(os.path.realpath(mount.source))
            target = os.path.normpath(mount.target) if mount.target.startswith("/") else ""
            problem = ""
            if not os.path.isabs(mount.source):
                problem = "the source is not an absolute path"
            elif not any(source == a or a in source.parents for a in allowed):
                problem = "the source is not under any of the node's allowed_mounts"
            elif not target or target in ("/", "/home/container"):
                problem = "the target must be an absolute path other than / and /home/container"
            elif not source.exists():
                problem = "the source does not exist"
            if problem:
                LOG.warning(
                    "server %s: mount %s -> %s skipped: %s",
                    self.server_uuid,
                    mount.source,
                    mount.target,
                    problem,
                )
                continue
            accepted.append(Mount(str(source), target, mount.read_only))
        return accepted

    # -- the attach stream -----------------------------------------------------------------------

    def _attach(self, info: dict[str, Any]) -> None:
        owner = self.client.attach_socket(
            self.name, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        sock = getattr(owner, "_sock", owner)
        with self._lock:
            self._detach()
            self._generation += 1
            generation = self._generation
            self._sock, self._sock_owner = sock, owner
            self._running_info = info
            self._exited.clear()
            self._started_at = _docker_time(info["State"].get("StartedAt")) or time.time()
        short = self.name[:8]
        threading.Thread(
            target=self._read_output,
            args=(sock, generation),
            name=f"wingslite-console-{short}",
            daemon=True,
        ).start()
        threading.Thread(
            target=self._poll_stats,
            args=(generation,),
            name=f"wingslite-stats-{short}",
            daemon=True,
        ).start()

    def _detach(self) -> None:
        """Drop the attach stream on purpose: its reader then leaves the state alone."""
        with self._lock:
            self._generation += 1
            sock, self._sock, self._sock_owner = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _read_output(self, sock: Any, generation: int) -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                self.console.feed(data)
        except OSError:
            pass
        except Exception:
            LOG.exception("server %s: console reader failed", self.server_uuid)
        self.console.end()
        with self._lock:
            if generation != self._generation:
                return
            self._sock = self._sock_owner = None
        self._stream_ended()

    def _stream_ended(self) -> None:
        """The process exited (or the stream broke): record the exit and go offline."""
        try:
            info = self._inspect()
        except WingsliteError as exc:
            LOG.warning("server %s: %s", self.server_uuid, exc.message)
            info = None
        if info is not None and info["State"].get("Running"):
            LOG.warning(
                "server %s: the console stream ended but the container runs; attaching again",
                self.server_uuid,
            )
            try:
                self._attach(info)
                return
            except Exception as exc:
                LOG.error("server %s: re-attaching failed: %s", self.server_uuid, exc)
        state = (info or {}).get("State") or {}
        self._exit = (
            (int(state.get("ExitCode") or 0), bool(state.get("OOMKilled"))) if info else (1, False)
        )
        self._set_state(OFFLINE)
        self._exited.set()

    def _poll_stats(self, generation: int) -> None:
        """Docker's stats stream (about one sample a second) -> ``stats`` events, while attached."""
        try:
            for sample in self.client.stats(self.name, decode=True, stream=True):
                if generation != self._generation or self._state == OFFLINE:
                    break
                if not sample.get("read") or sample.get("read", "").startswith("0001-"):
                    continue
                stats = utilization_from_docker(sample, self._started_at)
                with self._lock:
                    if generation != self._generation:
                        break
                    self._stats = stats
                self.events.publish(
                    "stats",
                    json.dumps(
                        {**stats, "state": self._state, "disk_bytes": self._safe_disk_bytes()}
                    ),
                )
        except Exception as exc:  # the stream ends with the container; nothing to report
            LOG.debug("server %s: stats stream ended: %s", self.server_uuid, exc)

    def _safe_disk_bytes(self) -> int:
        try:
            return int(self._disk_bytes())
        except Exception:
            return 0

    # -- stop, kill, destroy -----------------------------------------------------------------------

    def stop(self, config: ServerConfig, timeout_s: float) -> None:
        """Stop as the server's stop type says, then SIGKILL after ``timeout_s``; returns when offline.

        ``command``: the stop command is written to the process's stdin (Docker's stop when not
        attached); ``signal``: that signal, by its real name; ``stop``: the image's stop signal.
        """
        docker = _docker()
        info = self._inspect()
        if info is None or not info["State"].get("Running"):
            with self._lock:
                self._detach()
                self._set_state(OFFLINE)
            return
        self._set_state(STOPPING)
        process = config.process
        try:
            if process.stop_type == "command" and self._sock is not None:
                self._write_stdin(process.stop_value + "\n")
            elif process.stop_type in ("command", "stop"):
                self.client.kill(
                    self.name,
                    signal=signal_name((info.get("Config") or {}).get("StopSignal") or "SIGTERM"),
                )
            else:
                self.client.kill(self.name, signal=signal_name(process.stop_value))
        except (docker.errors.DockerException, OSError) as exc:
            LOG.warning("server %s: graceful stop failed (%s); killing it", self.server_uuid, exc)
            timeout_s = 0
        if not self._wait_exit(timeout_s):
            self.console.daemon_message(
                f"The server did not stop within {timeout_s:g} seconds; killing it."
            )
            self._kill_now()
            if not self._wait_exit(self.kill_wait_s):
                raise WingsliteError(
                    f"the container of server {self.server_uuid} did not stop, even after SIGKILL"
                )

    def kill(self) -> None:
        if self._state != OFFLINE:
            # Intentional, so never a crash; a start still making the container sees it and gives up.
            self._set_state(STOPPING)
        info = self._inspect()
        if info is None or not info["State"].get("Running"):
            self._set_state(OFFLINE)
            return
        self._set_state(STOPPING)
        self._kill_now()
        if not self._wait_exit(self.kill_wait_s):
            raise WingsliteError(
                f"the container of server {self.server_uuid} did not stop after SIGKILL"
            )

    def _kill_now(self) -> None:
        docker = _docker()
        try:
            self.client.kill(self.name, signal="SIGKILL")
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "is not running" not in str(exc):
                raise _docker_error("killing the container", exc) from None

    def _wait_exit(self, timeout_s: float) -> bool:
        """True once the process has exited and the state is offline."""
        if self._sock is not None:
            return self._exited.wait(max(0.0, timeout_s))
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            info = self._inspect()
            if info is None or not info["State"].get("Running"):
                if info is not None:
                    self._exit = (
                        int(info["State"].get("ExitCode") or 0),
                        bool(info["State"].get("OOMKilled")),
                    )
                self._set_state(OFFLINE)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def destroy(self) -> None:
        """Remove the container (forced, with its anonymous volumes); a missing one is fine."""
        docker = _docker()
        with self._lock:
            if self._state != OFFLINE:
                self._set_state(STOPPING)
            self._detach()
        try:
            self.client.remove_container(self.name, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("removing the container", exc) from None
        self._set_state(OFFLINE)
        self._exited.set()

    # -- console ---------------------------------------------------------------------------------

    def send_command(self, line: str) -> None:
        if self._state == OFFLINE or self._sock is None:
            raise WingsliteError("Cannot send commands to a stopped server instance.", 502)
        self._write_stdin(line + "\n")
        process = self._process
        if process.stop_type == "command" and line == process.stop_value:
            self._set_state(STOPPING)  # as Wings: a manual stop command is an intentional stop

    def _write_stdin(self, text: str) -> None:
        sock = self._sock
        if sock is None:
            raise WingsliteError("Cannot send commands to a stopped server instance.", 502)
        try:
            sock.sendall(text.encode())
        except OSError as exc:
            raise WingsliteError(f"could not write to the server's console: {exc}", 502) from None

    def logs(self, lines: int) -> list[str]:
        """The last ``lines`` lines of the container's output from Docker's log (as Wings)."""
        docker = _docker()
        try:
            data = self.client.logs(self.name, stdout=True, stderr=True, tail=max(1, lines))
        except docker.errors.NotFound:
            return []
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("reading the container's log", exc) from None
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        return [line for line in text.split("\n") if line][-lines:]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self._stats)
        stats["network"] = dict(
            stats["network"]
        )  # the one nested value: the caller may change its copy
        return stats

    # -- boot ------------------------------------------------------------------------------------

    def attach_if_running(self, config: ServerConfig) -> bool:
        """Re-attach to a running container without restarting it (daemon restart). True if running."""
        try:
            info = self._inspect()
        except WingsliteError as exc:
            LOG.error("server %s: %s", self.server_uuid, exc.message)
            return False
        if info is None or not info["State"].get("Running"):
            return False
        with self._lock:
            self._process = config.process
            self.console.begin([], config.process.strip_ansi, None)
            self._set_state(RUNNING)  # as Wings: no done matching for a process that already runs
        self._attach(info)
        return True

    def close(self) -> None:
        """Stop reading the console and stats; the container keeps running."""
        self._detach()

    # -- installation (the installer itself is ``DockerInstaller`` below) -----------------------

    def install(
        self,
        config: ServerConfig,
        script: Mapping[str, str],
        on_output: Callable[[bytes], None],
        log_path: Path,
    ) -> int:
        installer = DockerInstaller(self)
        with self._lock:
            if self._installer is not None:
                raise Conflict("server is currently installing")
            self._installer = installer
        try:
            return installer.run(config, script, on_output, log_path)
        finally:
            with self._lock:
                self._installer = None

    def abort_install(self) -> bool:
        installer = self._installer
        if installer is None:
            return False
        installer.abort()
        return True


def _zero_stats() -> dict[str, Any]:
    return {
        "memory_bytes": 0,
        "memory_limit_bytes": 0,
        "cpu_absolute": 0.0,
        "network": {"rx_bytes": 0, "tx_bytes": 0},
        "uptime": 0,
    }


def utilization_from_docker(
    sample: Mapping[str, Any], started_at: float, now: float | None = None
) -> dict[str, Any]:
    """One Docker stats sample in Wings' ``utilization`` shape (environment/docker/stats.go).

    ``memory_bytes`` is usage minus inactive file cache, ``cpu_absolute`` the Docker CLI's
    percentage (100 per CPU), ``uptime`` milliseconds since the container started.
    """
    memory = sample.get("memory_stats") or {}
    usage = int(memory.get("usage") or 0)
    detail = memory.get("stats") or {}
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0)) or 0
    cpu, pre = sample.get("cpu_stats") or {}, sample.get("precpu_stats") or {}
    cpu_delta = ((cpu.get("cpu_usage") or {}).get("total_usage") or 0) - (
        (pre.get("cpu_usage") or {}).get("total_usage") or 0
    )
    system_delta = (cpu.get("system_cpu_usage") or 0) - (pre.get("system_cpu_usage") or 0)
    online = (
        cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    )
    cpu_percent = (
        round(cpu_delta / system_delta * online * 100, 3)
        if cpu_delta > 0 and system_delta > 0
        else 0.0
    )
    networks = (sample.get("networks") or {}).values()
    now = time.time() if now is None else now
    return {
        "memory_bytes": usage - inactive if 0 < inactive < usage else usage,
        "memory_limit_bytes": int(memory.get("limit") or 0),
        "cpu_absolute": cpu_percent,
        "network": {
            "rx_bytes": sum(int(n.get("rx_bytes") or 0) for n in networks),
            "tx_bytes": sum(int(n.get("tx_bytes") or 0) for n in networks),
        },
        "uptime": max(0, int((now - started_at) * 1000)) if started_at else 0,
    }


def _docker_error(what: str, exc: BaseException) -> WingsliteError:
    """A Docker failure as the operator should read it: always naming Docker."""
    docker = _docker()
    if isinstance(exc, docker.errors.APIError):
        return WingsliteError(f"Docker: {what} failed: {exc.explanation or exc}")
    return WingsliteError(f"Docker engine unreachable while {what}: {exc}")


def _docker_time(text: str | None) -> float:
    """Docker's RFC 3339 nano timestamp as epoch seconds (0 for the zero time)."""
    if not text or text.startswith("0001-"):
        return 0.0
    whole, _, frac = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
    return stamp + (float("0." + frac.split("+")[0]) if frac else 0.0)


def _timezone(config: Config) -> str:
    """``system.timezone``, else the host's (``$TZ``, ``/etc/timezone``), else UTC (as Wings)."""
    if config.get("system.timezone"):
        return config.get("system.timezone")
    if os.environ.get("TZ"):
        return os.environ["TZ"]
    with contextlib.suppress(OSError):
        return Path("/etc/timezone").read_text().strip() or "UTC"
    return "UTC"


def _pages(value: int | None) -> int | None:
    return None if value is None else value // _PAGE


# -- installation --------------------------------------------------------------------------------
#
# An egg's install script runs in its own container, ``<uuid>_installer``, built from the egg's
# install image with the server's files at /mnt/server and the script at /mnt/install/install.sh
# (Wings server/install.go). It runs as the image's user -- install scripts install packages --
# and the daemon gives the files to the node user afterwards.

INSTALL_LOG_HEADER = """Pterodactyl Server Installation Log

|
| Details
| ------------------------------
  Server UUID:          {uuid}
  Container Image:      {image}
  Container Entrypoint: {entrypoint}

|
| Environment Variables
| ------------------------------
{environment}

|
| Install Script
| ------------------------------
{script}

|
| Script Output
| ------------------------------
"""

# Wings' dropped capabilities, less those a root install script needs to write into files the
# node user owns (a reinstall over existing files).
_INSTALLER_CAP_DROP = tuple(c for c in _CAP_DROP if c not in ("dac_override", "fowner", "fsetid"))


def installer_resources(build: Build, config: Config) -> dict[str, Any]:
    """The installer's limits: the server's, raised to ``docker.installer_limits`` (Wings
    ``resourceLimits``): memory at least its MB (an unlimited server gets exactly that), CPU at
    least its percent unless the server's CPU is unlimited; installer CPU 0 = unlimited. No pids
    limit: the script is the egg's, written by an administrator.
    """
    cpu_floor = config.get("docker.installer_limits.cpu")
    cpu = 0 if cpu_floor == 0 or build.cpu_percent == 0 else max(build.cpu_percent, cpu_floor)
    memory = max(build.memory_mb, config.get("docker.installer_limits.memory"))
    resources = container_resources(
        dataclasses.replace(build, memory_mb=memory, cpu_percent=cpu), config
    )
    del resources["PidsLimit"]
    return resources


class DockerInstaller:
    """One run of a server's install script in a ``<uuid>_installer`` container.

    Methods for the caller: ``run(config, script, on_output, log_path)`` returns the script's
    exit code, or raises ``WingsliteError`` when it could not run (no image, Docker refused,
    cancelled); ``abort()`` (any thread) removes the container, and ``run`` then raises. Whatever
    happens, ``run`` leaves no container and no script directory behind, and writes the log file
    (Wings' header, then the output, then the reason of a failure).
    """

    def __init__(self, env: DockerEnvironment):
        self.env = env
        self.client = env.client
        self.name = f"{env.name}_installer"
        self.tmp_dir = Path(env.config.get("system.tmp_directory")) / env.name
        self._aborted = threading.Event()

    def run(
        self,
        config: ServerConfig,
        script: Mapping[str, str],
        on_output: Callable[[bytes], None],
        log_path: Path,
    ) -> int:
        docker = _docker()
        output, error = b"", None
        try:
            self._write_script(script["script"])
            image = self.env._ensure_image(script["container_image"])
            self._remove()
            self._create(config, script, image)
            self._check_aborted()
            self.client.start(self.name)
            self.env.events.publish(
                "daemon message", "Starting installation process, this could take a few minutes..."
            )
            for chunk in self.client.logs(
                self.name, stdout=True, stderr=True, stream=True, follow=True
            ):
                on_output(chunk)
            exit_code = int(self.client.wait(self.name).get("StatusCode", 1))
            self._check_aborted()
            output = self.client.logs(self.name, stdout=True, stderr=True)
            self.env.events.publish("daemon message", "Installation process completed.")
            if exit_code:
                error = f"the install script exited with code {exit_code}"
            return exit_code
        except (WingsliteError, docker.errors.DockerException, OSError) as exc:
            if self._aborted.is_set():
                error = "the installation was cancelled"
            elif isinstance(exc, WingsliteError):
                error = exc.message
            else:
                error = _docker_error("running the install container", exc).message
            raise WingsliteError(error) from None
        finally:
            self._remove()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            write_install_log(log_path, config, script, output, error, _timezone(self.env.config))

    def abort(self) -> None:
        self._aborted.set()
        self._remove()

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise WingsliteError("the installation was cancelled")

    def _write_script(self, text: str) -> None:
        """The script as ``install.sh`` in a directory of its own; CRLF -> LF as Wings does."""
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp_dir / "install.sh"
        path.write_bytes(text.replace("\r\n", "\n").encode())
        path.chmod(0o644)

    def _remove(self) -> None:
        docker = _docker()
        try:
            self.client.remove_container(self.name, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            LOG.warning("server %s: removing %s failed: %s", self.env.name, self.name, exc)

    def _create(self, config: ServerConfig, script: Mapping[str, str], image: str) -> None:
        docker = _docker()
        node = self.env.config
        self.env.data_dir.mkdir(parents=True, exist_ok=True)
        host_config = self.client.create_host_config(
            mounts=[
                docker.types.Mount("/mnt/server", str(self.env.data_dir), type="bind"),
                docker.types.Mount("/mnt/install", str(self.tmp_dir), type="bind"),
            ],
            tmpfs={"/tmp": f"rw,exec,nosuid,size={node.get('docker.tmpfs_size')}M"},
            security_opt=["no-new-privileges"],
            cap_drop=list(_INSTALLER_CAP_DROP),
            dns=[str(d) for d in node.get("docker.network.dns")],
            network_mode=node.get("wingslite.docker_network"),
            log_config=self.env.log_config,
            userns_mode=node.get("docker.userns_mode") or None,
        )
        host_config.update(installer_resources(config.build, node))
        container = self.client.create_container_config(
            image,
            [script["entrypoint"], "/mnt/install/install.sh"],
            hostname="installer",
            environment=container_environment(config, _timezone(node)),
            labels={"Service": "Pterodactyl", "ContainerType": "server_installer"},
            tty=True,  # stdin stays closed: a script that reads it gets EOF instead of hanging
            host_config=host_config,
        )
        try:
            self.client.create_container_from_config(container, self.name)
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("creating the install container", exc) from None


def write_install_log(
    log_path: Path,
    config: ServerConfig,
    script: Mapping[str, str],
    output: bytes,
    error: str | None,
    timezone: str = "UTC",
) -> None:
    """``<system.log_directory>/install/<uuid>.log``: Wings' header, the output, why it failed."""
    header = INSTALL_LOG_HEADER.format(
        uuid=config.uuid,
        image=script.get("container_image", ""),
        entrypoint=script.get("entrypoint", ""),
        environment="\n".join(f"  {line}" for line in container_environment(config, timezone)),
        script="\n".join(
            f"  {line}" for line in script.get("script", "").replace("\r\n", "\n").split("\n")
        ),
    )
    text = header.encode() + output
    if error:
        text += f"\nInstallation failed: {error}\n".encode()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(log_path, text, 0o600)
    except OSError as exc:
        LOG.warning("server %s: cannot write %s: %s", config.uuid, log_path, exc)


def remove_leftover_installers(client: Any, uuids: Iterable[str], tmp_directory: Path) -> list[str]:
    """Remove the ``<uuid>_installer`` containers and script directories of these servers only.

    An install that a daemon restart interrupted leaves them behind (Wings removes the container
    before its next install). Other daemons' installers on the same engine are left alone.
    """
    docker = _docker()
    wanted = set(uuids)
    removed = []
    try:
        found = client.containers(all=True, filters={"label": "ContainerType=server_installer"})
    except (docker.errors.DockerException, OSError) as exc:
        LOG.warning("could not list leftover install containers: %s", exc)
        return removed
    for container in found:
        names = [n.lstrip("/") for n in container.get("Names") or []]
        uuid = next((n[: -len("_installer")] for n in names if n.endswith("_installer")), "")
        if uuid not in wanted:
            continue
        with contextlib.suppress(docker.errors.NotFound):
            try:
                client.remove_container(container["Id"], force=True, v=True)
            except (docker.errors.DockerException, OSError) as exc:
                LOG.warning("could not remove leftover %s_installer: %s", uuid, exc)
                continue
        shutil.rmtree(Path(tmp_directory) / uuid, ignore_errors=True)
        removed.append(uuid)
    return removed


# console and events ###############################################################################


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
        self._encoded: tuple[str, tuple[Any, ...], Any] | None = None

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

    def encoded(
        self, event: str, args: tuple[Any, ...], encode: Callable[[str, tuple[Any, ...]], Any]
    ) -> Any:
        """``encode(event, args)``, computed once per published event however many subscribers ask.

        Subscribers of one publication receive the very same argument objects, so identity tells
        them apart from any other event; 30 websockets on a flooding console encode each line once.
        """
        last = self._encoded  # one tuple, replaced whole: safe without a lock
        if (
            last is not None
            and last[0] == event
            and len(last[1]) == len(args)
            and all(a is b for a, b in zip(last[1], args, strict=True))
        ):
            return last[2]
        value = encode(event, args)
        self._encoded = (event, args, value)
        return value


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


# -- the console pipeline: process output -> lines -> done detection -> throttle -> events -------

CONSOLE_LINE_MAX_BYTES = 64 * 1024  # Wings system/utils.go: longer lines are cut here
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


class LineSplitter:
    """Raw console bytes -> lines, by Wings' rules (``ScanReader``, system/utils.go).

    Lines end at ``\\n`` (a ``\\r`` before it is dropped); inside a line, ``" \\r"`` becomes
    ``"\\r\\n"`` (games such as Minecraft emit stray carriage returns at the terminal width);
    empty lines are not emitted; a line longer than ``max_bytes`` is cut there and the rest of
    it, up to the next newline, is dropped, so one endless line cannot grow the buffer.
    """

    def __init__(self, max_bytes: int = CONSOLE_LINE_MAX_BYTES):
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            self._emit(line, lines)
        if len(self._buffer) > self.max_bytes:
            if not self._skipping:
                self._emit(bytes(self._buffer), lines)
            self._skipping = True
            self._buffer.clear()
        return lines

    def flush(self) -> list[str]:
        """The unterminated rest, as a last line (end of stream)."""
        lines: list[str] = []
        if self._buffer and not self._skipping:
            self._emit(bytes(self._buffer), lines)
        self._buffer.clear()
        self._skipping = False
        return lines

    def _emit(self, line: bytes, out: list[str]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        line = line.replace(b" \r", b"\r\n")[: self.max_bytes]
        if line:
            out.append(line.decode("utf-8", "replace"))


class ConsoleThrottle:
    """Wings' console flood limit: ``lines`` per ``interval_ms`` fixed window (server/console.go).

    ``allow()`` is False for lines over the limit; the first refusal after an allowed line calls
    ``on_strike`` once (Wings prints "Server is outputting console data too quickly --
    throttling..."). ``lines`` 0 means no limit.
    """

    def __init__(
        self,
        lines: int,
        interval_ms: int,
        on_strike: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.lines = lines
        self.interval_s = interval_ms / 1000
        self.on_strike = on_strike
        self._clock = clock
        self._count = 0
        self._window_start = clock()
        self._struck = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if not self.lines:
            return True
        with self._lock:
            now = self._clock()
            if now - self._window_start > self.interval_s:
                self._count, self._window_start = 0, now
            if self._count < self.lines:
                self._count += 1
                self._struck = False
                return True
            strike, self._struck = not self._struck, True
        if strike and self.on_strike is not None:
            self.on_strike()
        return False

    def reset(self) -> None:
        with self._lock:
            self._count, self._window_start, self._struck = 0, self._clock(), False


class ConsolePipeline:
    """One server's console: process output -> lines -> ``done`` detection -> throttle -> events.

    The environment feeds it raw bytes (``feed``); every complete line is matched against the
    startup ``done`` matchers while armed (before the throttle, as Wings: a dropped line still
    counts), then published as ``("console output", line)`` unless the throttle drops it.
    Methods for the caller: ``begin(matchers, strip_ansi, on_done)``, ``feed(data)``, ``end()``,
    ``daemon_message(text)``.
    """

    def __init__(
        self,
        events: EventBus,
        *,
        throttle_lines: int = 2000,
        throttle_interval_ms: int = 100,
        app_name: str = "Pterodactyl",
    ):
        self.events = events
        self.app_name = app_name
        self.throttle = ConsoleThrottle(throttle_lines, throttle_interval_ms, self._strike)
        self._splitter = LineSplitter()
        self._matchers: list[Callable[[str], Any]] = []
        self._strip_ansi = False
        self._on_done: Callable[[], None] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, events: EventBus, config: Config) -> ConsolePipeline:
        # Wings never consults throttles.enabled; wingslite honours it (false = no limit).
        lines = config.get("throttles.lines") if config.get("throttles.enabled") else 0
        app_name = (
            config.raw.get("app_name")
            if isinstance(config.raw.get("app_name"), str)
            else "Pterodactyl"
        )
        return cls(
            events,
            throttle_lines=lines,
            throttle_interval_ms=config.get("throttles.line_reset_interval"),
            app_name=app_name,
        )

    def begin(
        self,
        matchers: Iterable[Callable[[str], Any]],
        strip_ansi: bool,
        on_done: Callable[[], None] | None,
    ) -> None:
        """A new process: arm ``done`` detection (``on_done`` runs once) and reset the throttle."""
        with self._lock:
            self._matchers = list(matchers) if on_done is not None else []
            self._strip_ansi = strip_ansi
            self._on_done = on_done
            self._splitter = LineSplitter()
        self.throttle.reset()

    def feed(self, data: bytes) -> None:
        with self._lock:
            lines = self._splitter.feed(data)
        for line in lines:
            self._line(line)

    def end(self) -> None:
        with self._lock:
            lines = self._splitter.flush()
        for line in lines:
            self._line(line)

    def daemon_message(self, text: str) -> None:
        self.events.publish("console output", daemon_message(text, self.app_name))

    def _line(self, line: str) -> None:
        if self._matchers:
            probe = _ANSI_RE.sub("", line) if self._strip_ansi else line
            if any(match(probe) for match in self._matchers):
                with self._lock:
                    on_done, self._on_done, self._matchers = self._on_done, None, []
                if on_done is not None:
                    on_done()
        if self.throttle.allow():
            self.events.publish("console output", line)

    def _strike(self) -> None:
        self.daemon_message("Server is outputting console data too quickly -- throttling...")


# session table ####################################################################################


class Session:
    """One open websocket or SFTP session: whose it is, and how to close it now."""

    __slots__ = ("_close", "id", "kind", "opened_at", "server_uuid", "user_uuid")

    def __init__(
        self, server_uuid: str, user_uuid: str, kind: str, close: Callable[[int, str], None]
    ):
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

    def register(
        self,
        server_uuid: str,
        user_uuid: str,
        kind: str,
        close: Callable[[int, str], None],
        replaces: Session | None = None,
    ) -> Session:
        """A new session; ``replaces``, the same connection's previous one, leaves in the same step,
        so that a re-registration (a websocket's auth) never counts one connection twice against
        the per-server limit, nor leaves it out of a close that runs meanwhile."""
        session = Session(server_uuid, user_uuid, kind, close)
        with self._lock:
            if replaces is not None:
                self._sessions.pop(replaces.id, None)
            self._sessions[session.id] = session
        return session

    def unregister(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)

    def sessions(
        self, server_uuid: str | None = None, user_uuid: str | None = None, kind: str | None = None
    ) -> list[Session]:
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

    def close_server(
        self, server_uuid: str, code: int, reason: str, kind: str | None = None
    ) -> int:
        """Close every session of a server (of one kind, if given); returns how many."""
        return self._close(self.sessions(server_uuid=server_uuid, kind=kind), code, reason)

    def close_user(
        self,
        user_uuid: str,
        server_uuids: Iterable[str] | None = None,
        code: int = CLOSE_REVOKED,
        reason: str = "access revoked",
    ) -> int:
        """Close a user's sessions on the given servers (every server when ``None``)."""
        wanted = None if server_uuids is None else set(server_uuids)
        chosen = [
            s
            for s in self.sessions(user_uuid=user_uuid)
            if wanted is None or s.server_uuid in wanted
        ]
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
            cutoffs = [
                self._jtis.get(jti),
                self._users.get((user_uuid, None)),
                self._users.get((user_uuid, server_uuid)),
            ]
        if any(c is not None and iat <= int(c) for c in cutoffs):
            return "jwt: created too far in past (denylist)"
        return None


# websocket ########################################################################################


# Three layers, each usable on its own: ``WebSocket`` (RFC 6455 framing over a connected socket),
# ``decode_jwt`` (HS256 tokens signed with the node token, as the Panel signs them) and
# ``ConsoleSocket`` (Wings' console protocol: router/websocket/*.go). ``serve_websocket`` glues
# them onto the HTTP server's request thread. One connection costs two threads: the request thread
# reads frames and runs inbound events, a writer thread drains the outbound queue, so a slow client
# never blocks the event bus and a sync can close the socket at once.

# RFC 6455 close codes (section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = frozenset((_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG))


def websocket_accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode("ascii") + _WS_GUID).digest()).decode(
        "ascii"
    )


def _close_code_receivable(code: int) -> bool:
    # 1004-1006 and 1015 must never travel in a close frame; 1016-2999 are unassigned.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


def _close_payload(code: int, reason: str) -> bytes:
    if code == CLOSE_NO_STATUS:
        return b""
    raw = reason.encode("utf-8")[:123]  # a control frame carries at most 125 bytes
    return code.to_bytes(2, "big") + raw.decode("utf-8", "ignore").encode("utf-8")


class WebSocketClosed(Exception):
    """The connection is over. ``code``/``reason``: the close frame that ended it (1006: none)."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"websocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class _Violation(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WebSocket:
    """The server side of one RFC 6455 connection over a connected TCP socket.

    Methods for the caller:
        ``accept(response)`` writes the 101 response and starts the writer thread;
        ``receive(timeout_s)`` returns the next complete message (``str`` for text, ``bytes`` for
        binary) or ``None`` on timeout, answers pings and the close handshake itself, and raises
        ``WebSocketClosed`` when the connection is over (after sending the close frame the RFC
        asks for: 1002 protocol error, 1007 invalid UTF-8, 1009 too big);
        ``send_text(text)`` queues a message and never blocks (any thread);
        ``ping()``; ``close(code, reason)`` writes the close frame before it returns (any thread);
        ``abort()`` drops the TCP connection; ``join()`` drops it and waits for the writer.
    Class variables that may be overridden: the limits below.

    ``receive`` belongs to one reader thread. Outbound messages go through a bounded queue drained
    by a writer thread; when the client reads too slowly the oldest queued messages are dropped,
    as Wings' sinks do (system/sink_pool.go).
    """

    max_frame_bytes = 4096  # Wings 1.12 SetReadLimit(4096)
    max_message_bytes = 32768  # Wings 1.12 drops messages over 32,768 bytes
    max_queued_bytes = 1_048_576
    write_batch_bytes = 65536  # queued frames sent together in one write
    send_timeout_s = 10.0  # a sendall that stalls this long means a dead or hostile client
    close_timeout_s = 2.0  # wait this long for the client's close reply, then drop TCP
    # A writer still inside a send after this long is blocked on a client that does not read: close()
    # then drops the connection instead of queueing behind it, so that closing many stuck sockets
    # (a suspending sync) costs milliseconds each, not seconds.
    close_lock_timeout_s = 0.05

    def __init__(self, sock: socket.socket, initial: bytes = b""):
        self._sock = sock
        self._buf = bytearray(initial)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self.dropped_messages = 0
        self._opened = False
        self._close_pending: tuple[int, str] | None = None
        self._close_sent = False
        self._finished = threading.Event()  # TCP shut down; nothing more to read or write
        self._writer: threading.Thread | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_received = time.monotonic()
        self._msg_opcode: int | None = None
        self._msg_parts: list[Any] = []
        self._msg_bytes = 0
        self._utf8: codecs.IncrementalDecoder | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def accept(self, response: bytes) -> None:
        """Write the handshake response, then any close asked for while it was being prepared."""
        with self._send_lock:
            self._sock.settimeout(self.send_timeout_s)
            self._sock.sendall(response)
            self._opened = True
            pending = self._close_pending
        self._writer = threading.Thread(
            target=self._write_loop, name="wingslite-ws-writer", daemon=True
        )
        self._writer.start()
        if pending is not None:
            self.close(*pending)

    @property
    def closed(self) -> bool:
        """True once a close frame was sent or the connection dropped."""
        return self._close_sent or self._finished.is_set()

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send the close frame now (it is on the wire when this returns) and end the connection.

        The client's close reply is awaited for ``close_timeout_s``; then TCP is shut down. Safe to
        call from any thread and more than once (only the first call sends a frame).
        """
        if not self._send_lock.acquire(timeout=self.close_lock_timeout_s):
            # The writer is stuck in a sendall to a client that does not read: nothing we send
            # would reach it, so drop the connection.
            self.close_code, self.close_reason = code, reason
            self.abort()
            return
        try:
            if self._close_sent or self._finished.is_set():
                return
            if not self._opened:
                self._close_pending = (code, reason)
                return
            self._close_sent = True
            self.close_code, self.close_reason = code, reason
            frame = _frame(_OP_CLOSE, _close_payload(code, reason))
            try:
                # Never wait for a client that does not read: if the frame does not fit in the
                # socket's buffer at once, the connection is dropped instead (a suspending sync
                # must not stall for send_timeout_s on one stuck client).
                # os.write, not socket.send: with a timeout set, CPython's send waits for the
                # socket to become writable (up to the timeout) even when asked not to wait.
                if os.write(self._sock.fileno(), frame) < len(frame):
                    raise BlockingIOError
            except OSError:
                self._finished.set()
        finally:
            self._send_lock.release()
        if self._finished.is_set():
            self.abort()
        with self._cond:
            self._cond.notify_all()

    def abort(self) -> None:
        """Shut the TCP connection down at once (the reader sees the end of the stream)."""
        self._finished.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout_s: float = 5.0) -> None:
        """Drop the connection if still up and wait for the writer thread to end."""
        self.abort()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout_s)

    # -- sending --------------------------------------------------------------------------------

    def send_text(self, text: str) -> bool:
        """Queue a text message; False when the connection is closing or closed."""
        return self._enqueue(_frame(_OP_TEXT, text.encode("utf-8")))

    def send_frame(self, frame: bytes) -> bool:
        """Queue a frame made by ``_frame()`` (one encoding shared by many sockets)."""
        return self._enqueue(frame)

    def ping(self, payload: bytes = b"") -> bool:
        """Queue a ping (keep-alive: a live client answers with a pong)."""
        return self._enqueue(_frame(_OP_PING, payload[:125]), control=True)

    def _enqueue(self, frame: bytes, control: bool = False) -> bool:
        with self._cond:
            if self._close_sent or self._finished.is_set():
                return False
            if control:
                self._queue.appendleft(frame)
            else:
                self._queue.append(frame)
            self._queued_bytes += len(frame)
            while self._queued_bytes > self.max_queued_bytes and len(self._queue) > 1:
                self._queued_bytes -= len(self._queue.popleft())
                self.dropped_messages += 1
            self._cond.notify()
        return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._close_sent and not self._finished.is_set():
                    self._cond.wait()
                if self._close_sent or self._finished.is_set():
                    self._queue.clear()
                    break
                # Everything queued goes out in one send: a console flood costs one system call
                # per batch instead of one per line.
                frames = [self._queue.popleft()]
                size = len(frames[0])
                while self._queue and size < self.write_batch_bytes:
                    frames.append(self._queue.popleft())
                    size += len(frames[-1])
                self._queued_bytes -= size
            with self._send_lock:
                if self._close_sent or self._finished.is_set():
                    break
                try:
                    self._sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))
                except OSError:  # timeout or reset: the client is gone or not reading
                    self._finished.set()
                    break
        # After our close frame: give the client close_timeout_s to answer, then drop TCP so
        # that the reader thread wakes up even if the client never replies.
        if not self._finished.wait(self.close_timeout_s):
            LOG.debug(
                "websocket: no close reply within %.1f s, dropping the connection",
                self.close_timeout_s,
            )
        self.abort()

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, timeout_s: float | None = None) -> str | bytes | None:
        """The next complete message, or None when ``timeout_s`` passes without one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                frame = self._parse_frame()
                if frame is None:
                    if not self._fill(deadline):
                        return None
                    continue
                message = self._on_frame(*frame)
                if message is not None:
                    return message
        except _Violation as exc:
            LOG.debug("websocket: closing with %d: %s", exc.code, exc.reason)
            self.close(exc.code, exc.reason)
            self.abort()  # "fail the connection": no need to wait for the client's reply
            raise WebSocketClosed(exc.code, exc.reason) from None

    def _fill(self, deadline: float | None) -> bool:
        if self._finished.is_set():
            raise WebSocketClosed(*self._ending())
        timeout_ms = (
            None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        )
        if not self._poll.poll(timeout_ms):
            return False
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return True
        except OSError:
            data = b""
        if not data:
            self._finished.set()
            with self._cond:
                self._cond.notify_all()
            raise WebSocketClosed(*self._ending())
        self._buf += data
        self.last_received = time.monotonic()
        return True

    def _ending(self) -> tuple[int, str]:
        if self.close_code is not None:
            return self.close_code, self.close_reason
        return CLOSE_ABNORMAL, ""

    def _parse_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode, length = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        if b0 & 0x70:
            raise _Violation(
                CLOSE_PROTOCOL_ERROR, "reserved bits set, but no extension was negotiated"
            )
        if opcode not in _KNOWN_OPCODES:
            raise _Violation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not b1 & 0x80:
            raise _Violation(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= _OP_CLOSE and (not fin or length > 125):
            raise _Violation(
                CLOSE_PROTOCOL_ERROR, "control frames must be unfragmented and at most 125 bytes"
            )
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = int.from_bytes(buf[2:10], "big"), 10
            if length >> 63:
                raise _Violation(
                    CLOSE_PROTOCOL_ERROR, "frame length has its most significant bit set"
                )
        if length > self.max_frame_bytes:
            raise _Violation(
                CLOSE_TOO_BIG, f"frame of {length} bytes, the limit is {self.max_frame_bytes}"
            )
        end = pos + 4 + length
        if len(buf) < end:
            return None
        payload = _unmask(bytes(buf[pos + 4 : end]), bytes(buf[pos : pos + 4]))
        del buf[:end]
        return fin, opcode, payload

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> str | bytes | None:
        if opcode == _OP_PING:
            self._enqueue(_frame(_OP_PONG, payload), control=True)
            return None
        if opcode == _OP_PONG:
            return None
        if opcode == _OP_CLOSE:
            self._on_close_frame(payload)
        if opcode == _OP_CONT:
            if self._msg_opcode is None:
                raise _Violation(
                    CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue"
                )
        else:
            if self._msg_opcode is not None:
                raise _Violation(
                    CLOSE_PROTOCOL_ERROR, "new message before the previous one was finished"
                )
            self._msg_opcode, self._msg_parts, self._msg_bytes = opcode, [], 0
            self._utf8 = (
                codecs.getincrementaldecoder("utf-8")("strict") if opcode == _OP_TEXT else None
            )
        self._msg_bytes += len(payload)
        if self._msg_bytes > self.max_message_bytes:
            raise _Violation(CLOSE_TOO_BIG, f"message of more than {self.max_message_bytes} bytes")
        if self._utf8 is not None:
            try:
                # Incremental, so that a code point split across fragments is fine and invalid
                # bytes fail as soon as they arrive (RFC 6455 section 8.1).
                self._msg_parts.append(self._utf8.decode(payload, final=fin))
            except UnicodeDecodeError:
                raise _Violation(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None
        else:
            self._msg_parts.append(payload)
        if not fin:
            return None
        text = self._msg_opcode == _OP_TEXT
        parts, self._msg_opcode, self._msg_parts, self._utf8 = self._msg_parts, None, [], None
        if self._close_sent:
            return None  # data after our close frame is discarded (RFC 6455 section 1.4)
        return "".join(parts) if text else b"".join(parts)

    def _on_close_frame(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise _Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code, reason = CLOSE_NO_STATUS, ""
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not _close_code_receivable(code):
                raise _Violation(
                    CLOSE_PROTOCOL_ERROR, f"close code {code} is not allowed on the wire"
                )
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Violation(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
        if not self._close_sent:
            self.close(code, reason)  # echo the client's code, as the RFC suggests
        # The handshake is complete: the server closes TCP first (RFC 6455 section 7.1.1).
        self.abort()
        raise WebSocketClosed(*self._ending())


# -- JWTs ------------------------------------------------------------------------------------------

# The texts are the ones Wings' JWT library (gbrlsnchs/jwt v3) and its token code produce; the
# Panel's browser client matches on two of them to fetch a fresh token and re-authenticate.
JWT_EXPIRED = "jwt: exp claim is invalid"
JWT_DENIED = "jwt: created too far in past (denylist)"
JWT_NO_CONNECT = "jwt: missing connect permission"
JWT_WRONG_SERVER = "jwt: server uuid mismatch"
JWT_MISSING = "jwt: no jwt present"
JWT_MALFORMED = "jwt: malformed token"
JWT_BAD_ALG = "jwt: header contains unexpected algorithm"
JWT_BAD_SIGNATURE = "jwt: HMAC verification failed"

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


class JwtError(Exception):
    """A token that is refused; ``str(exc)`` is Wings' text for it (``jwt: ...``)."""


def _b64url_decode(part: str) -> bytes:
    if not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise JwtError(JWT_MALFORMED)
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(part))
    except (ValueError, RecursionError):  # includes UnicodeDecodeError and JSONDecodeError
        raise JwtError(JWT_MALFORMED) from None
    if not isinstance(value, dict):
        raise JwtError(JWT_MALFORMED)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def decode_jwt(token: str, secret: str | bytes, now: float | None = None) -> dict[str, Any]:
    """Verify an HS256 JWT signed with ``secret`` and return its claims; ``JwtError`` otherwise.

    The header's ``alg`` must be exactly ``HS256`` (so ``none`` and every other algorithm are
    refused before any signature maths), the signature is compared in constant time, and ``exp``
    must be a number in the future -- missing ``exp`` is invalid, as in Wings. Other claims are
    returned as they are; the caller checks ``iat``, permissions and the server.
    """
    if not isinstance(token, str) or len(token) > 16384 or not token.isascii():
        raise JwtError(JWT_MALFORMED)
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError(JWT_MALFORMED)
    header = _json_part(parts[0])
    if header.get("alg") != "HS256":
        raise JwtError(JWT_BAD_ALG)
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(_b64url_decode(parts[2]), expected):
        raise JwtError(JWT_BAD_SIGNATURE)
    claims = _json_part(parts[1])
    exp = claims.get("exp")
    if not _is_number(exp) or (time.time() if now is None else now) > exp:
        raise JwtError(JWT_EXPIRED)
    return claims


def encode_jwt(
    claims: Mapping[str, Any], secret: str | bytes, header: Mapping[str, Any] | None = None
) -> str:
    """Sign ``claims`` with HS256, the way the Panel does (tests, tools and the demo Panel use it)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    head = {"typ": "JWT", "alg": "HS256", **(header or {})}
    signing = (
        b64(json.dumps(head, separators=(",", ":")).encode())
        + "."
        + b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return signing + "." + b64(hmac.new(key, signing.encode("ascii"), hashlib.sha256).digest())


@dataclasses.dataclass(frozen=True)
class WebsocketToken:
    """The claims of an accepted websocket JWT that wingslite uses."""

    jti: str
    user_uuid: str
    server_uuid: str
    iat: float
    exp: float
    permissions: tuple[str, ...]

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> WebsocketToken:
        perms = claims.get("permissions")
        perms = tuple(p for p in perms if isinstance(p, str)) if isinstance(perms, list) else ()
        iat = claims.get("iat")

        def text(key: str) -> str:
            value = claims.get(key)
            return value if isinstance(value, str) else ""

        return cls(
            text("jti"),
            text("user_uuid"),
            text("server_uuid"),
            iat if _is_number(iat) else -1.0,
            claims["exp"],
            perms,
        )

    def can(self, permission: str) -> bool:
        """Wings' matching: exact, or ``*`` for everything that does not start with ``admin``."""
        return permission in self.permissions or (
            "*" in self.permissions and not permission.startswith("admin")
        )


# -- rate limits -----------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key: ``allow(key)`` is True while the key is within its rate.

    ``rates`` maps a key to ``(count, per_s)``: at most ``count`` in a burst, refilled at
    ``count / per_s`` per second. Keys without an entry use ``default``. Not thread-safe: one
    limiter belongs to one connection's reader thread.
    """

    def __init__(
        self,
        rates: Mapping[str, tuple[int, float]],
        default: tuple[int, float],
        clock: Callable[[], float] = time.monotonic,
    ):
        self._rates = dict(rates)
        self._default = default
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def allow(self, key: str) -> bool:
        count, per_s = self._rates.get(key, self._default)
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(count), now))
        tokens = min(float(count), tokens + (now - last) * count / per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


# -- Wings' console protocol -----------------------------------------------------------------------

# Wings 1.12's limits (router/websocket/limiter.go): per event, plus 10 messages per 200 ms overall.
WEBSOCKET_EVENT_RATES: Mapping[str, tuple[int, float]] = {
    "auth": (2, 5.0),
    "send logs": (2, 5.0),
    "send command": (10, 1.0),
}
WEBSOCKET_DEFAULT_RATE = (4, 1.0)
WEBSOCKET_TOTAL_RATE = (10, 0.2)

_GENERIC_ERROR = "an unexpected error was encountered while handling this request"
# Outbound events only some tokens may see (router/websocket/listeners.go).
_EVENT_PERMISSIONS = {
    "install output": "admin.websocket.install",
    "transfer logs": "admin.websocket.transfer",
    "transfer status": "admin.websocket.transfer",
    "backup completed": "backup.read",
}
# Published on a server's event bus after ``POST /ws/deny``: its sockets re-check their tokens now,
# instead of at the client's next message as in Wings.
WEBSOCKET_RECHECK_EVENT = "wingslite: tokens revoked"
# The inbound events Wings handles; any other name shares one rate-limit key, so that a client cannot
# grow a socket's limiter state with made-up names (every other name is ignored anyway).
_INBOUND_EVENTS = frozenset(("auth", "send logs", "send stats", "send command", "set state"))
_POWER_PERMISSIONS = {
    "start": "control.start",
    "stop": "control.stop",
    "restart": "control.restart",
    "kill": "control.stop",
}


def stats_json(utilization: Mapping[str, Any]) -> str:
    """The ``stats`` payload: a JSON string; ``network`` is always present (the browser reads it)."""
    data = dict(utilization)
    network = data.get("network")
    data["network"] = {
        "rx_bytes": network.get("rx_bytes", 0) if isinstance(network, Mapping) else 0,
        "tx_bytes": network.get("tx_bytes", 0) if isinstance(network, Mapping) else 0,
    }
    for key in ("memory_bytes", "memory_limit_bytes", "cpu_absolute", "uptime", "disk_bytes"):
        data.setdefault(key, 0)
    return json.dumps(data, separators=(",", ":"))


def _event_frame(event: str, args: tuple[Any, ...]) -> bytes:
    """Wings' message ``{"event", "args"}`` as one text frame; non-string args are JSON-encoded."""
    message: dict[str, Any] = {"event": event}
    if args:
        message["args"] = [a if isinstance(a, str) else json.dumps(a) for a in args]
    return _frame(_OP_TEXT, json.dumps(message, separators=(",", ":")).encode("utf-8"))


class ConsoleSocket:
    """Wings' console protocol on one accepted ``WebSocket`` (router/websocket/websocket.go).

    Methods for the caller: ``register(user_uuid)`` (into the daemon's session table), ``run()``
    (the reader loop; returns when the connection is over and never raises) and
    ``close(code, reason)`` (what the session table calls).
    Class variables that may be overridden: ``auth_timeout_s``, ``ping_interval_s``,
    ``expiring_window_s``, ``power_wait_s``.

    The socket is in the session table from the upgrade on, under its user once a token is
    accepted, so that suspension, deletion and deauthorisation can close it.
    """

    auth_timeout_s = 30.0  # an unauthenticated socket only occupies one of the server's slots
    ping_interval_s = 30.0
    expiring_window_s = 60.0  # Wings sends "token expiring" with <= 60 s left (listeners.go)
    power_wait_s = 0  # Wings' websocket power actions do not wait for the power lock

    def __init__(self, ws: WebSocket, server: Any, daemon: Any):
        self.ws = ws
        self.server = server
        self.daemon = daemon
        self.token: WebsocketToken | None = None
        self.session: Any = None
        self._expiring_sent = False
        self._expired_sent = False
        self._muted = False  # token expired or revoked: nothing is forwarded until a new auth
        self._subscription: Any = None
        self._power_thread: threading.Thread | None = None
        self._limiter = RateLimiter(WEBSOCKET_EVENT_RATES, WEBSOCKET_DEFAULT_RATE)
        self._total = RateLimiter({}, WEBSOCKET_TOTAL_RATE)
        self._throttled: set[str] = set()
        self._opened_at = time.monotonic()
        self._lock = threading.Lock()

    # -- session table --------------------------------------------------------------------------

    def register(self, user_uuid: str = "") -> None:
        """(Re-)register in the session table under this server and ``user_uuid``."""
        self.session = self.daemon.sessions.register(
            self.server.uuid, user_uuid, "websocket", self.close, replaces=self.session
        )

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the socket now (the close frame is written before this returns)."""
        self.ws.close(code, reason)

    # -- the reader loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Read and handle messages until the connection ends; never raises."""
        try:
            if self.server.suspended:
                self.ws.close(CLOSE_SUSPENDED, "server is suspended")
            while True:
                message = self.ws.receive(self._next_tick())
                self._tick()
                if isinstance(message, str):
                    self._on_text(message)
        except WebSocketClosed as exc:
            LOG.debug("websocket %s: closed (%d %s)", self.server.uuid, exc.code, exc.reason)
        except Exception:
            LOG.exception("websocket %s: internal error", self.server.uuid)
            self.ws.close(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._stop_forwarding()
            if self.session is not None:
                self.daemon.sessions.unregister(self.session)
            self.ws.join()

    def _next_tick(self) -> float:
        now = time.monotonic()
        due = [self.ws.last_received + self.ping_interval_s - now]
        if self.token is None:
            due.append(self._opened_at + self.auth_timeout_s - now)
        else:
            left = self.token.exp - time.time()
            if not self._expiring_sent:
                due.append(left - self.expiring_window_s)
            if not self._expired_sent:
                due.append(left)
        return min(max(0.0, min(due)) + 0.01, self.ping_interval_s)

    def _tick(self) -> None:
        now = time.monotonic()
        idle = now - self.ws.last_received
        if idle >= 2 * self.ping_interval_s:
            self.ws.close(CLOSE_GOING_AWAY, "no answer to ping")
            self.ws.abort()
            return
        if idle >= self.ping_interval_s:
            self.ws.ping()
        if self.token is None:
            if now - self._opened_at >= self.auth_timeout_s:
                self.ws.close(CLOSE_POLICY, f"no valid auth within {self.auth_timeout_s:.0f} s")
            return
        left = self.token.exp - time.time()
        if left <= 0 and not self._expired_sent:
            self._expired_sent = self._expiring_sent = self._muted = True
            self._send("token expired")
        elif left <= self.expiring_window_s and not self._expiring_sent:
            self._expiring_sent = True
            self._send("token expiring")

    # -- inbound --------------------------------------------------------------------------------

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return  # Wings ignores frames that are not JSON
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            return
        raw_args = message.get("args")
        if raw_args is None:
            raw_args = []
        if not isinstance(raw_args, list) or not all(
            a is None or isinstance(a, str) for a in raw_args
        ):
            return  # Wings' decoder refuses args that are not strings; the Panel sends null items
        event = message["event"]
        args = ["" if a is None else a for a in raw_args]
        key = event if event in _INBOUND_EVENTS else "?"
        if not self._total.allow("*") or not self._limiter.allow(key):
            if key not in self._throttled:  # say so once per burst, not per dropped message
                self._throttled.add(key)
                self._send(
                    "daemon error",
                    self._prefixed(f'too many "{event[:64]}" messages; some were dropped'),
                )
            return
        self._throttled.discard(key)
        if event == "auth":
            self._on_auth("".join(args))
            return
        problem = self._token_problem(self.token)
        if problem is not None:
            self._send("jwt error", problem)  # unprefixed for events other than auth (Wings)
            return
        try:
            if event == "send logs":
                self._send_logs()
            elif event == "send stats":
                self._send("stats", stats_json(self.server.utilization()))
            elif event == "send command":
                self._send_command(args[0] if args else "")
            elif event == "set state":
                self._set_state(args[0] if args else "")
        except Exception as exc:  # reported to the client, as Wings does
            self._daemon_error(exc)

    def _on_auth(self, jwt: str) -> None:
        if not jwt:
            self._send("jwt error", self._prefixed(JWT_MISSING))
            return
        try:
            token = WebsocketToken.from_claims(decode_jwt(jwt, self.daemon.config.token))
        except JwtError as exc:
            self._send("jwt error", self._prefixed(str(exc)))
            return
        problem = self._token_problem(token)
        if problem is not None:
            self._send("jwt error", self._prefixed(problem))
            return
        if self.server.suspended:
            self.ws.close(CLOSE_SUSPENDED, "server is suspended")
            return
        first = self.token is None
        if self.token is None or self.token.user_uuid != token.user_uuid:
            self.register(token.user_uuid)
        self.token = token
        self._expiring_sent = self._expired_sent = self._muted = False
        self._send("auth success")
        if first:
            self._subscription = self.server.events.subscribe(self._on_event)
            state = self.server.state
            self._send("status", state)
            if state == OFFLINE:
                self._send("stats", stats_json(self.server.utilization()))
        # A deny or deauthorization that landed after the check above missed this socket (not yet
        # subscribed, not yet under its user in the session table); now it cannot be missed.
        problem = self._token_problem(token)
        if problem is not None:
            self._muted = True
            self._send("jwt error", problem)

    def _token_problem(self, token: WebsocketToken | None) -> str | None:
        # The order of Wings' TokenValid(): present, exp, denylist, connect, server.
        if token is None:
            return JWT_MISSING
        if time.time() > token.exp:
            return JWT_EXPIRED
        if token.iat < 0:
            return JWT_DENIED  # no iat: Wings counts the token as denylisted
        problem = self.daemon.revocations.check(
            token.jti, token.user_uuid, token.server_uuid, token.iat
        )
        if problem:
            return problem
        if not token.can("websocket.connect"):
            return JWT_NO_CONNECT
        if token.server_uuid != self.server.uuid:
            return JWT_WRONG_SERVER
        return None

    def _send_logs(self) -> None:
        if self.server.state == OFFLINE:
            return  # Wings sends nothing when the container is not running
        for line in self.server.logs(self.daemon.config.get("system.websocket_log_count")):
            self._send("console output", line)

    def _send_command(self, line: str) -> None:
        assert self.token is not None
        if not self.token.can("control.console") or self.server.state == OFFLINE:
            return  # Wings ignores both silently
        self.server.send_command(line)

    def _set_state(self, action: str) -> None:
        assert self.token is not None
        permission = _POWER_PERMISSIONS.get(action)
        if permission is None:
            raise BadRequest(f"attempting to handle unknown power action {action[:64]!r}")
        if not self.token.can(permission):
            return  # Wings ignores it silently
        with self._lock:
            if self._power_thread is not None and self._power_thread.is_alive():
                raise Conflict(
                    "another power action is currently being processed for this server, please try again later"
                )
            # In its own thread, as Wings handles each message in its own goroutine: the reader
            # keeps answering pings and close frames while the container starts.
            self._power_thread = threading.Thread(
                target=self._power, args=(action,), name="wingslite-ws-power", daemon=True
            )
            self._power_thread.start()

    def _power(self, action: str) -> None:
        try:
            self.server.power(action, self.power_wait_s)
        except Exception as exc:
            self._daemon_error(exc)

    # -- outbound -------------------------------------------------------------------------------

    def _on_event(self, event: str, *args: Any) -> None:
        # Called from whichever thread publishes; only queues, never blocks.
        token = self.token
        if token is None or self._muted or self.ws.closed:
            return
        if event == WEBSOCKET_RECHECK_EVENT:
            problem = self._token_problem(token)
            if problem is not None:
                # The text the Panel's browser answers by fetching a new token (WebsocketHandler.tsx).
                self._muted = True
                self._send("jwt error", problem)
            return
        if time.time() > token.exp:
            return  # until the client re-authenticates ("token expired" is on its way)
        needed = _EVENT_PERMISSIONS.get(event.split(":", 1)[0])
        if needed is not None and not token.can(needed):
            return
        self.ws.send_frame(self.server.events.encoded(event, args, _event_frame))

    def _send(self, event: str, *args: Any) -> None:
        self.ws.send_frame(_event_frame(event, args))

    def _prefixed(self, text: str) -> str:
        return f"Error Event [{self.server.uuid}]: {text}"

    def _daemon_error(self, exc: Exception) -> None:
        # Wings shows the real text only to tokens with admin.websocket.errors (websocket.go:225).
        token = self.token
        text = (
            (getattr(exc, "message", None) or str(exc))
            if token is not None and token.can("admin.websocket.errors")
            else _GENERIC_ERROR
        )
        if not isinstance(exc, WingsliteError):
            LOG.warning("websocket %s: %s", self.server.uuid, exc)
        self._send("daemon error", self._prefixed(text))

    def _stop_forwarding(self) -> None:
        if self._subscription is not None:
            self.server.events.unsubscribe(self._subscription)
            self._subscription = None


# -- the HTTP route --------------------------------------------------------------------------------


def origin_allowed(origin: str | None, remote: str, allowed_origins: Any) -> bool:
    """Wings' check (router/websocket/websocket.go): the Panel's URL exactly, an ``allowed_origins``
    entry, or ``*`` in that list. A request without an Origin header is refused, as in Wings."""
    if not origin:
        return False
    if origin in (remote, remote.rstrip("/")):
        return True
    return isinstance(allowed_origins, list) and any(
        o == "*" or o == origin for o in allowed_origins
    )


class _UpgradeRefused(WingsliteError):
    def __init__(self, message: str, status: int, headers: Mapping[str, str]):
        super().__init__(message, status)
        self.headers = dict(headers)


def _header_tokens(headers: Any, name: str) -> set[str]:
    return {t.strip().lower() for t in ",".join(headers.get_all(name) or []).split(",")}


def _upgrade_key(handler: Any) -> str:
    headers = handler.headers
    if "websocket" not in _header_tokens(headers, "Upgrade") or "upgrade" not in _header_tokens(
        headers, "Connection"
    ):
        raise BadRequest(
            "This endpoint speaks only the websocket protocol: expected an 'Upgrade: websocket' request."
        )
    if handler.request_version != "HTTP/1.1":
        raise BadRequest("A websocket upgrade needs HTTP/1.1.")
    if (headers.get("Sec-WebSocket-Version") or "").strip() != "13":
        raise _UpgradeRefused(
            "Unsupported websocket version: this node speaks version 13 (RFC 6455).",
            426,
            {"Sec-WebSocket-Version": "13"},
        )
    key = (headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        raise BadRequest("Sec-WebSocket-Key must be 16 random bytes in base64.")
    return key


def _drain_read_buffer(handler: Any) -> bytes:
    # Bytes a client sent right behind its handshake may already sit in the HTTP reader's buffer;
    # the websocket reads the raw socket from here on, so take them over without blocking.
    peek = getattr(handler.rfile, "peek", None)
    if peek is None:
        return b""
    sock = handler.connection
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = peek()
        return handler.rfile.read(len(data)) if data else b""
    except OSError:
        return b""
    finally:
        sock.settimeout(timeout)


def serve_websocket(handler: Any, daemon: Any, server: Any) -> None:
    """``GET /api/servers/:server/ws``: accept the upgrade and speak Wings' console protocol on the
    request thread until the socket closes. Refusals before the upgrade raise ``WingsliteError``
    (400 not a websocket request, 403 Origin, 426 version, 429 too many sockets for the server)."""
    handler.close_connection = True  # after the socket, this connection carries no more HTTP
    try:
        key = _upgrade_key(handler)
    except _UpgradeRefused as exc:
        handler._respond(
            exc.status, {"error": exc.message, "request_id": handler.request_id}, exc.headers
        )
        return
    if not origin_allowed(
        handler.headers.get("Origin"),
        daemon.config.get("remote"),
        daemon.config.get("allowed_origins"),
    ):
        raise WingsliteError("Forbidden: this Origin may not open the server's websocket.", 403)
    ws = WebSocket(handler.connection, _drain_read_buffer(handler))
    console = ConsoleSocket(ws, server, daemon)
    # Registered before counting, so that concurrent upgrades can never exceed the limit together.
    console.register("")
    limit = daemon.config.get("wingslite.websocket_max_per_server")
    if daemon.sessions.count(server.uuid, kind="websocket") > limit:
        daemon.sessions.unregister(console.session)
        raise WingsliteError(
            f"Too many open websocket connections for this server (the limit is {limit}).", 429
        )
    response = (
        f"HTTP/1.1 101 Switching Protocols\r\nServer: {handler.server_version}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {websocket_accept_key(key)}\r\n\r\n"
    )
    try:
        ws.accept(response.encode("ascii"))
    except OSError:
        daemon.sessions.unregister(console.session)
        ws.join()
        return
    console.run()


# SFTP #############################################################################################


# Wings answers a write past the disk limit with SFTP status 15, "Quota Exceeded" (sftp/utils.go).
# SFTP v3 has no such code and paramiko no constant for it; clients show it as an unknown error.
SFTP_QUOTA_EXCEEDED = 15
# Wings' username pre-check (sftp/server.go): "<panel user>.<first 8 characters of the server uuid>".
_SFTP_USERNAME_RE = re.compile(r"^(.+)\.([a-z0-9]{8})$", re.IGNORECASE)
_SFTP_MAX_FILE_BYTES = (
    1 << 63
) - 1  # the largest offset a file can have (off_t); beyond it a write is refused


def sftp_available() -> bool:
    """True when paramiko can be imported (SFTP is optional)."""
    try:
        import paramiko  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class SftpLogin:
    """A login the Panel accepted: which server, which user, which permissions."""

    username: str
    server_uuid: str
    user_uuid: str
    permissions: frozenset[str]
    ip: str
    at: float

    def can(self, permission: str) -> bool:
        # For SFTP, "*" grants everything (Wings sftp/handler.go); admin.* never matters here.
        return "*" in self.permissions or permission in self.permissions


class _LoginLimiter:
    """Failed logins per client IP in a sliding minute; over budget, logins are refused unasked.

    The Panel throttles too, but per server and per *node* IP, so one client failing over and
    over would lock every user of that server out; this stops it at the node first.
    """

    window_s = 60.0
    max_ips = 10_000  # bounded memory under a flood from many addresses

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._fails: dict[str, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def _weight(self, ip: str, now: float) -> float:
        fails = self._fails.get(ip)
        if not fails:
            return 0.0
        while fails and fails[0][0] < now - self.window_s:
            fails.popleft()
        if not fails:
            del self._fails[ip]
            return 0.0
        return sum(w for _, w in fails)

    def blocked(self, ip: str) -> bool:
        if self.per_minute <= 0:
            return False
        with self._lock:
            return self._weight(ip, time.monotonic()) >= self.per_minute

    def failed(self, ip: str, weight: float = 1.0) -> None:
        now = time.monotonic()
        with self._lock:
            if ip not in self._fails and len(self._fails) >= self.max_ips:
                for old in list(self._fails)[: self.max_ips // 10]:
                    self._weight(old, now)  # drops the expired ones
                if len(self._fails) >= self.max_ips:
                    self._fails.pop(next(iter(self._fails)))
            self._fails.setdefault(ip, deque()).append((now, weight))
            if len(self._fails[ip]) > 4 * max(1, self.per_minute):
                self._fails[ip].popleft()


class SftpServer:
    """The node's SFTP server: Panel-checked logins, one jail per session, metered writes.

    Methods for the caller: ``start()``, ``stop()``, ``port`` (bound port, after ``start``),
    ``connections()`` (how many are open). Class variables that may be overridden:
    ``max_channels``, ``max_handles``, ``max_read_bytes``, ``max_packet_bytes``,
    ``max_ssh_packet_bytes``, ``handshake_timeout_s``, ``auth_timeout_s``, ``pubkey_failure_weight``.

    A login is ``<panel user>.<8-char server id>`` with a password or a public key; both are
    checked by ``POST /api/remote/sftp/auth`` (any Panel 4xx is bad credentials; a Panel that does
    not answer within the retry budget refuses the login and nothing else). Failed logins are
    limited per client IP (``wingslite.sftp_login_attempts_per_minute``). A login for a suspended
    server is refused even when the Panel accepts it.

    Each SFTP channel is a session in the daemon's ``SessionTable``: suspension, deletion and
    ``POST /api/deauthorize-user`` close its connection before they return. Every path goes
    through a ``Jail`` over the server's directory; every written byte is booked with the
    server's ``Filesystem.reserve()`` before it is written, and refused with status 15 when it
    would pass the disk limit.

    Threads: one accept thread; per connection one thread that runs it start to end, paramiko's
    transport thread and one thread per SFTP channel. At most ``wingslite.sftp_max_connections``
    connections are open; more are closed at once.
    """

    max_channels = 4  # per connection; OpenSSH and paramiko clients use one
    max_handles = 256  # open files and directories per channel
    max_read_bytes = 256 * 1024  # per read request, as OpenSSH's sftp-server
    max_packet_bytes = 256 * 1024 + 1024  # an SFTP packet larger than this closes the channel
    max_ssh_packet_bytes = (
        256 * 1024 + 1024
    )  # an SSH packet larger than this closes the connection (OpenSSH: 256 KiB)
    handshake_timeout_s = 15.0
    auth_timeout_s = 30.0
    pubkey_failure_weight = 0.25  # clients offer several keys before the right one

    def __init__(self, daemon: Any):
        import paramiko  # optional dependency: the caller checked ``sftp_available()``

        self.daemon = daemon
        self.config = daemon.config
        self.port = 0
        self.read_only = bool(self.config.get("system.sftp.read_only"))
        self._paramiko = paramiko
        self._glue = _paramiko_glue(paramiko)
        self._limiter = _LoginLimiter(self.config.get("wingslite.sftp_login_attempts_per_minute"))
        self._slots = threading.BoundedSemaphore(
            max(1, self.config.get("wingslite.sftp_max_connections"))
        )
        self._host_key: Any = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._live: set[Any] = set()
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def host_key_path(self) -> str:
        return os.path.join(self.config.root_dir, ".sftp", "id_ed25519")

    def start(self) -> None:
        self._host_key = self._load_host_key()
        host, port = (
            self.config.get("system.sftp.bind_address"),
            self.config.get("system.sftp.bind_port"),
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept_loop, name="wingslite-sftp", daemon=True
        )
        self._thread.start()
        LOG.info("SFTP listening on %s:%d (host key %s)", host, self.port, self.host_key_path)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            # shutdown() wakes the accept() blocked in the other thread; close() alone does not.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._live_lock:
            live = list(self._live)
        for transport in live:
            transport.close()

    def connections(self) -> int:
        """How many client connections are open (a closed one stops counting at once)."""
        with self._live_lock:
            return sum(1 for transport in self._live if transport.is_active())

    def _load_host_key(self) -> Any:
        """The node's ed25519 host key, generated once (0600) so clients can pin it."""
        path = self.host_key_path
        if not os.path.exists(path):
            from cryptography.hazmat.primitives import serialization  # paramiko's own dependency
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            atomic_write(Path(path), pem, mode=0o600)
            LOG.info("SFTP host key generated at %s", path)
        if os.stat(path).st_mode & 0o077:
            os.chmod(
                path, 0o600
            )  # a private key readable by others is a key anyone may have copied
        return self._paramiko.Ed25519Key.from_private_key_file(path)

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                LOG.warning(
                    "SFTP: refusing %s: %d connections are already open",
                    addr[0],
                    self.config.get("wingslite.sftp_max_connections"),
                )
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, addr), name=f"wingslite-sftp-{addr[0]}", daemon=True
            ).start()

    def _serve(self, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        """One connection, start to end. Nothing a client sends may take the daemon down."""
        transport = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = self._paramiko.Transport(sock)
            transport.local_version = f"SSH-2.0-wingslite_{VERSION}"
            transport.handshake_timeout = self.handshake_timeout_s
            transport.banner_timeout = self.handshake_timeout_s
            transport.auth_timeout = self.auth_timeout_s
            transport.add_server_key(self._host_key)
            _bound_ssh_packets(transport, self.max_ssh_packet_bytes)
            transport.set_subsystem_handler("sftp", self._glue.Subsystem, _SftpSession)
            with self._live_lock:
                self._live.add(transport)
            if self._stopping.is_set():
                return
            connection = _SftpConnection(self, transport, addr)
            transport.start_server(server=self._glue.SshServer(connection))
            transport.join()
        except Exception as exc:  # a bad handshake, a reset, garbage: that connection only
            LOG.debug("SFTP connection from %s ended: %s", addr[0], exc)
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
                with self._live_lock:
                    self._live.discard(transport)
            with contextlib.suppress(OSError):
                sock.close()
            self._slots.release()

    # -- logins --------------------------------------------------------------------------------

    def server_of(self, uuid: str) -> Any:
        """The daemon's server with this uuid, or None when this node has none."""
        try:
            return self.daemon.get_server(uuid)
        except NotFound:
            return None

    def authenticate(
        self,
        kind: str,
        username: str,
        secret: str,
        addr: tuple[Any, ...],
        session_id: bytes,
        client_version: bytes,
    ) -> SftpLogin | None:
        """Ask the Panel; ``None`` means refused (the reason is logged, the client learns nothing)."""
        ip = str(addr[0])
        weight = 1.0 if kind == "password" else self.pubkey_failure_weight
        if self._limiter.blocked(ip):
            LOG.warning("SFTP login refused for %s: too many failed logins from this address", ip)
            return None
        match = _SFTP_USERNAME_RE.fullmatch(username)
        if not match or not secret:
            self._limiter.failed(ip, weight)
            return None
        try:
            answer = self.daemon.panel.sftp_auth(
                kind, username, secret, f"{ip}:{addr[1]}", session_id, client_version
            )
        except PanelError as exc:
            if 400 <= exc.http_status < 500:
                self._limiter.failed(ip, weight)
                LOG.info(
                    "SFTP login %r from %s refused by the Panel (%d %s)",
                    username,
                    ip,
                    exc.http_status,
                    exc.message,
                )
            else:
                LOG.warning(
                    "SFTP login %r from %s refused: the Panel could not check it: %s",
                    username,
                    ip,
                    exc.message,
                )
            return None
        permissions = answer.get("permissions")
        server = self.server_of(answer["server"])
        if server is None or not answer["server"].lower().startswith(match.group(2).lower()):
            LOG.warning(
                "SFTP login %r: the Panel answered for server %s, which is not this login's server on this node",
                username,
                answer["server"],
            )
            return None
        if server.suspended:
            LOG.info(
                "SFTP login %r from %s refused: server %s is suspended", username, ip, server.uuid
            )
            return None
        return SftpLogin(
            username=username,
            server_uuid=server.uuid,
            user_uuid=answer["user"],
            permissions=frozenset(p for p in permissions if isinstance(p, str))
            if isinstance(permissions, list)
            else frozenset(),
            ip=ip,
            at=time.time(),
        )


class _SftpConnection:
    """One SSH connection: its transport, its client's address, and the login being attempted.

    paramiko asks ``check_auth_publickey`` before it verifies the key's signature, so a Panel
    "yes" is only kept as ``pending`` until paramiko declares the whole attempt good; a later
    failed attempt replaces it. Sessions take the login from here once the transport is
    authenticated (paramiko ignores further attempts then).
    """

    def __init__(self, sftp: SftpServer, transport: Any, addr: tuple[Any, ...]):
        self.sftp = sftp
        self.transport = transport
        self.addr = addr
        self.pending: SftpLogin | None = None
        self.channels = 0
        self.subsystems: set[int] = set()  # ids of the channels that run one already
        self._answers: dict[tuple[str, str, str], SftpLogin | None] = {}

    def check(self, kind: str, username: str, secret: str) -> bool:
        key = (kind, username, secret)
        if key not in self._answers:  # paramiko asks twice per key (query, then signed)
            if len(self._answers) >= 16:
                self._answers.clear()
            version = (self.transport.remote_version or "").encode()
            self._answers[key] = self.sftp.authenticate(
                kind, username, secret, self.addr, self.transport.session_id or b"", version
            )
        self.pending = self._answers[key]
        return self.pending is not None

    def login(self) -> SftpLogin | None:
        """The login this connection authenticated with, or None."""
        login = self.pending
        if (
            login is None
            or not self.transport.is_authenticated()
            or self.transport.get_username() != login.username
        ):
            return None
        return login


def _bound_ssh_packets(transport: Any, max_bytes: int) -> None:
    """Refuse SSH packets longer than ``max_bytes`` instead of reading them.

    paramiko reads a packet of whatever length its first four bytes claim, before any login, and
    buffers it all: one client announcing 4 GiB took ~1 GB of the daemon's memory in the 15 s
    handshake window. Every packet body is read through ``Packetizer.read_all``.
    """
    read_all = transport.packetizer.read_all

    def bounded(n: int, check_rekey: bool = False) -> bytes:
        if n > max_bytes:
            raise EOFError(f"SSH packet of {n} bytes refused")
        return read_all(n, check_rekey)

    transport.packetizer.read_all = bounded


def _paramiko_glue(paramiko: types.ModuleType) -> types.SimpleNamespace:
    """The three classes that must subclass paramiko's own, made once paramiko is imported.

    Everything they do is delegated to the plain classes around them; they exist because
    paramiko checks ``isinstance`` (handles) or calls many optional hooks (the server interface).
    """

    class SshServer(paramiko.ServerInterface):
        def __init__(self, connection: _SftpConnection):
            self.connection = connection

        def get_allowed_auths(self, username: str) -> str:
            return "password,publickey"

        def check_auth_password(self, username: str, password: str) -> int:
            ok = self.connection.check("password", username, password)
            return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

        def check_auth_publickey(self, username: str, key: Any) -> int:
            # The Panel compares an authorized_keys line's fingerprint with the user's keys.
            ok = self.connection.check(
                "public_key", username, f"{key.get_name()} {key.get_base64()}"
            )
            return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

        def check_channel_request(self, kind: str, chanid: int) -> int:
            if kind != "session" or self.connection.channels >= self.connection.sftp.max_channels:
                return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
            self.connection.channels += 1
            return paramiko.OPEN_SUCCEEDED

        def check_channel_subsystem_request(self, channel: Any, name: str) -> bool:
            # paramiko starts one more handler thread (and session) for every request on the same
            # channel: one subsystem per channel, or one client could open threads without end.
            if channel.get_id() in self.connection.subsystems:
                return False
            self.connection.subsystems.add(channel.get_id())
            return super().check_channel_subsystem_request(channel, name)

        # Only the "sftp" subsystem is served (paramiko looks it up among the registered
        # handlers); shells, exec, ptys, forwarding and agents keep paramiko's default "no".

    class Subsystem(paramiko.SFTPServer):
        def _read_packet(self) -> tuple[int, bytes]:
            size = int.from_bytes(self._read_all(4), "big")
            if size > self.server.sftp.max_packet_bytes:
                raise EOFError(f"SFTP packet of {size} bytes refused")
            data = self._read_all(size)
            return (data[0], data[1:]) if size else (0, b"")

        def _send_status(self, request_number: int, code: int, desc: str | None = None) -> None:
            if code == SFTP_QUOTA_EXCEEDED and desc is None:
                desc = "Quota Exceeded"  # paramiko knows texts for SFTP v3's codes 0-8 only
            super()._send_status(request_number, code, desc)

        def _open_folder(self, request_number: int, path: str) -> None:
            # paramiko keeps every open listing in memory (~40 MB per 100,000 entries): bound how many
            # a channel may hold, and the entries not yet read from them (``Jail.max_entries`` in all).
            held = sum(
                len(getattr(folder, "_SFTPHandle__files", ()))
                for folder in self.folder_table.values()
            )
            if len(self.folder_table) >= self.server.sftp.max_handles or held >= Jail.max_entries:
                self._send_status(request_number, 4, "too many open directories")
                return
            super()._open_folder(request_number, path)

    class Handle(paramiko.SFTPHandle):
        def __init__(self, file: _SftpFile):
            super().__init__()
            self.file = file

        def read(self, offset: int, length: int) -> bytes | int:
            return self.file.read(offset, length)

        def write(self, offset: int, data: bytes) -> int:
            return self.file.write(offset, data)

        def stat(self) -> Any:
            return self.file.stat()

        def chattr(self, attr: Any) -> int:
            return self.file.chattr(attr)

        def close(self) -> None:
            self.file.close()

    return types.SimpleNamespace(SshServer=SshServer, Subsystem=Subsystem, Handle=Handle)


def _sftp_status(exc: OSError) -> int:
    """An OSError as the SFTP v3 status a client understands."""
    if isinstance(exc, PathEscape) or exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return 3  # SSH_FX_PERMISSION_DENIED
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return 2  # SSH_FX_NO_SUCH_FILE
    if exc.errno in (errno.EDQUOT, errno.ENOSPC):
        return SFTP_QUOTA_EXCEEDED
    return 4  # SSH_FX_FAILURE


class _SftpSession:
    """One SFTP channel: paramiko's ``SFTPServerInterface``, each operation checked and jailed.

    Permissions (Wings sftp/handler.go): ``file.read`` lists and stats, ``file.read-content``
    downloads, ``file.create`` makes files, directories and symlinks, ``file.update``
    overwrites, renames and sets attributes, ``file.delete`` removes. While the server is
    suspended every check fails, whatever the login says. The egg's ``file_denylist`` is checked
    on the path asked for and on the path a symlink resolves to.
    """

    def __init__(self, ssh_server: Any, *args: Any, **kwargs: Any):
        self.connection: _SftpConnection = ssh_server.connection
        self.sftp = self.connection.sftp
        self.attrs = self.sftp._paramiko.SFTPAttributes
        self.login: SftpLogin | None = None
        self.server: Any = None
        self.jail: Jail | None = None
        self.session: Any = None
        self.handles = 0
        self.refused = False
        # paramiko builds this object in the transport thread while it answers the client's
        # subsystem request, so the session is in the table before the client hears "yes".
        self._begin()

    # -- paramiko's hooks ----------------------------------------------------------------------

    def session_started(self) -> None:
        # Runs in the channel's own thread, where closing the connection is safe; until then
        # every operation is refused anyway (no jail).
        if self.refused:
            self.connection.transport.close()

    def _begin(self) -> None:
        daemon = self.sftp.daemon
        login = self.connection.login()
        server = self.sftp.server_of(login.server_uuid) if login else None
        transport = self.connection.transport
        if login is None or server is None:
            self.refused = True
            return
        self.login, self.server = login, server
        # Registered before the checks below: a suspension that lands in between either is seen
        # here or closes this session itself (the sync marks the server suspended first).
        self.session = daemon.sessions.register(
            server.uuid, login.user_uuid, "sftp", lambda code, reason: transport.close()
        )
        revoked = daemon.revocations.check("", login.user_uuid, server.uuid, int(login.at))
        if server.suspended or revoked:
            LOG.info(
                "SFTP session of %s refused: server %s is suspended or the user was deauthorized",
                login.username,
                server.uuid,
            )
            self.refused = True
            return
        try:
            server.fs.ensure()
            self.jail = server.fs.jail()
            server.fs.usage_bytes()  # a server never measured starts its walk now, before the first write
        except OSError as exc:
            LOG.error(
                "SFTP session of %s refused: the directory of server %s cannot be opened: %s",
                login.username,
                server.uuid,
                exc,
            )
            self.refused = True
            return
        LOG.info(
            "SFTP session opened: %s from %s on server %s", login.username, login.ip, server.uuid
        )

    def session_ended(self) -> None:
        if self.session is not None:
            self.sftp.daemon.sessions.unregister(self.session)
            self.session = None
        if self.jail is not None:
            self.jail.close()
            self.jail = None
        if self.login is not None:
            LOG.info(
                "SFTP session closed: %s on server %s", self.login.username, self.login.server_uuid
            )

    # -- checks --------------------------------------------------------------------------------

    def _refuse(self, permission: str) -> int | None:
        """The status that refuses ``permission`` now, or None when it is granted."""
        if self.jail is None or self.login is None or self.server.suspended:
            return 3
        if self.sftp.read_only and permission in ("file.create", "file.update", "file.delete"):
            return 8  # SSH_FX_OP_UNSUPPORTED, as Wings with system.sftp.read_only
        return None if self.login.can(permission) else 3

    def _run(self, permission: str, action: Callable[[], Any]) -> Any:
        refused = self._refuse(permission)
        if refused is not None:
            return refused
        try:
            return action()
        except OSError as exc:
            return _sftp_status(exc)
        except ValueError:  # e.g. a path that is not valid text
            return 4

    def _attributes(self, st: os.stat_result, name: str | None = None) -> Any:
        return self.attrs.from_stat(st, name)

    # -- reading -------------------------------------------------------------------------------

    def canonicalize(self, path: str) -> str:
        # Lexical only, and clamped at the root like a chroot: it reveals nothing and opens nothing.
        # One leading slash: normpath keeps a leading "//" (POSIX), which clients then show as the cwd.
        return posixpath.normpath("/" + path.replace("\x00", "").lstrip("/")) if path else "/"

    def list_folder(self, path: str) -> Any:
        def action() -> Any:
            return [self._attributes(st, name) for name, st in self.jail.listdir(path)]

        return self._run("file.read", action)

    def stat(self, path: str) -> Any:
        return self._run("file.read", lambda: self._attributes(self.jail.stat(path)))

    def lstat(self, path: str) -> Any:
        return self._run("file.read", lambda: self._attributes(self.jail.lstat(path)))

    def readlink(self, path: str) -> Any:
        return self._run("file.read", lambda: self.jail.readlink(path))

    # -- opening -------------------------------------------------------------------------------

    def open(self, path: str, flags: int, attr: Any) -> Any:
        if not flags & (os.O_WRONLY | os.O_RDWR):
            return self._run("file.read-content", lambda: self._open(path, flags))
        if flags & os.O_RDWR and (refused := self._refuse("file.read-content")) is not None:
            return refused
        if self.jail is None:
            return 3
        try:  # writing into an existing file is an update, making one is a create (Wings)
            exists = self.jail.lstat(path) is not None
        except OSError:
            exists = False
        if exists and flags & os.O_EXCL:
            return 4  # SSH_FX_FAILURE: what OpenSSH's sftp-server answers for EEXIST in SFTP v3
        permission = "file.update" if exists else "file.create"
        if (refused := self._refuse(permission)) is not None:
            return refused
        if not self.server.fs.has_space():
            return SFTP_QUOTA_EXCEEDED  # Wings refuses to open for writing over the limit
        return self._run(permission, lambda: self._open(path, flags))

    def _open(self, path: str, flags: int) -> Any:
        if self.handles >= self.sftp.max_handles:
            return 4
        append = bool(flags & os.O_APPEND)
        fd = self.jail.open(path, flags & ~os.O_APPEND, 0o644)
        try:
            if flags & os.O_TRUNC:
                freed = os.fstat(fd).st_size
                os.ftruncate(fd, 0)
                self.server.fs.add_usage(-freed)
        except BaseException:
            os.close(fd)
            raise
        self.handles += 1
        return self.sftp._glue.Handle(_SftpFile(self, fd, append))

    # -- changing ------------------------------------------------------------------------------

    def mkdir(self, path: str, attr: Any) -> int:
        return self._run("file.create", lambda: self.jail.mkdir(path, 0o755) or 0)

    def rmdir(self, path: str) -> int:
        return self._run("file.delete", lambda: self.jail.rmdir(path) or 0)

    def remove(self, path: str) -> int:
        def action() -> int:
            self._freed(self.jail.remove(path))
            return 0

        return self._run("file.delete", action)

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTP v3 rename never replaces an existing file; posix-rename@openssh.com does.
        return self._run(
            "file.update",
            lambda: self._freed(self.jail.rename(oldpath, newpath, overwrite=False)) or 0,
        )

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return self._run(
            "file.update", lambda: self._freed(self.jail.rename(oldpath, newpath)) or 0
        )

    def symlink(self, target_path: str, path: str) -> int:
        return self._run("file.create", lambda: self.jail.symlink(target_path, path) or 0)

    def chattr(self, path: str, attr: Any) -> int:
        def action() -> int:
            if attr.st_size is not None:
                fd = self.jail.open(path, os.O_WRONLY)
                try:
                    status = self.truncate(fd, attr.st_size)
                finally:
                    os.close(fd)
                if status:
                    return status
            if attr.st_mode is not None:
                self.jail.chmod(path, attr.st_mode & 0o777)  # never setuid/setgid/sticky bits
            if attr.st_atime is not None and attr.st_mtime is not None:
                self.jail.utime(path, (attr.st_atime, attr.st_mtime))
            # Ownership is the daemon's business (Wings ignores uid/gid in setstat too).
            return 0

        return self._run("file.update", action)

    # -- accounting ----------------------------------------------------------------------------

    def _freed(self, st: os.stat_result | None) -> None:
        """Give back the bytes of a file that is gone (its last link was removed or replaced)."""
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            self.server.fs.add_usage(-st.st_size)

    def truncate(self, fd: int, size: int) -> int:
        """Set a file's size; growth is booked against the disk limit first."""
        if size < 0 or size > _SFTP_MAX_FILE_BYTES:
            return 4
        old = os.fstat(fd).st_size
        if size > old and not self.server.fs.reserve(size - old):
            return SFTP_QUOTA_EXCEEDED
        try:
            os.ftruncate(fd, size)
        except OSError:
            if size > old:
                self.server.fs.add_usage(old - size)
            raise
        if size < old:
            self.server.fs.add_usage(size - old)
        return 0


class _SftpFile:
    """An open file of a session. Every write books its growth with ``Filesystem.reserve()``.

    Growth is ``max(0, offset + len(data) - current size)``: a write inside the file books
    nothing, a write past its end books the gap too (a sparse file still counts its apparent
    size, as Wings' usage walk does). Python integers cannot overflow; offsets beyond ``off_t``
    are refused. A write that does not fit is refused whole with status 15, so the file ends at
    the last write that fitted and nothing else changes.
    """

    def __init__(self, session: _SftpSession, fd: int, append: bool):
        self.session = session
        self.fd = fd
        self.append = append
        self._lock = threading.Lock()  # growth is computed from the size; one write at a time

    def read(self, offset: int, length: int) -> bytes | int:
        refused = self.session._refuse("file.read-content")
        if refused is not None:
            return refused
        if offset < 0 or length < 0:
            return 4
        try:
            return os.pread(self.fd, min(length, self.session.sftp.max_read_bytes), offset)
        except OSError as exc:
            return _sftp_status(exc)

    def write(self, offset: int, data: bytes) -> int:
        if self.session.server.suspended or self.session.login is None:
            return 3
        fs = self.session.server.fs
        with self._lock:
            try:
                size = os.fstat(self.fd).st_size
                if self.append:  # O_APPEND would make pwrite ignore the offset we metered
                    offset = size
                end = offset + len(data)
                if offset < 0 or end > _SFTP_MAX_FILE_BYTES:
                    return 4
                growth = max(0, end - size)
                if growth and not fs.reserve(growth):
                    LOG.info(
                        "SFTP write refused on server %s: the disk limit of %d bytes would be passed",
                        self.session.server.uuid,
                        fs.limit_bytes,
                    )
                    return SFTP_QUOTA_EXCEEDED
                written = 0
                try:
                    while written < len(data):
                        n = os.pwrite(self.fd, memoryview(data)[written:], offset + written)
                        if n <= 0:
                            raise OSError(errno.EIO, "the file accepted no more bytes")
                        written += n
                except OSError as exc:
                    # Give back what was booked but not written.
                    unused = growth - max(0, offset + written - size)
                    if unused > 0:
                        fs.add_usage(-unused)
                    return _sftp_status(exc)
                return 0
            except OSError as exc:
                return _sftp_status(exc)

    def stat(self) -> Any:
        try:
            return self.session._attributes(os.fstat(self.fd))
        except OSError as exc:
            return _sftp_status(exc)

    def chattr(self, attr: Any) -> int:
        refused = self.session._refuse("file.update")
        if refused is not None:
            return refused
        try:
            with self._lock:
                if attr.st_size is not None:
                    status = self.session.truncate(self.fd, attr.st_size)
                    if status:
                        return status
                if attr.st_mode is not None:
                    os.fchmod(self.fd, attr.st_mode & 0o777)
                if attr.st_atime is not None and attr.st_mtime is not None:
                    os.utime(self.fd, (attr.st_atime, attr.st_mtime))
            return 0
        except OSError as exc:
            return _sftp_status(exc)

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            self.session.handles -= 1


# HTTP API #########################################################################################

_SERVER = r"/api/servers/(?P<server>[^/]+)"

# (method, path regex, handler method name, needs the node token)
_ROUTES: tuple[tuple[str, re.Pattern[str], str, bool], ...] = tuple(
    (method, re.compile(f"^{path}$"), name, auth)
    for method, path, name, auth in (
        ("GET", r"/api/system", "system_info", True),
        ("GET", r"/api/servers", "list_servers", True),
        ("POST", r"/api/servers", "create_server", True),
        ("POST", r"/api/deauthorize-user", "deauthorize_user", True),
        ("POST", r"/api/update", "update_config", True),
        ("GET", _SERVER, "get_server", True),
        ("DELETE", _SERVER, "delete_server", True),
        ("POST", _SERVER + r"/sync", "sync_server", True),
        ("POST", _SERVER + r"/install", "install_server", True),
        ("POST", _SERVER + r"/reinstall", "reinstall_server", True),
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

    def __init__(
        self,
        address: tuple[str, int],
        daemon: Daemon,
        handler_class: type[ApiHandler] | None = None,
    ):
        self.daemon = daemon
        self.date_header = (
            0,
            "",
        )  # (second, its HTTP date): formatted once a second, not per answer
        super().__init__(address, handler_class or ApiHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.exception(
            "unhandled error on a connection from %s", client_address[0] if client_address else "?"
        )


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

    def _respond(
        self, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        second, date = self.server.date_header
        if second != int(time.time()):
            second = int(time.time())
            date = self.date_time_string(second)
            self.server.date_header = (second, date)
        all_headers = {"Date": date, "Server": self.server_version}
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
        self.body_read = False
        self._drain_unread_body()  # a preflight's body, if any, must not be read as the next request
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
            chosen = next(
                ((match, name, auth) for m, match, name, auth in matches if m == method), None
            )
            if chosen is None or chosen[2]:
                self._authorize()  # as Wings: unknown routes answer 401 to strangers, not 404
            if chosen is None:
                if matches:
                    allowed = ", ".join(sorted({m for m, *_ in matches}))
                    raise WingsliteError(
                        f"method {method} is not allowed on {path} (allowed: {allowed})", 405
                    )
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
            self._respond(
                exc.status, {"error": exc.message, "request_id": self.request_id}, headers
            )
        except Exception:
            LOG.exception(
                "request %s %s failed (request id %s)", method, self.path, self.request_id
            )
            self.close_connection = True
            self._error(500, "An unexpected error was encountered while processing this request")

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token or " " in token:
            raise WingsliteError(
                "The required authorization heads were not present in the request.", 401
            )
        if not hmac.compare_digest(token.encode(), self.server.daemon.config.token.encode()):
            raise WingsliteError("You are not authorized to access this endpoint.", 403)

    def read_json(self, required: bool = True) -> Any:
        """The request body as JSON: 411/413/400 with a clear text when it cannot be had."""
        self.body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise WingsliteError(
                "chunked request bodies are not supported; send Content-Length", 411
            )
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
                raise BadRequest(
                    "The data passed in the request was not in a parsable format. Please try again."
                )
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest(
                "The data passed in the request was not in a parsable format. Please try again."
            ) from None

    def _drain_unread_body(self) -> None:
        """Keep the connection in step: read (or give up on) a body the route did not read."""
        if self.body_read or self.close_connection:
            return
        self.body_read = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if (
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            or length < 0
            or length > 65536
        ):
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
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("uuid"), str)
            or not _UUID_RE.match(body["uuid"])
        ):
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

    def route_install_server(self, server: Server) -> tuple[int, Any]:
        """Wings' ``POST /install``: sync, then run the install script (no stop first)."""
        self._drain_unread_body()
        self.server.daemon.sync_server(server)
        server.request_install()
        return 202, None

    def route_reinstall_server(self, server: Server) -> tuple[int, Any]:
        """The Panel's "Reinstall": stop the process, sync, run the install script again."""
        self._drain_unread_body()
        server.request_install(reinstall=True)
        return 202, None

    def route_power(self, server: Server) -> tuple[int, Any]:
        body = self.read_json()
        action = body.get("action") if isinstance(body, dict) else None
        if action not in ("start", "stop", "restart", "kill"):
            raise WingsliteError(
                'The power action provided was not valid, should be one of "stop", "start", "restart", "kill"',
                422,
            )
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
        for each in (
            self.server.daemon.all_servers()
        ):  # Wings' denylist is node-wide; open sockets re-check now
            each.events.publish(WEBSOCKET_RECHECK_EVENT)
        return 204, None

    def route_update_config(self) -> tuple[int, Any]:
        """``POST /api/update``: the Panel pushes the node's configuration after a node edit.

        wingslite answers as Wings does with ``ignore_panel_config_updates: true`` -- ``applied:
        false`` -- and changes nothing: the node's file is the only source of its configuration, so
        a leaked token cannot rewrite the data root, the Panel URL or the token itself
        (CVE-2024-34066). The body is still read and must be JSON.
        """
        body = self.read_json()
        if not isinstance(body, dict):
            raise WingsliteError("expected the node configuration as a JSON object", 422)
        LOG.warning(
            "the Panel pushed a node configuration; it is not applied: edit %s and restart wingslite",
            self.server.daemon.config.source,
        )
        return 200, {"applied": False}

    def route_deauthorize_user(self) -> tuple[int, Any]:
        body = self.read_json()
        user = body.get("user") if isinstance(body, dict) else None
        servers = body.get("servers") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            raise WingsliteError('expected {"user": "<uuid>", "servers": ["<uuid>", ...]}', 422)
        if servers is not None and (
            not isinstance(servers, list) or not all(isinstance(s, str) for s in servers)
        ):
            raise WingsliteError("servers must be a list of server uuids", 422)
        self.server.daemon.deauthorize_user(user, servers or None)
        return 204, None

    def route_websocket(self, server: Server) -> tuple[int | None, Any]:
        serve_websocket(self, self.server.daemon, server)
        return None, None


# daemon ###########################################################################################


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
        data = json.dumps(
            server_document_json(config), sort_keys=True, separators=(",", ":")
        ).encode()
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


class InstallRecords:
    """How each server's last install went, one small JSON file per server, written atomically.

    ``{"state": "installing" | "installed" | "failed", "reinstall": bool, "at": ..., "installed":
    bool}``; ``installed`` stays true once any install has succeeded, so that a repeated
    ``POST /api/servers`` never reinstalls over a server's files. A record still ``installing``
    at boot is an install a daemon restart interrupted.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def read(self, uuid: str) -> dict[str, Any]:
        try:
            record = json.loads((self.directory / f"{uuid}.json").read_bytes())
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def installed(self, uuid: str) -> bool:
        return bool(self.read(uuid).get("installed"))

    def write(self, uuid: str, state: str, reinstall: bool) -> None:
        installed = state == "installed" or self.installed(uuid)
        record = {"state": state, "reinstall": reinstall, "at": _now_iso(), "installed": installed}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.directory / f"{uuid}.json", json.dumps(record).encode())
        except OSError as exc:
            LOG.error("server %s: cannot record its install state: %s", uuid, exc)

    def interrupted(self, uuids: Iterable[str]) -> list[str]:
        return [u for u in uuids if self.read(u).get("state") == "installing"]

    def delete(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{uuid}.json").unlink()


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
            owner=(daemon.node_user.uid, daemon.node_user.gid),
        )
        self.fs.set_denylist(config.file_denylist)
        self.installing = False  # an install runs: power actions and a second install are refused
        self.last_sync: dict[str, Any] | None = None
        self._view_settings: tuple[ServerConfig, dict[str, Any]] | None = (
            None  # api_view()'s settings, per configuration
        )
        self.pending_next_start: dict[str, str] = {}
        self._limits_pending = False
        self._last_state = OFFLINE
        self._last_crash: float | None = None
        self._disk_stop_sent = False
        # Set (under ``lock``) when the server leaves this node. A deleted server counts as
        # suspended, as in Wings, so a socket or SFTP login racing the delete is refused, and a
        # sync or power action queued behind the delete does nothing.
        self.deleted = False
        self.events.subscribe(self._on_event)
        self.env: Environment = daemon.environment_factory(self)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.env.state

    @property
    def suspended(self) -> bool:
        return self.config.suspended or self.deleted

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
                threading.Thread(
                    target=self._handle_crash, name=f"wingslite-crash-{self.uuid[:8]}", daemon=True
                ).start()
            if args[0] == STARTING:
                self._disk_stop_sent = False
        elif (
            event == "stats"
            and self._last_state == RUNNING
            and not self._disk_stop_sent
            and must_stop_for_disk(self.fs)
        ):
            # Checked on every stats tick, as Wings does; once per run (server/listeners.go).
            self._disk_stop_sent = True
            threading.Thread(
                target=self._stop_over_disk_limit,
                name=f"wingslite-disk-{self.uuid[:8]}",
                daemon=True,
            ).start()

    def _stop_over_disk_limit(self) -> None:
        try:
            self.console_message(
                "Server is exceeding the assigned disk space limit, stopping process now."
            )
            self.env.stop(self.config, 60)  # Wings: WaitForStop(1 minute, terminate)
        except Exception:
            LOG.exception("server %s: stopping the server over its disk limit failed", self.uuid)

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
                    crash_detection_default=self.daemon.config.get(
                        "system.crash_detection.enabled"
                    ),
                )
            except DocumentError as exc:
                raise WingsliteError(f"{exc.message}; nothing on this node was changed") from None
            return self.apply(config)

    def apply(self, new: ServerConfig) -> dict[str, Any]:
        """Swap in a validated configuration and apply it; the record says what happened."""
        with self.lock:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
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
                disk_notes = self.fs.set_limit(new.disk_limit_bytes)
                applied.append(
                    f"disk limit {new.disk_limit_bytes} bytes"
                    if new.disk_limit_bytes
                    else "disk limit removed"
                )
                applied.extend(disk_notes)  # e.g. usage over the new limit, soft for this server
            except Exception as exc:  # a quota tool failing must not undo the swap
                LOG.exception("server %s: setting the disk limit failed", self.uuid)
                failed.append(f"disk limit: {exc}")
            if new.file_denylist != old.file_denylist:
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
                self.pending_next_start["process"] = (
                    "process configuration (stop, done, config files)"
                )
            pending += [
                f"{label} (next start)"
                for label in self.pending_next_start.values()
                if label != "resource limits"
            ]
            if new.crash_detection_enabled != old.crash_detection_enabled:
                applied.append(
                    f"crash detection {'on' if new.crash_detection_enabled else 'off'} (next exit)"
                )

            if new.suspended:
                closing_started = time.monotonic()
                closed = self.daemon.sessions.close_server(
                    self.uuid, CLOSE_SUSPENDED, "server suspended"
                )
                applied.append(f"suspended: {closed} session(s) closed")
                LOG.info(
                    "server %s: %d session(s) closed in %.1f ms",
                    self.uuid,
                    closed,
                    (time.monotonic() - closing_started) * 1000,
                )
                if self.installing:
                    applied.append("suspended: the install is cancelled")
                    threading.Thread(
                        target=self.env.abort_install,
                        name=f"wingslite-abort-install-{self.uuid[:8]}",
                        daemon=True,
                    ).start()
                if self.env.state != OFFLINE:
                    applied.append("suspended: stopping the process")
                    threading.Thread(
                        target=self._stop_suspended,
                        name=f"wingslite-suspend-{self.uuid[:8]}",
                        daemon=True,
                    ).start()

            record = {
                "at": _now_iso(),
                "result": "failed" if failed else "ok",
                "applied": applied,
                "pending": pending,
                "failed": failed,
                "duration_ms": round((time.monotonic() - started) * 1000, 2),
            }
            self.last_sync = record
            LOG.info(
                "server %s synced: applied %s; pending %s; failed %s",
                self.uuid,
                applied,
                pending or "nothing",
                failed or "nothing",
            )
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
        if self.installing:
            raise Conflict("server is currently installing")
        threading.Thread(
            target=self._power_logged,
            args=(action, wait_s),
            name=f"wingslite-power-{self.uuid[:8]}",
            daemon=True,
        ).start()

    def _power_logged(self, action: str, wait_s: float) -> None:
        try:
            self.power(action, wait_s)
        except WingsliteError as exc:
            LOG.error("server %s: power action %s failed: %s", self.uuid, action, exc.message)
        except Exception:
            LOG.exception("server %s: power action %s failed", self.uuid, action)

    def power(self, action: str, wait_s: float = 0) -> None:
        """Run a power action now. ``wait_s`` 0 tries the lock once (as Wings); kill never waits."""
        if self.installing:  # kill too, as Wings (server/power.go)
            raise Conflict("server is currently installing")
        if action == "kill":
            self.env.kill()
            return
        if action not in ("start", "stop", "restart"):
            raise WingsliteError(f"attempting to handle unknown power action {action!r}", 422)
        if action == "start" and not self.config.suspended and self.env.state == OFFLINE:
            # The slow part of a start (pulling the image) runs before the lock is taken, so that a
            # sync -- a suspension above all -- is not kept waiting behind a download.
            try:
                self.env.prepare(self.config)
            except Exception as exc:  # the start itself, under the lock, reports what is wrong
                LOG.debug("server %s: preparing the start failed: %s", self.uuid, exc)
        acquired = (
            self.lock.acquire(timeout=wait_s) if wait_s > 0 else self.lock.acquire(blocking=False)
        )
        if not acquired:
            raise Conflict(
                "another power action is currently being processed for this server, please try again later"
            )
        try:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            if self.installing:  # an install claimed the server while this waited for the lock
                raise Conflict("server is currently installing")
            if action in ("stop", "restart"):
                self.env.stop(self.config, self.daemon.config.get("wingslite.stop_timeout_s"))
            if action in ("start", "restart"):
                self._start()
        finally:
            self.lock.release()

    def _start(self) -> None:
        if self.env.state != OFFLINE:
            raise Conflict("the server is already running")
        self.fs.ensure()  # before Docker would make the directory itself (not as a quota subvolume)
        try:
            self.sync()  # every start runs the sync first: the Panel is the source of truth
        except WingsliteError as exc:
            self.console_message(
                f"Unable to sync server data from the Panel, the start was aborted: {exc.message}"
            )
            raise WingsliteError(
                f"unable to sync server data from Panel instance: {exc.message}", exc.status
            ) from None
        if self.config.suspended:
            self.console_message("This server is suspended and cannot be started.")
            raise BadRequest("server is currently in a suspended state")
        if self.daemon.config.get("system.check_permissions_on_boot"):
            self.ensure_file_owner()
        if self.fs.limit_bytes:
            self.console_message(
                "Checking server disk space usage, this could take a few seconds..."
            )
            # A kernel quota's own figure is cheap and exact; otherwise walk now (not the cached figure).
            if self.fs.quota.enforced(self.fs.root):
                over = not self.fs.has_space()
            else:
                over = self.fs.recalculate() > self.fs.limit_bytes
            if over:
                self.console_message("Not enough disk space is available to start this server.")
                raise WingsliteError(
                    "There is not enough disk space available to perform that action.", 400
                )
        self.env.start(self.config)
        self.pending_next_start.clear()
        self._limits_pending = False

    def _handle_crash(self) -> None:
        """Restart a crashed server once per ``crash_detection.timeout`` window (Wings server/crash.go)."""
        cfg, node = self.config, self.daemon.config
        if self.env.state != OFFLINE:
            return
        if not cfg.crash_detection_enabled:
            self.console_message(
                "Aborting automatic restart, crash detection is disabled for this instance."
            )
            return
        exit_code, oom_killed = self.env.exit_status()
        if (
            exit_code == 0
            and not oom_killed
            and not node.get("system.crash_detection.detect_clean_exit_as_crash")
        ):
            return
        self.console_message("---------- Detected server process in a crashed state! ----------")
        self.console_message(f"Exit code: {exit_code}")
        self.console_message(f"Out of memory: {'true' if oom_killed else 'false'}")
        window = node.get("system.crash_detection.timeout")
        now = time.monotonic()
        if window and self._last_crash is not None and now - self._last_crash < window:
            self.console_message(
                f"Aborting automatic restart, last crash occurred less than {window} seconds ago."
            )
            return
        self._last_crash = now
        try:
            self.power("start", wait_s=10)
        except Exception as exc:
            LOG.error("server %s: restart after a crash failed: %s", self.uuid, exc)
            self.console_message(
                "Server crash was detected but an error occurred while handling it."
            )

    def ensure_file_owner(self) -> None:
        """Give the server's files to the node user (before a start and after an install)."""
        self.console_message(
            "Ensuring file permissions are set correctly, this could take a few seconds..."
        )
        started = time.monotonic()
        try:
            count, finished = self.fs.chown_all(self.chown_budget_s)
        except OSError as exc:
            LOG.warning("server %s: setting the owner of its files failed: %s", self.uuid, exc)
            return
        LOG.log(
            logging.INFO if finished else logging.WARNING,
            "server %s: %d entries given to %s in %.2f s%s",
            self.uuid,
            count,
            self.daemon.node_user.container_user,
            time.monotonic() - started,
            "" if finished else f" (stopped after {self.chown_budget_s:g} s; the rest is left)",
        )

    chown_budget_s = 60.0

    # -- installation ----------------------------------------------------------------------------

    def request_install(self, reinstall: bool = False, *, start_after: bool = False) -> None:
        """Claim the server for an install and run it in the background (create, ``/install``,
        ``/reinstall``). 409 while a power action holds the lock or another install runs.

        A reinstall first stops the process (10 s, then killed) and syncs, as Wings ``Reinstall``.
        """
        if not self.lock.acquire(blocking=False):
            raise Conflict(
                "Cannot execute server reinstall event while another power action is running."
            )
        try:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            if self.installing:
                raise Conflict("server is currently installing")
            self.installing = True
        finally:
            self.lock.release()
        threading.Thread(
            target=self._install_in_background,
            args=(reinstall, start_after),
            name=f"wingslite-install-{self.uuid[:8]}",
            daemon=True,
        ).start()

    def _install_in_background(self, reinstall: bool, start_after: bool) -> None:
        try:
            ok = self.install(reinstall)
        except Exception:
            LOG.exception("server %s: the installation failed", self.uuid)
            ok = False
        finally:
            self.installing = False
        if ok and start_after and not self.deleted:
            self._power_logged("start", 30)

    def install(self, reinstall: bool = False) -> bool:
        """Run the egg's install (the caller has set ``installing``); True when it succeeded.

        As Wings (server/install.go): ``install started``, the script in its container, the
        files given to the node user, ``POST /servers/{uuid}/install`` to the Panel (a failure
        to tell it is logged), ``install completed``. A ``skip_egg_scripts`` egg runs nothing
        and succeeds at once. Unlike Wings, a script that exits non-zero is a failed install.
        """
        self.daemon.installs.write(self.uuid, "installing", reinstall)
        error = None
        try:
            if reinstall and self.env.state != OFFLINE:
                self.env.stop(self.config, 10)  # Wings: WaitForStop(10 s, terminate)
            if reinstall:
                self.sync()
            if self.config.suspended:
                raise WingsliteError("the server is suspended")
            self.fs.ensure()
            if self.config.skip_egg_scripts:
                LOG.info("server %s: the egg skips install scripts; nothing to run", self.uuid)
            else:
                self.events.publish("install started", "")
                self._run_install_script()
        except WingsliteError as exc:
            error = exc.message
        if self.deleted:
            return False  # the server left the node while it installed: nobody to tell
        self._finish_install(error, reinstall)
        return error is None

    def _run_install_script(self) -> None:
        log_path = self.install_log_path()
        try:
            script = self.daemon.panel.get_install_script(self.uuid)
        except PanelError as exc:
            error = f"could not get the install script from the Panel: {exc.message}"
            write_install_log(log_path, self.config, {}, b"", error, _timezone(self.daemon.config))
            raise WingsliteError(error) from None
        splitter = LineSplitter()

        def on_output(data: bytes) -> None:
            for line in splitter.feed(data):
                self.events.publish("install output", line)

        LOG.info("server %s: running its install script (%s)", self.uuid, script["container_image"])
        exit_code = self.env.install(self.config, script, on_output, log_path)
        for line in splitter.flush():
            self.events.publish("install output", line)
        if exit_code:
            raise WingsliteError(f"the install script exited with code {exit_code}")

    def _finish_install(self, error: str | None, reinstall: bool) -> None:
        if error is None:
            LOG.info("server %s: %s completed", self.uuid, "reinstall" if reinstall else "install")
        else:
            LOG.error("server %s: the installation failed: %s", self.uuid, error)
            self.console_message(f"The installation failed: {error}")
        if self.fs.root.is_dir():
            self.ensure_file_owner()
        self.daemon.installs.write(self.uuid, "failed" if error else "installed", reinstall)
        try:
            self.daemon.panel.set_install_status(self.uuid, error is None, reinstall)
        except PanelError as exc:
            LOG.warning(
                "server %s: could not tell the Panel how the install ended: %s",
                self.uuid,
                exc.message,
            )
        self.events.publish("install completed", "")

    def install_log_path(self) -> Path:
        return Path(self.daemon.config.get("system.log_directory")) / "install" / f"{self.uuid}.log"

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
        # The settings only change with the configuration: built once per configuration, not per GET
        # (the JSON round trip was a quarter of the request's cost).
        config, cached = self.config, self._view_settings
        if cached is None or cached[0] is not config:
            settings = dict(server_document_json(config).get("settings") or {})
            settings["crash_detection_enabled"] = config.crash_detection_enabled
            cached = self._view_settings = (config, settings)
        return {
            "state": self.state,
            "is_suspended": config.suspended,
            "utilization": self.utilization(),
            "configuration": cached[1],
            "wingslite": {
                "last_sync": self.last_sync,
                "pending_next_start": sorted(self.pending_next_start.values()),
                "environment": self.env.kind,
                "disk": {"limit_bytes": self.fs.limit_bytes, "quota": self.fs.quota.name},
                "installing": self.installing,
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
        self._docker: Any = None
        self.quota = quota or select_quota_backend(
            config.get("wingslite.disk_quota"), config.data_dir
        )
        self.servers: dict[str, Server] = {}
        self.sessions = SessionTable()
        self.revocations = Revocations()
        self.store = ConfigStore(config.root_dir / "wingslite" / "servers")
        self.installs = InstallRecords(config.root_dir / "wingslite" / "installs")
        self.node_user = resolve_node_user(config)
        self.http: ApiServer | None = None
        self.sftp: SftpServer | None = None
        self._servers_lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._states_lock = threading.Lock()
        self._stopping = threading.Event()
        self._booted = threading.Event()
        self._threads: list[threading.Thread] = []

    def _default_environment(self, server: Server) -> Environment:
        # One Docker client for the node; it contacts no engine until a server needs one.
        if self._docker is None:
            self._docker = docker_client(self.config)
        return DockerEnvironment(
            server.uuid,
            server.events,
            client=self._docker,
            config=self.config,
            data_dir=server.fs.root,
            console=ConsolePipeline.from_config(server.events, self.config),
            disk_bytes=server.fs.usage_bytes,
            user=self.node_user.container_user,
        )

    # -- lifecycle ----------------------------------------------------------------------------

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
        LOG.info(
            "wingslite %s serving the API on %s:%d", VERSION, host, self.http.server_address[1]
        )
        user = self.node_user
        LOG.info("servers' files belong to %d:%d (%s)", user.uid, user.gid, user.note)
        if not user.exists:
            LOG.warning(
                "no user with uid %d exists on this host: files and containers use %d:%d as "
                "numbers",
                user.uid,
                user.uid,
                user.gid,
            )
        if not self.config.get("wingslite.sftp_enabled"):
            LOG.info("SFTP is off (wingslite.sftp_enabled is false)")
        elif not sftp_available():
            LOG.warning("SFTP is off: the paramiko package is not installed (pip install paramiko)")
        else:
            sftp = SftpServer(self)
            try:
                sftp.start()
                self.sftp = sftp
            except OSError as exc:  # e.g. the port is taken: the rest of the node still works
                LOG.error(
                    "SFTP is off: cannot listen on %s:%s: %s",
                    self.config.get("system.sftp.bind_address"),
                    self.config.get("system.sftp.bind_port"),
                    exc,
                )
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
        for (
            server
        ) in self.all_servers():  # websockets live on request threads the HTTP server does not join
            self.sessions.close_server(
                server.uuid, CLOSE_GOING_AWAY, "node shutting down", kind="websocket"
            )
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
                config = parse_server_document(
                    document, expect_uuid=uuid, crash_detection_default=crash_default
                )
            except DocumentError as exc:
                LOG.error("ignoring saved configuration of %s: %s", uuid, exc.message)
                continue
            self._add(Server(self, config))
        self._states = self._read_states()
        if self.servers:
            LOG.info("loaded %d saved server configurations", len(self.servers))

    def _boot_loop(self) -> None:
        self._remove_leftover_installers()
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
        self._report_interrupted_installs()
        self._booted.set()

    def _remove_leftover_installers(self) -> None:
        """Installer containers of this node's servers that a restart interrupted (one call)."""
        if self.environment_factory != self._default_environment or not self.servers:
            return
        if self._docker is None:
            self._docker = docker_client(self.config)
        idle = [uuid for uuid, server in self.servers.items() if not server.installing]
        removed = remove_leftover_installers(
            self._docker, idle, Path(self.config.get("system.tmp_directory"))
        )
        for uuid in removed:
            LOG.warning("server %s: removed the install container a restart left behind", uuid)

    def _report_interrupted_installs(self) -> None:
        """Installs a restart cut short failed: the Panel is told so (its reset marked them)."""
        for uuid in self.installs.interrupted(self.servers):
            server = self.servers.get(uuid)
            if server is None or server.installing:
                continue
            reinstall = bool(self.installs.read(uuid).get("reinstall"))
            self.installs.write(uuid, "failed", reinstall)
            try:
                self.panel.set_install_status(uuid, False, reinstall)
            except PanelError as exc:
                LOG.warning("server %s: could not tell the Panel: %s", uuid, exc.message)

    def load_from_panel(self) -> None:
        """Fetch every server of the node; add, update or drop local servers to match."""
        per_page = self.config.get("remote_query.boot_servers_per_page") or 50
        concurrency = self.config.get("wingslite.boot_concurrency")
        last_logged = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last_logged[0] > 1 or done >= total:
                last_logged[0] = time.monotonic()
                LOG.info("loaded %d/%d servers", done, total)

        known_before = set(
            self.servers
        )  # one created (POST /api/servers) while the list is read is not in it
        items = self.panel.list_servers(per_page, concurrency, progress)
        crash_default = self.config.get("system.crash_detection.enabled")
        seen = set()
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise DocumentError("a list item is not an object")
                document = {
                    "settings": item.get("settings"),
                    "process_configuration": item.get("process_configuration"),
                }
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
        for uuid in (known_before & set(self.servers)) - seen:
            LOG.warning(
                "server %s is no longer on this node according to the Panel; dropping it", uuid
            )
            server = self.servers[uuid]
            with (
                server.lock
            ):  # as a delete: its sessions end and nothing queued behind brings it back
                server.deleted = True
                self.sessions.close_server(
                    uuid, CLOSE_SERVER_DELETED, "server removed from this node"
                )
                self._forget(server)

    def _add(self, server: Server) -> None:
        with self._servers_lock:
            self.servers[server.uuid] = server

    def _forget(self, server: Server) -> None:
        """Take a server (marked deleted, its lock held) off the node: no object, no saved configuration."""
        with self._servers_lock:
            self.servers.pop(server.uuid, None)
        server.env.close()
        self.store.delete(server.uuid)
        self.installs.delete(server.uuid)

    # -- states (which servers were running, for the next boot) -----------------------------

    def _states_path(self) -> Path:
        return self.config.root_dir / "states.json"

    def _read_states(self) -> dict[str, str]:
        try:
            states = json.loads(self._states_path().read_bytes())
            return {
                k: v
                for k, v in states.items()
                if isinstance(k, str) and v in (OFFLINE, STARTING, RUNNING, STOPPING)
            }
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
        if not server.lock.acquire(
            timeout=max(1.0, float(self.config.get("remote_query.timeout")))
        ):
            raise Conflict(
                "another sync or power action is still running on this server; try again"
            )
        try:
            return server.sync()
        finally:
            server.lock.release()

    def create_server(self, uuid: str, start_on_completion: bool = False) -> Server:
        """``POST /api/servers``: fetch the configuration, make the directory, register the server,
        then install it in the background (and start it after, when asked).

        A server the node already has is re-read from the Panel; it is installed only if no
        install of it ever succeeded and none runs now.
        """
        existing = self.servers.get(uuid)
        if existing is not None:
            self.sync_server(existing)
            if not self.installs.installed(uuid) and not existing.installing:
                existing.request_install(start_after=start_on_completion)
            return existing
        try:
            document = self.panel.get_server(uuid)
        except PanelError as exc:
            if exc.http_status == 404:
                raise NotFound(f"the Panel does not know server {uuid}") from None
            raise WingsliteError(
                f"could not fetch server {uuid} from the Panel: {exc.message}"
            ) from None
        try:
            config = parse_server_document(
                document,
                expect_uuid=uuid,
                crash_detection_default=self.config.get("system.crash_detection.enabled"),
            )
        except DocumentError as exc:
            raise WingsliteError(exc.message) from None
        try:
            self.store.save(config)
        except OSError as exc:
            raise WingsliteError(
                f"could not save the configuration of server {uuid}: {exc}"
            ) from None
        server = Server(self, config)
        server.fs.ensure()
        with self._servers_lock:
            if uuid in self.servers:
                raise Conflict(f"server {uuid} already exists on this node")
            self.servers[uuid] = server
        LOG.info("server %s created", uuid)
        server.request_install(start_after=start_on_completion)
        return server

    def delete_server(self, server: Server) -> None:
        """``DELETE /api/servers/:server``: close its sessions, remove its container, files, config."""
        if not server.lock.acquire(timeout=30):
            raise Conflict(
                "another sync or power action is still running on this server; try again"
            )
        try:
            if server.deleted:  # a second DELETE that waited behind the first
                raise NotFound("The requested resource does not exist on this instance.")
            server.deleted = (
                True  # before closing: a socket registering now sees it and closes itself
            )
            self.sessions.close_server(server.uuid, CLOSE_SERVER_DELETED, "server deleted")
            server.env.abort_install()  # before the files go: the installer writes into them
            try:
                server.env.destroy()
            except Exception:
                server.deleted = False  # as Wings: the server stays on the node when its container cannot be removed
                raise
            self._forget(server)
        finally:
            server.lock.release()
        threading.Thread(
            target=_remove_tree, args=(server.fs.root,), name="wingslite-rm", daemon=True
        ).start()
        LOG.info("server %s deleted", server.uuid)

    def deauthorize_user(self, user_uuid: str, server_uuids: list[str] | None = None) -> int:
        """Close a user's websockets and SFTP sessions now and refuse their older tokens."""
        self.revocations.revoke_user(user_uuid, server_uuids)
        return self.sessions.close_user(user_uuid, server_uuids, CLOSE_REVOKED, "access revoked")

    def system_info(self, detailed: bool = False) -> dict[str, Any]:
        """``GET /api/system``: Wings' v1 object, or with ``detailed`` (``?v=2``) the v2 one the
        Panel's telemetry reads (the Docker engine's figures; an unreachable engine is a 500)."""
        machine = platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        if detailed:
            info = {
                "version": VERSION,
                "docker": self._docker_summary(),
                "system": _host_summary(arch),
            }
        else:
            info = {
                "architecture": arch,
                "cpu_count": os.cpu_count() or 1,
                "kernel_version": platform.release(),
                "os": "linux",
                "version": VERSION,
            }
        info["wingslite"] = {
            "servers": len(self.servers),
            "booted": self._booted.is_set(),
            "disk_quota": {
                "configured": self.config.get("wingslite.disk_quota"),
                "backend": self.quota.name,
                "reason": self.quota.reason,
            },
            "sftp": bool(self.sftp),
        }
        return info

    def _docker_summary(self) -> dict[str, Any]:
        if self._docker is None:
            self._docker = docker_client(self.config)
        docker = _docker()
        try:
            engine = self._docker.info()
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error("reading the engine's information", exc) from None
        backing = dict(
            item
            for item in engine.get("DriverStatus") or []
            if isinstance(item, list) and len(item) == 2
        )
        return {
            "version": engine.get("ServerVersion", ""),
            "cgroups": {
                "driver": engine.get("CgroupDriver", ""),
                "version": str(engine.get("CgroupVersion", "")),
            },
            "containers": {
                "total": engine.get("Containers", 0),
                "running": engine.get("ContainersRunning", 0),
                "paused": engine.get("ContainersPaused", 0),
                "stopped": engine.get("ContainersStopped", 0),
            },
            "storage": {
                "driver": engine.get("Driver", ""),
                "filesystem": backing.get("Backing Filesystem", ""),
            },
            "runc": {"version": (engine.get("RuncCommit") or {}).get("ID", "")},
        }


def _host_summary(arch: str) -> dict[str, Any]:
    """The ``system`` part of ``GET /api/system?v=2``: from /proc/meminfo and /etc/os-release."""
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
    pretty = "Linux"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
    return {
        "architecture": arch,
        "cpu_threads": os.cpu_count() or 1,
        "memory_bytes": memory_kb * 1024,
        "kernel_version": platform.release(),
        "os": pretty,
        "os_type": "linux",
    }


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.error("could not remove %s: %s", path, exc)


# CLI ##############################################################################################

_DEMO_EGG_PROCESS = {
    "startup": {"done": ["Server ready"], "user_interaction": [], "strip_ansi": False},
    "stop": {"type": "command", "value": "stop"},
    "configs": [],
}


def demo_document(
    uuid: str, name: str, memory_mb: int, image: str = "wingslite-test:latest"
) -> dict[str, Any]:
    """A Panel server document as the Panel builds it (panel-contract.md §1.4), for the demo."""
    startup = (
        'echo Server ready; while read line; do [ "$line" = stop ] && exit 0; echo "> $line"; done'
    )
    return {
        "settings": {
            "uuid": uuid,
            "meta": {"name": name, "description": ""},
            "suspended": False,
            "environment": {
                "STARTUP": startup,
                "P_SERVER_LOCATION": "demo",
                "P_SERVER_UUID": uuid,
                "P_SERVER_ALLOCATION_LIMIT": 0,
            },
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
            "allocations": {
                "force_outgoing_ip": False,
                "default": {"ip": "127.0.0.1", "port": 25565},
                "mappings": {"127.0.0.1": [25565]},
            },
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
                        meta = {
                            "current_page": 1,
                            "from": 1 if n else None,
                            "last_page": 1,
                            "per_page": 50,
                            "to": n or None,
                            "total": n,
                        }
                        return self._send(200, {"data": data, "links": {}, "meta": meta})
                    uuid = path.rsplit("/", 1)[-1]
                    if path.startswith("/api/remote/servers/") and uuid in panel.documents:
                        return self._send(200, panel.documents[uuid])
                self._send(
                    404,
                    {
                        "errors": [
                            {"code": "RecordNotFoundException", "status": "404", "detail": ""}
                        ]
                    },
                )

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null"
                )
                path = urllib.parse.urlsplit(self.path).path
                if path == "/api/remote/servers/reset":
                    return self._send(204)
                if path == "/api/remote/sftp/auth":
                    user, _, short = str(body.get("username", "")).rpartition(".")
                    match = [u for u in panel.documents if u.startswith(short) and short]
                    if user == "demo" and body.get("password") == "demo" and match:
                        return self._send(
                            200,
                            {
                                "server": match[0],
                                "user": "00000000-0000-4000-8000-000000000000",
                                "permissions": ["*"],
                            },
                        )
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
                if (
                    path.startswith("/demo/servers/")
                    and uuid in panel.documents
                    and isinstance(body, dict)
                ):
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
        threading.Thread(
            target=self.httpd.serve_forever, name="wingslite-demo-panel", daemon=True
        ).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _demo(args: Any) -> int:
    import secrets
    import tempfile

    token_id, token = secrets.token_hex(8), secrets.token_hex(32)
    servers = [
        demo_document(str(uuidlib.uuid4()), "Demo Survival", 1024),
        demo_document(str(uuidlib.uuid4()), "Demo Creative", 2048),
    ]
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
  # start it (needs a Docker engine and the wingslite-test image that .ci/run builds):
  curl -si -X POST {auth} -d '{{"action": "start"}}' {base}/api/servers/{first}/power
  # its files over SFTP (password: demo), when paramiko is installed:
  sftp -P {daemon.sftp.port if daemon.sftp else args.sftp_port} demo.{first[:8]}@127.0.0.1
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

    parser = argparse.ArgumentParser(
        prog="wingslite", description="A Pterodactyl node daemon in one file."
    )
    parser.add_argument(
        "--config",
        help="the node's config.yml (default: /etc/pterodactyl/config.yml, else ./wingslite.yml)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="run against an embedded demo Panel on loopback"
    )
    parser.add_argument("--port", type=int, default=8080, help="API port for --demo (default 8080)")
    parser.add_argument(
        "--sftp-port", type=int, default=2022, help="SFTP port for --demo (default 2022)"
    )
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"wingslite {VERSION}")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.demo:
        return _demo(args)
    path = args.config or next(
        (p for p in ("/etc/pterodactyl/config.yml", "wingslite.yml") if Path(p).exists()),
        "/etc/pterodactyl/config.yml",
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
