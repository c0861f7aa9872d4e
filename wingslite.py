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

Map of this file. Each section sits under a banner ``# <title> ####...``, each sub-section under
``# -- <title> ----...``; ``grep -nE '^# (.*####|-- )' wingslite.py`` prints this list with lines.

    constants and errors     version, logger, close codes, activity names, ``spawn()``, the
                             exceptions that carry an HTTP status (``WingsliteError`` ...)
    config                   Wings' config.yml -> frozen ``Config`` (+ wingslite's own keys)
    Panel client             ``PanelClient``: the Panel's remote API, retries, pagination
    server model             Panel JSON -> ``ServerConfig`` through ``_Doc``; validation
      -- units and Docker maths (Wings v1.11, environment/settings.go)
    filesystem and disk      ``atomic_write``, ``Filesystem`` (disk limit, usage, denylist, the
                             metering every writer uses: ``open_metered`` -> ``MeteredFile``)
      -- the path jail       ``Jail``: paths that cannot leave a server's directory; ``walk``
                             for every reader of a whole tree
      -- disk quota backends ``BtrfsQuota``, ``ProjectQuota``, soft; ``select_quota_backend``
    archives                 ``write_tar_gz`` (a jail's tree out, links as links, ``IgnoreMatcher``,
                             ``HashingWriter``)
      -- extraction          ``extract_archive``: tar/gz/bz2/xz/zip into a jail, checked, metered
    egg configuration files  ``ConfigFileWriter``: the egg's config files rewritten before each
                             start; ``NodePlaceholders``
      -- text parsers: file, properties, ini
      -- structured parsers: json, yaml, xml
      -- writing them into a server's directory
    environments             ``Environment`` (where a process runs), ``LimitReport``
      -- cgroups             ``Cgroup`` (v1/v2 files): lifting what Docker cannot
      -- Docker              ``DockerEnvironment``: containers, live limits, attach, stats
      -- installation        ``DockerInstaller`` (``<uuid>_installer``)
    console and events       ``EventBus``, ``LogRing``
      -- the console pipeline: ``LineSplitter``, ``ConsoleThrottle``, ``ConsolePipeline`` (done
                             detection)
    session table            ``SessionTable``: every websocket and SFTP session; ``Revocations``
    websocket                ``WebSocket`` (RFC 6455 framing)
      -- JWTs                ``decode_jwt``, ``WebsocketToken``
      -- signed URLs         ``SignedUrls``: the browser's one-time download/upload tokens
      -- rate limits         ``RateLimiter``
      -- Wings' console protocol  ``ConsoleSocket``
      -- the HTTP route      ``serve_websocket``
    SFTP                     ``SftpServer`` (paramiko, loaded by the first connection):
                             Panel-checked logins, the jail, metered writes
    activity                 ``ActivityLog``: events queued in SQLite, sent to the Panel in batches
    file manager             the Panel's Files tab: ``StagedFile`` (metered writes renamed into
                             place)
      -- archives: compress and decompress
      -- multipart bodies    ``MultipartReader``
      -- remote downloads (files/pull)  ``Pull``, ``Pulls``
      -- routes              ``FileManagerRoutes`` (HTTP mix-in), signed downloads and uploads
    backups                  ``Backups`` (create, s3 parts, restore, delete, boot recovery),
                             ``BackupJob``, ``RestoreJob``, ``BackupRoutes`` (HTTP mix-in)
    transfers                ``Transfers``: ``OutgoingTransfer`` (a server streamed to another
                             node as chunked multipart tar.gz), ``IncomingTransfer`` (extracted
                             as it arrives, sha256 checked), ``TransferRoutes`` (HTTP mix-in)
    metrics                  ``GET /metrics`` (Prometheus text): ``ServerMetrics``,
                             ``render_metrics``
    HTTP API                 ``ApiServer`` (connection cap, header deadline) / ``ApiHandler``:
                             RFC 9112 framing (``framing_problem``), routes, auth, CORS, errors;
                             ``TlsWrapper`` (``api.ssl``, certificate reloaded on renewal)
    daemon                   ``ConfigStore``, ``Server`` (one game server: its two locks, the
                             sync, power, crash detection), ``Daemon`` (boot, servers, system)
    Panel stand-in           ``PanelStandIn``: the Panel's remote API on loopback, for the demo,
                             the tests and the benchmarks
    CLI                      ``main()``, ``--demo``
      -- operator commands: configure, diagnostics

Where to look first:

    what happens on sync     ``Server.sync()`` -> ``Server.apply()`` (daemon section)
    a start                  ``Server.power()`` -> ``Server._start()`` ->
                             ``DockerEnvironment.start()``
    limits on a live server  ``DockerEnvironment.apply_limits()`` and ``Cgroup``
    suspension               ``Server.apply()`` -> ``SessionTable.close_server()``
    an install               ``Daemon.create_server()`` -> ``Server.request_install()`` ->
                             ``Server.install()`` -> ``DockerInstaller.run()``
    a backup / a restore     ``Backups.create()`` -> ``BackupJob.run()``; ``Backups.restore()`` ->
                             ``RestoreJob.run()`` -> ``extract_archive()`` (archives section)

Locks: each ``Server`` has two. Its **configuration lock** guards its configuration: held for one
sync alone (Panel GET, validation, save, swap, live limits, closing sessions), by a delete, and by
a start while it reads the configuration its container is created from; never across a stop, a
start's wait or a pull. Its **power lock** serialises start, stop and restart. A sync, a
suspension and a delete never wait for a power lock, so the Panel's suspension (15 s HTTP
timeout) always lands.
An install claims the server under its power lock (``Server.installing``): power actions are
then refused until it ends, while a sync still lands (a suspension cancels the install).
"""

from __future__ import annotations

import base64
import bz2
import codecs
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import email.errors
import errno
import fcntl
import functools
import gzip
import hashlib
import hmac
import http.client
import http.server
import importlib.util
import io
import ipaddress
import json
import logging
import lzma
import math
import mimetypes
import os
import platform
import posixpath
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

# constants and errors #############################################################################

VERSION = "0.1.0"
LOG = logging.getLogger("wingslite")

# Wings' server states (environment/environment.go).
OFFLINE, STARTING, RUNNING, STOPPING = "offline", "starting", "running", "stopping"

# Websocket close codes: RFC 6455's own (section 7.4.1) ...
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # also: the server was deleted or left this node
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN = 1013  # "Try Again Later" (IANA WebSocket close code registry)
# ... and the application codes (4000-4999) wingslite sends.
CLOSE_SUSPENDED = 4409  # the Panel's browser client stops reconnecting on 4409 (panel#5464)
# As HTTP's 401: access revoked, or no valid token within ConsoleSocket.auth_timeout_s.
CLOSE_UNAUTHORIZED = 4401

# Activity event names as Wings v1.11 sends them to the Panel (server/activity.go); the activity
# section queues and sends them.
ACTIVITY_CONSOLE_COMMAND = "server:console.command"
ACTIVITY_POWER_PREFIX = "server:power."
ACTIVITY_SFTP_WRITE = "server:sftp.write"
ACTIVITY_SFTP_CREATE = "server:sftp.create"
ACTIVITY_SFTP_CREATE_DIRECTORY = "server:sftp.create-directory"
ACTIVITY_SFTP_RENAME = "server:sftp.rename"
ACTIVITY_SFTP_DELETE = "server:sftp.delete"
ACTIVITY_FILE_UPLOADED = "server:file.uploaded"

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)


def spawn(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Run ``target(*args)`` in a new thread named ``name`` and return it. Daemon threads all:
    a call stuck on a socket or the engine never keeps the process from exiting."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


_SERVER_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def is_server_uuid(text: str) -> bool:
    """A server uuid as the Panel makes them (``Uuid::uuid4()``, 36 characters), nothing else:
    it names a directory, a container and a saved file."""
    return bool(_SERVER_UUID_RE.fullmatch(text))


class WingsliteError(Exception):
    """An error with the HTTP status and the text an operator (or the Panel's admin) will read;
    ``headers`` are sent with the error's answer."""

    status = 500
    headers: Mapping[str, str] = types.MappingProxyType({})

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(WingsliteError):
    status = 400


class NotFound(WingsliteError):
    status = 404


class MethodNotAllowed(WingsliteError):
    """The path exists, the method does not: ``Allow`` names those that do (RFC 9110, 15.5.6)."""

    status = 405

    def __init__(self, method: str, path: str, allowed: Iterable[str]):
        self.allowed = sorted(set(allowed))
        text = ", ".join(self.allowed)
        super().__init__(f"method {method} is not allowed on {path} (allowed: {text})")
        self.headers = {"Allow": text}


class Conflict(WingsliteError):
    status = 409


class ConfigError(WingsliteError):
    """The node config file is missing, unreadable or has a wrong value (the CLI exits 2)."""


class DocumentError(WingsliteError):
    """A Panel document that does not have the expected shape; the text names the field.

    ``detail`` is the field and the reason alone (``settings.build.memory_limit: must be ...``).
    """

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


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
    ("api.disable_remote_download", bool, False),
    ("system.root_directory", str, "/var/lib/pterodactyl"),
    ("system.log_directory", str, "/var/log/pterodactyl"),
    ("system.data", str, "/var/lib/pterodactyl/volumes"),
    ("system.tmp_directory", str, "/tmp/pterodactyl"),
    ("system.backup_directory", str, "/var/lib/pterodactyl/backups"),
    ("system.backups.compression_level", str, "best_speed"),
    ("system.backups.write_limit", int, 0),
    ("system.timezone", str, ""),
    ("system.disk_check_interval", int, 150),
    ("system.activity_send_interval", int, 60),
    ("system.activity_send_count", int, 100),
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
    ("wingslite.sftp_handshake_timeout_s", (int, float), 15),
    ("wingslite.sftp_idle_timeout_s", (int, float), 600),
    ("wingslite.sftp_max_unauthenticated_per_ip", int, 8),
    ("wingslite.sftp_max_sessions_per_user", int, 12),
    ("wingslite.websocket_max_per_server", int, 30),
    ("wingslite.websocket_unauthenticated_per_ip", int, 32),
    ("wingslite.max_panel_pages", int, 1000),
    ("wingslite.max_connections", int, 0),  # 0: from the process's file limit (ApiServer)
    ("wingslite.header_timeout_s", int, 10),
    ("wingslite.remote_download_allow_internal", bool, False),
    ("wingslite.metrics_token", str, ""),
    ("wingslite.log_file", str, ""),
)

_CHOICES = {
    "wingslite.disk_quota": ("auto", "btrfs", "project", "soft", "off"),
    "system.backups.compression_level": ("none", "best_speed", "best_compression"),
}

_NON_NEGATIVE = {
    "api.port",
    "system.sftp.bind_port",
    "system.disk_check_interval",
    "system.backups.write_limit",
    "system.activity_send_interval",
    "system.activity_send_count",
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
    "wingslite.sftp_handshake_timeout_s",
    "wingslite.sftp_idle_timeout_s",
    "wingslite.sftp_max_unauthenticated_per_ip",
    "wingslite.sftp_max_sessions_per_user",
    "wingslite.websocket_max_per_server",
    "wingslite.websocket_unauthenticated_per_ip",
    "wingslite.max_panel_pages",
    "wingslite.max_connections",
    "wingslite.header_timeout_s",
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


class Histogram:
    """Observations in cumulative buckets (Prometheus' histogram), safe from any thread.

    Methods for the caller: ``observe(value)``, ``snapshot()`` -> ``(counts per upper bound,
    count, sum)``; the counts are cumulative and the last bound is ``math.inf``.
    """

    default_bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, bounds: Iterable[float] | None = None):
        self.bounds = (*sorted(bounds or self.default_bounds), math.inf)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        with self._lock:
            return list(zip(self.bounds, self._counts, strict=True)), self._counts[-1], self._sum


# A Panel path with its uuids folded, so that per-path figures do not grow with the servers.
_PATH_UUID_RE = re.compile(r"/[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


class PanelCallStats:
    """What ``PanelClient`` did, for ``GET /metrics``: attempts by outcome, latency, failures.

    ``requests`` maps ``(method, path, outcome)`` to a count (outcome ``2xx``, ``4xx``, ``5xx``,
    ``unreachable`` or ``invalid``); ``latency`` maps ``(method, path)`` to a ``Histogram`` of
    seconds per attempt; ``failures`` maps ``(method, path)`` to calls that failed for good.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def observe(self, method: str, path: str, outcome: str, seconds: float) -> None:
        key = (method, _PATH_UUID_RE.sub("/{uuid}", path))
        with self._lock:
            self.requests[(*key, outcome)] = self.requests.get((*key, outcome), 0) + 1
            histogram = self.latency.setdefault(key, Histogram())
        histogram.observe(seconds)

    def failed(self, method: str, path: str) -> None:
        key = (method, _PATH_UUID_RE.sub("/{uuid}", path))
        with self._lock:
            self.failures[key] = self.failures.get(key, 0) + 1

    def copy(self) -> PanelCallStats:
        """A consistent copy of the counters (histograms are shared; each is consistent itself)."""
        other = PanelCallStats()
        with self._lock:
            other.requests = dict(self.requests)
            other.latency = dict(self.latency)
            other.failures = dict(self.failures)
        return other


class PanelClient:
    """The Panel's remote API (``{remote}/api/remote/...``), as Wings calls it.

    Methods for the caller: ``get_server(uuid)``, ``list_servers()``, ``sftp_auth(...)``,
    ``get_install_script(uuid)``, ``set_install_status(...)``, ``reset_servers()``. Every call
    sends Wings' headers; 2xx answers are decoded JSON; a 4xx is final; 5xx, timeouts and
    connection errors are retried with exponential backoff until the total budget
    (``remote_query.timeout``) runs out. Every failure is a ``PanelError``.

    The budget is one wall-clock deadline for the whole call -- connect, headers, body and every
    retry: a Panel that trickles one byte at a time is cut when it passes, not when a single read
    stalls. A redirect is never followed: it would carry the node token to whatever address the
    ``Location`` names (the Panel's Guzzle client follows them; wingslite refuses, naming it).

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
        max_pages: int = 1000,
    ):
        self.base = remote.rstrip("/") + "/api/remote"
        self.max_pages = max_pages
        self.budget_s = budget_s
        self.retry_initial_s = retry_initial_s
        self.max_document_bytes = max_document_bytes
        self.stats = PanelCallStats()
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
            max_pages=config.get("wingslite.max_panel_pages"),
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
        """Every server of this node: the first page, then the others, ``concurrency`` at a time.

        The page count is the Panel's word, so it is checked before a page is queued: at most
        ``max_pages`` pages, and no more than ``meta.total`` servers can fill. Pages are asked for
        a few at a time, never all at once, and the first empty page ends the list (the count
        promised more servers than there are).
        """
        first = self._page(0, per_page)  # Wings asks for page 0, which Laravel reads as page 1
        meta = first["meta"]
        items = list(first["data"])
        total = meta.get("total") if _is_count(meta.get("total")) else None
        self._check_page_count(meta["last_page"], total, _page_size(meta, per_page))
        if progress:
            progress(len(items), total or len(items))
        numbers = range(meta["current_page"] + 1, meta["last_page"] + 1)
        for page in self._pages(numbers, per_page, concurrency):
            if not page["data"]:
                break
            items.extend(page["data"])
            if progress:
                progress(len(items), total or len(items))
        return items

    def _check_page_count(self, last_page: int, total: int | None, page_size: int) -> None:
        what = "GET /servers?page=0"
        if last_page > self.max_pages:
            raise PanelError(
                200,
                "_TooManyPages",
                f"the Panel says the list has {last_page} pages; wingslite reads at most "
                f"{self.max_pages} (wingslite.max_panel_pages)",
                what,
            )
        if total is not None and last_page > max(1, -(-total // page_size)):
            raise PanelError(
                200,
                "_BadShape",
                f"meta.last_page {last_page} does not fit meta.total {total} at {page_size} "
                "servers a page",
                what,
            )

    def _pages(self, numbers: range, per_page: int, concurrency: int) -> Iterator[dict[str, Any]]:
        """The pages in order, at most ``concurrency`` in flight; the rest are not even queued."""
        pool = concurrent.futures.ThreadPoolExecutor(max(1, concurrency), "wingslite-page")
        pending: deque[concurrent.futures.Future[dict[str, Any]]] = deque()
        waiting = iter(numbers)
        try:
            for number in waiting:
                pending.append(pool.submit(self._page, number, per_page))
                if len(pending) >= max(1, concurrency):
                    break
            while pending:
                page = pending.popleft().result()
                number = next(waiting, None)
                if number is not None:
                    pending.append(pool.submit(self._page, number, per_page))
                yield page
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

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
        """``POST /servers/reset``: Wings calls it once after boot; the Panel clears stale
        installs."""
        self.request("POST", "/servers/reset", body=None)

    def send_activity(self, events: list[dict[str, Any]]) -> None:
        """``POST /activity``: ``{"data": [{user, server, event, metadata, ip, timestamp}]}``."""
        self.request("POST", "/activity", body={"data": events})

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
        target = urllib.parse.urlsplit(
            self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        )
        what = f"{method} {path}"
        data = json.dumps(body).encode() if method != "GET" else None
        deadline = time.monotonic() + (self.budget_s if budget_s is None else budget_s)
        delay = self.retry_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._timed_attempt(method, path, target, data, deadline, what)
            except _Retryable as exc:
                remaining = deadline - time.monotonic()
                wait = min(delay * random.uniform(0.5, 1.5), self.backoff_max_s)
                if remaining <= wait:
                    LOG.warning("%s failed after %d attempts: %s", what, attempt, exc.error.message)
                    self.stats.failed(method, path)
                    raise exc.error from None
                LOG.debug("%s failed (%s), retrying in %.2fs", what, exc.error.message, wait)
                time.sleep(wait)
                delay *= self.backoff_factor

    def _timed_attempt(
        self,
        method: str,
        path: str,
        target: urllib.parse.SplitResult,
        data: bytes | None,
        deadline: float,
        what: str,
    ) -> Any:
        """``_attempt`` counted in ``stats``: outcome and latency per attempt, final failures."""
        started = time.monotonic()
        outcome = "2xx"
        try:
            return self._attempt(method, target, data, deadline, what)
        except (_Retryable, PanelError) as exc:
            error = exc.error if isinstance(exc, _Retryable) else exc
            outcome = f"{error.http_status // 100}xx" if error.http_status >= 300 else "unreachable"
            if 0 < error.http_status < 300:
                outcome = "invalid"  # a 2xx answer that was not what the API promises
            if isinstance(exc, PanelError):
                self.stats.failed(method, path)  # not retried: final
            raise
        finally:
            self.stats.observe(method, path, outcome, time.monotonic() - started)

    def _attempt(
        self,
        method: str,
        target: urllib.parse.SplitResult,
        data: bytes | None,
        deadline: float,
        what: str,
    ) -> Any:
        """One HTTP exchange, cut at ``deadline`` whatever the Panel is doing at that moment."""
        timeout_s = max(0.05, deadline - time.monotonic())
        kind = (
            http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(target.hostname or "", target.port, timeout=timeout_s)
        cut = _ConnectionDeadline(conn, timeout_s)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            conn.request(method, path, body=data, headers=self._headers)
            resp = conn.getresponse()
            limit = self.max_document_bytes if 200 <= resp.status < 300 else 65535
            raw, status, location = resp.read(limit + 1), resp.status, resp.getheader("Location")
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(self._transport_error(exc, cut.fired, timeout_s, what)) from None
        finally:
            cut.cancel()
            conn.close()
        if cut.fired:  # a close-delimited body the deadline cut short is not an answer
            raise _Retryable(self._transport_error(TimeoutError(), True, timeout_s, what))
        return self._decode(status, raw, location, what)

    def _transport_error(
        self, exc: BaseException, cut: bool, timeout_s: float, what: str
    ) -> PanelError:
        if cut or isinstance(exc, TimeoutError):
            return PanelError(
                0, "_Timeout", f"the Panel did not answer within {timeout_s:.1f}s", what
            )
        reason = getattr(exc, "strerror", None) or exc
        return PanelError(
            0, "_Unreachable", f"could not reach the Panel at {self.base}: {reason}", what
        )

    def _decode(self, status: int, raw: bytes, location: str | None, what: str) -> Any:
        if 300 <= status < 400:
            raise PanelError(
                status,
                "_Redirect",
                f"the answer is a redirect to {location!r}; wingslite does not follow redirects "
                "(they would carry the node token elsewhere): set remote to the Panel's own URL",
                what,
            )
        if 400 <= status < 500:
            raise PanelError(status, *_panel_error_body(raw), what)
        if not 200 <= status < 300:
            error = PanelError(status, *_panel_error_body(raw), what)
            raise _Retryable(
                error
                if status >= 500
                else PanelError(status, "_Unexpected", "unexpected status", what)
            )
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


class _ConnectionDeadline:
    """Shuts an ``http.client`` connection's socket down when ``timeout_s`` have passed.

    A socket timeout bounds each read, not their sum: a peer that sends one byte just inside it
    keeps a call alive for ever. Shutting the socket down from a timer ends any read in progress,
    whether the connection is plain or TLS.
    """

    def __init__(self, conn: http.client.HTTPConnection, timeout_s: float):
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(timeout_s, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _Retryable(Exception):
    def __init__(self, error: PanelError):
        super().__init__(error.message)
        self.error = error


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _page_size(meta: Mapping[str, Any], asked: int) -> int:
    """The page size the Panel used (``meta.per_page``), else the one asked for."""
    size = meta.get("per_page")
    return size if _is_count(size) and size > 0 else max(1, asked)


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
    replace_with: Any  # any JSON value (Wings' ReplaceValue is a json.RawMessage)
    if_value: str | None = None


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """One egg config file that is rewritten before every start
    (``process_configuration.configs``)."""

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
    # What validation adjusted rather than refused (a CPU list applied as no pinning, a CPU
    # limit above the host's): shown in the sync record.
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def disk_limit_bytes(self) -> int:
        return disk_limit_bytes(self.build.disk_mb)


class _Doc:
    """A cursor over a JSON document that names the field in every error."""

    def __init__(self, value: Any, path: str):
        self.value, self.path = value, path

    def fail(self, problem: str) -> DocumentError:
        detail = f"{self.path}: {problem}"
        return DocumentError(f"the Panel's server document is invalid: {detail}", detail)

    def at(self, key: str, required: bool = False) -> _Doc:
        """The child ``key``. Of a missing or null parent it is null too (so the reader's default
        applies), unless ``required``; a parent that is not an object is an error."""
        obj = self.obj(required=required)
        if key not in obj and required:
            raise _Doc(None, f"{self.path}.{key}").fail("required key is missing")
        return _Doc(obj.get(key), f"{self.path}.{key}")

    def items(self) -> Iterator[tuple[str, _Doc]]:
        """An object's keys with their values as docs (nothing for null)."""
        for key, value in self.obj().items():
            yield key, _Doc(value, f"{self.path}.{key}")

    def each(self) -> Iterator[_Doc]:
        """A list's items as docs (nothing for null)."""
        for i, value in enumerate(self.list()):
            yield _Doc(value, f"{self.path}[{i}]")

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

    def str(self, default: str = "", required: bool = False, max_chars: int | None = None) -> str:
        if self.value is None:
            if required:
                raise self.fail("required value is missing")
            return default
        if not isinstance(self.value, str):
            raise self.fail(f"expected a string, got {_json_type(self.value)}")
        if max_chars is not None and len(self.value) > max_chars:
            raise self.fail(f"longer than {max_chars} characters ({len(self.value)})")
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


# What the Panel's own validation lets through, and so what this validator accepts (Pterodactyl
# Panel v1.11: ``Server::$validationRules``, ``EggVariable::$validationRules``, the egg's JSON
# fields, which it does not validate):
#
#   Server   memory   required|numeric|min:0            no upper bound
#            swap     required|numeric|min:-1           -1 = unlimited
#            disk     required|numeric|min:0
#            io       required|numeric|between:10,1000
#            cpu      required|numeric|min:0            no upper bound
#            threads  nullable|regex:/^[0-9-,]+$/       so "0-3,", "3-1" and "0-9999" pass
#            image    required|string|max:191           (later Panels: ^~?[\w\.\/\-:@ ]*$)
#            startup  required|string
#   EggVariable env_variable  required|regex:/^[\w]{1,191}$/   so "2FA_SECRET" passes
#   Egg      config_files (replace_with and if_value maps): any JSON value
#
# Refused, naming the field, is only what would harm the node: a size above 2^53 bytes after unit
# conversion (``_MAX_BYTES``), a string that is not a size a Panel sends (``_MAX_SHORT_CHARS``), a
# server uuid that is not a uuid. Adjusted with a note in the sync record instead of refused: a CPU
# list the node cannot apply (no pinning), a CPU limit above the host's (all of its CPUs), a mount
# target that would shadow /, /proc, /sys or /dev (the mount is left out), an image name outside
# Docker's reference grammar (kept, and a start refuses it before the engine is asked).
_PANEL_THREADS_RE = re.compile(r"[0-9,-]+")
_CPU_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")
_ENV_KEY_RE = re.compile(r"\w{1,191}", re.ASCII)
_MAX_BYTES = 2**53  # the largest count a JSON number (an IEEE double) carries exactly
_MAX_SHORT_CHARS = 1024  # cpusets, image names, addresses, mount paths
_SHADOWED_TARGETS = ("/proc", "/sys", "/dev")

# Docker's reference grammar (distribution/reference, regexp.go):
# [domain[:port]/]path[:tag][@digest]
_REF_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF_DOMAIN = (
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_IMAGE_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:{_REF_DOMAIN}/)?{_REF_PATH}(?:/{_REF_PATH})*)"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def is_image_reference(image: str) -> bool:
    """True for a name Docker's reference grammar accepts (``~`` first means local-only, as in
    Wings); such a name is safe to put into an engine API path."""
    match = _IMAGE_REFERENCE_RE.fullmatch(image.removeprefix("~"))
    return bool(match) and len(match.group("name")) <= 255


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


def _parse_threads(doc: _Doc, host_cpus: int | None, notes: list[str]) -> str:
    """The Panel's CPU list, normalised (``"0-3,"`` -> ``"0-3"``); one the node cannot apply
    becomes no pinning, with a note (Docker would refuse the container)."""
    text = doc.str(max_chars=_MAX_SHORT_CHARS).replace(" ", "")
    if not text:
        return ""
    if not _PANEL_THREADS_RE.fullmatch(text):
        raise doc.fail(f"expected a CPU list such as '0-1,4', got {text!r}")
    parts = [part for part in text.split(",") if part]
    problem = _cpu_list_problem(parts, host_cpus)
    if problem:
        notes.append(f"threads {text!r}: {problem}; applied as no CPU pinning")
        return ""
    return ",".join(parts)


def _cpu_list_problem(parts: list[str], host_cpus: int | None) -> str:
    if not parts:
        return "no CPU listed"
    for part in parts:
        match = _CPU_RANGE_RE.fullmatch(part)
        if not match:
            return f"{part!r} is neither a CPU nor a range"
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            return f"range {part!r} runs backwards"
        if host_cpus and hi >= host_cpus:
            return f"CPU {hi} does not exist on this node ({host_cpus} CPUs)"
    return ""


def _parse_size_mb(doc: _Doc, to_bytes: Callable[[int], int], lo: int = 0) -> int:
    """A size in the Panel's MB, at most 2^53 bytes once converted (1e308 would overflow)."""
    size_mb = doc.int(lo=lo)
    if size_mb > _MAX_BYTES // 1_000_000 or to_bytes(size_mb) > _MAX_BYTES:
        raise doc.fail(f"{json.dumps(doc.value)[:40]} MB is more than 2^53 bytes")
    return size_mb


def _parse_cpu_percent(doc: _Doc, host_cpus: int | None, notes: list[str]) -> int:
    """CPU percent (100 per CPU). Above what the host has, Docker refuses the quota: all CPUs."""
    percent = doc.int(lo=0)
    if host_cpus and percent > 100 * host_cpus:
        notes.append(
            f"cpu_limit {json.dumps(doc.value)[:40]}% is more than this node's {host_cpus} "
            f"CPUs; applied as {100 * host_cpus}%"
        )
        return 100 * host_cpus
    return percent


def _parse_build(b: _Doc, host_cpus: int | None, notes: list[str]) -> Build:
    b.obj(required=True)
    memory_mb = _parse_size_mb(b.at("memory_limit", required=True), memory_limit_bytes)
    swap_doc = b.at("swap")
    return Build(
        memory_mb=memory_mb,
        swap_mb=_parse_size_mb(swap_doc, lambda mb: mb * 1_000_000, -1)
        if swap_doc.value is not None
        else 0,
        io_weight=b.at("io_weight").int(500, lo=10, hi=1000),
        cpu_percent=_parse_cpu_percent(b.at("cpu_limit", required=True), host_cpus, notes),
        threads=_parse_threads(b.at("threads"), host_cpus, notes),
        disk_mb=_parse_size_mb(b.at("disk_space", required=True), disk_limit_bytes),
        oom_disabled=b.at("oom_disabled").bool(True),
    )


def _parse_mounts(mounts_doc: _Doc, notes: list[str]) -> tuple[Mount, ...]:
    """The Panel's mounts, targets normalised; one that would shadow the container's /, /proc,
    /sys or /dev (``/home/container/../../proc``) is left out with a note."""
    mounts = []
    for i, item in enumerate(mounts_doc.list()):
        md = _Doc(item, f"{mounts_doc.path}[{i}]")
        md.obj(required=True)
        source = md.at("source").str(required=True, max_chars=_MAX_SHORT_CHARS)
        target = md.at("target").str(required=True, max_chars=_MAX_SHORT_CHARS)
        normal = "/" + posixpath.normpath(target).lstrip("/") if target.startswith("/") else ""
        shadows = normal == "/" or any(
            normal == t or normal.startswith(t + "/") for t in _SHADOWED_TARGETS
        )
        if not normal or shadows:
            why = "is not an absolute path" if not normal else f"would shadow {normal}"
            notes.append(f"mount {source} -> {target} left out: the target {why}")
            continue
        mounts.append(Mount(source, normal, md.at("read_only").bool()))
    return tuple(mounts)


def parse_server_document(
    document: Any,
    *,
    expect_uuid: str | None = None,
    crash_detection_default: bool = True,
    host_cpus: int | None = None,
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
    if not is_server_uuid(uuid):
        raise settings.at("uuid").fail(f"not a server uuid: {uuid[:64]!r}")

    notes: list[str] = []
    env_doc = settings.at("environment")
    environment: dict[str, Any] = {}
    for key, value in env_doc.items():
        if not _ENV_KEY_RE.fullmatch(key):  # the Panel's EggVariable rule: ^[\w]{1,191}$
            raise _Doc(value.value, f"{env_doc.path}.{key[:64]}").fail(
                "not a valid environment variable name"
            )
        if value.value is not None and not isinstance(value.value, (str, int, float, bool)):
            raise value.fail(f"expected a string or number, got {_json_type(value.value)}")
        environment[key] = value.value

    build = _parse_build(settings.at("build", required=True), host_cpus, notes)

    a = settings.at("allocations")
    default = a.at("default")
    mappings: list[tuple[str, tuple[int, ...]]] = []
    for ip, ports in a.at("mappings").items():
        if len(ip) > _MAX_SHORT_CHARS:
            raise _Doc(ports.value, f"{a.path}.mappings.{ip[:64]}").fail(
                f"the address is longer than {_MAX_SHORT_CHARS} characters"
            )
        mappings.append((ip, tuple(p.int(lo=1, hi=65535) for p in ports.each())))
    allocations = Allocations(
        default_ip=default.at("ip").str("0.0.0.0", max_chars=_MAX_SHORT_CHARS),
        default_port=default.at("port").int(0, lo=0, hi=65535),
        mappings=tuple(mappings),
        force_outgoing_ip=a.at("force_outgoing_ip").bool(),
    )

    mounts = _parse_mounts(settings.at("mounts"), notes)

    egg = settings.at("egg")
    denylist = tuple(p.str(required=True) for p in egg.at("file_denylist").each())
    labels = {k: v.str() for k, v in settings.at("labels").items()}
    meta = settings.at("meta")
    container = settings.at("container")
    image = container.at("image").str(max_chars=_MAX_SHORT_CHARS)
    if image.strip() and not is_image_reference(image.strip()):
        notes.append(
            f"image {image!r} is not a valid Docker image reference; the server cannot start "
            "until the Panel names a valid one"
        )
    return ServerConfig(
        uuid=uuid,
        name=meta.at("name").str(),
        description=meta.at("description").str(),
        suspended=settings.at("suspended").bool(),
        invocation=settings.at("invocation").str(),
        skip_egg_scripts=settings.at("skip_egg_scripts").bool(),
        environment=types.MappingProxyType(environment),
        build=build,
        image=image,
        allocations=allocations,
        mounts=mounts,
        egg_id=egg.at("id").str(),
        file_denylist=denylist,
        labels=types.MappingProxyType(labels),
        crash_detection_enabled=settings.at("crash_detection_enabled").bool(
            crash_detection_default
        ),
        process=_parse_process(root.at("process_configuration")),
        document=types.MappingProxyType(copy.deepcopy(document)),
        notes=tuple(notes),
    )


def _parse_process(p: _Doc) -> ProcessConfig:
    if p.value is None:
        return ProcessConfig()
    p.obj(required=True)
    startup = p.at("startup")
    done_doc = startup.at("done")
    if isinstance(done_doc.value, str):  # the Panel wraps a single string; older eggs did not
        done_doc = _Doc([done_doc.value], done_doc.path)
    done = tuple(d.str(required=True) for d in done_doc.each())
    stop = p.at("stop")
    stop_type = stop.at("type").str("signal")
    if stop_type not in ("command", "signal", "stop", ""):
        raise stop.at("type").fail(f"expected command, signal or stop, got {stop_type!r}")
    stop_value = stop.at("value").str()
    if stop_type in ("signal", "") and not stop_value:
        stop_type, stop_value = "signal", "SIGKILL"
    configs = []
    for cd in p.at("configs").each():
        cd.obj(required=True)
        replaces = []
        for rdoc in cd.at("replace").each():
            robj = rdoc.obj(required=True)
            # Any JSON value, as Wings' ReplaceValue (json.RawMessage) takes it; the
            # config-file step decides what a list or an object means for its parser.
            with_value = robj.get("replace_with", robj.get("value"))
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
        strip_ansi=startup.at("strip_ansi").bool(),
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
    """A Panel environment value as text. Numbers stay plain (``25565``, not Wings'
    ``25565.000000``)."""
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
    reason = (
        "no kernel quota in force: the daemon's own write paths check the limit, and a server "
        "over it is stopped"
    )
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
    ``recalculate()``, ``has_space(n_bytes)``, ``set_denylist(patterns)``, ``is_denied(relpath)``,
    ``jail()``, and the metering API every writer uses (SFTP, file manager, uploads, archives,
    backup restores, transfers):

        ``open_metered(jail, path, flags)``  a ``MeteredFile``: every byte it grows the file by is
                                             booked before it is written (``DiskLimitExceeded``,
                                             errno EDQUOT, when it would pass the limit)
        ``remove(jail, path)``               unlink a file and give back what was booked for it
        ``remove_tree(jail, path)``          a file, link or whole directory, each file given back
        ``rename(jail, src, dst)``           move; a file it replaces is given back the same way
        ``release(st)``                      give back a file some other path removed (its lstat)

    Lower level, for callers that cannot name the file: ``reserve(n_bytes)`` (check and book in
    one step, False when it does not fit) and ``add_usage(delta_bytes)``.

    ``owner`` (``(uid, gid)`` or None) is the node user every file the daemon makes belongs to;
    ``chown_all(budget_s)`` gives it the whole tree.

    Usage is the apparent size of every regular file under the root (as Wings), cached for
    ``check_interval_s`` seconds; a stale read returns the cached figure at once and refreshes in
    the background, so no caller (boot included) waits on a walk unless it asks to.

    What the figure counts is what is really held: a file removed or replaced while a metered
    handle still holds it keeps counting until that handle closes (its blocks are only freed
    then), and the walk adds such files, which it cannot see. Removing a file gives back only what
    the figure counts for it: its size when it has not changed since the last walk began, else
    what that walk saw of it plus what was booked for it since (an inode ledger that holds only
    files changed since the walk); a file the game wrote since then, which nothing booked, gives
    back nothing until the next walk measures it -- so removing files can never free more than
    the figure holds.
    """

    # File timestamps lag the wall clock by up to a jiffy and some filesystems keep whole seconds:
    # a file whose ctime is this close to a walk's start may have changed after the walk saw it.
    _CTIME_SLACK_NS = 2_000_000_000
    # The walk remembers the size of every file changed this close to its start (the ledger);
    # beyond this many, such files give back nothing when removed, until the next walk.
    max_ledger_entries = 100_000
    # A removal whose file the figure cannot account for makes the next walk due this soon.
    recheck_after_unknown_s = 5.0

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
        self._ledger: dict[
            tuple[int, int], int
        ] = {}  # inode -> bytes counted, if changed since the walk
        self._walk_started_ns = 0  # wall clock; a file unchanged since then is counted at its size
        self._walks: list[_WalkState] = []  # walks running now, to learn what raced them
        self._open: dict[tuple[int, int], set[MeteredFile]] = {}  # inodes held by metered handles
        self._quota_limit: int | None = None  # the limit the quota backend last accepted
        self._denylist: tuple[str, ...] = ()
        self._deny_re: re.Pattern[str] | None = None
        self._replacing: set[str] = set()  # files whose old bytes a staged rewrite has credited

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
        """A ``Jail`` over this server's directory with its denylist (close it when done); what it
        creates belongs to ``owner``."""
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
                f"disk usage {usage} bytes is over the new limit of {self._limit} bytes: writes "
                "are refused"
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
                    spawn(self._background_walk, name="wingslite-du")
                return self._usage
        if allow_stale:
            # Never measured: answer 0 now, measure in the background (boot must not wait on walks).
            with self._lock:
                if not self._walking:
                    self._walking = True
                    spawn(self._background_walk, name="wingslite-du")
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
        """Walk the directory now (``Jail.walk``: symlinks never followed) and cache the figure.

        Bytes booked or freed while the walk runs are added to its result: a write that raced the
        walk may be counted twice until the next walk, never zero times. A removal that raced it
        and whose file the walk never saw is not given back twice. Files that metered handles hold
        after their last link went are added: the walk cannot see them, the disk still holds them.
        """
        walk = _WalkState(time.time_ns())
        with self._lock:
            walk.booked_at_start = self._booked_total
            self._walks.append(walk)
        try:
            total, recent = self._walk_sizes(walk)
        finally:
            with self._lock:
                self._walks.remove(walk)
        with self._lock:
            total += self._held_orphans(recent)
            for key, delta in walk.booked.items():
                recent[key] = max(0, recent.get(key, 0) + delta)
            undo = sum(c for key, c in walk.removed.items() if key not in walk.seen_removed)
            raced = self._booked_total - walk.booked_at_start
            self._usage = max(0, total + raced + undo)
            self._ledger, self._walk_started_ns = recent, walk.started_ns
            self._measured_at = time.monotonic()
            if undo:  # some of it may have been seen before it went: count again soon
                self._measured_at -= self.check_interval_s - self.recheck_after_unknown_s
            return self._usage

    def _walk_sizes(self, walk: _WalkState) -> tuple[int, dict[tuple[int, int], int]]:
        """The apparent size of every regular file, and the sizes of the recently changed ones."""
        total, recent = 0, {}
        recent_after_ns = walk.started_ns - self._CTIME_SLACK_NS
        if not self.root.is_dir():
            return 0, recent
        with Jail(self.root) as jail:
            for _, st in jail.walk("/", on_error=lambda path, exc: None):
                if not stat.S_ISREG(st.st_mode):
                    continue
                total += st.st_size
                key = (st.st_dev, st.st_ino)
                if st.st_ctime_ns >= recent_after_ns and len(recent) < self.max_ledger_entries:
                    recent[key] = st.st_size
                if walk.removed and key in walk.removed:
                    with self._lock:
                        walk.seen_removed.add(key)
        return total, recent

    def _held_orphans(self, recent: dict[tuple[int, int], int]) -> int:
        """Bytes of files metered handles hold after their last link went (lock held)."""
        held = 0
        for key, handles in self._open.items():
            for handle in handles:
                try:
                    st = os.fstat(handle.fileno())
                except (OSError, ValueError):
                    continue
                if st.st_nlink == 0:
                    held += st.st_size
                    recent[key] = st.st_size
                break
        return held

    def has_space(self, n_bytes: int = 0) -> bool:
        """True when ``n_bytes`` more still fit (usage == limit is allowed, as Wings)."""
        if self._limit == 0:
            return True
        return self.usage_bytes() + max(0, n_bytes) <= self._limit

    def reserve(self, n_bytes: int) -> bool:
        """Book ``n_bytes`` against the limit if they fit; False (nothing booked) if they do not.

        For writers that cannot name the file they grow; ``open_metered`` books per file, so that
        removing the file later gives back exactly what was booked for it.
        """
        return self._book(n_bytes)

    def add_usage(self, delta_bytes: int) -> None:
        """Change the figure by ``delta_bytes`` without a check (negative: bytes freed)."""
        with self._lock:
            self._usage = max(0, self._usage + delta_bytes)
            self._booked_total += delta_bytes

    def claim_replacement(self, path: str) -> bool:
        """True for the first of concurrent rewrites of ``path``: only it may credit the old bytes
        in advance (each crediting them let N parallel rewrites forget N times the file)."""
        with self._lock:
            if path in self._replacing:
                return False
            self._replacing.add(path)
            return True

    def release_replacement(self, path: str) -> None:
        with self._lock:
            self._replacing.discard(path)

    # -- metering ------------------------------------------------------------------------------

    def open_metered(
        self, jail: Jail, path: str, flags: int = os.O_RDONLY, mode: int = 0o644
    ) -> MeteredFile:
        """Open a regular file beneath ``jail`` as a ``MeteredFile`` (a context manager).

        ``flags`` as ``os.open``: ``O_TRUNC`` gives the freed bytes back, ``O_APPEND`` writes at
        the end whatever offset is asked. Open read-only handles through here too: a file removed
        while any handle of a client holds it keeps counting until that handle closes.
        """
        fd = jail.open(path, flags & ~os.O_APPEND, mode)
        try:
            handle = MeteredFile(self, fd, bool(flags & os.O_APPEND), path)
        except BaseException:
            os.close(fd)
            raise
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            try:
                handle.truncate(0)
            except BaseException:
                handle.close()
                raise
        return handle

    def remove(self, jail: Jail, path: str) -> os.stat_result:
        """Unlink a file or symlink beneath ``jail``; its bytes are given back as ``release``
        says."""
        st = jail.remove(path)
        self.release(st)
        return st

    def remove_tree(self, jail: Jail, path: str) -> int:
        """Remove ``path`` beneath ``jail``, a whole directory included, never following a link;
        each file is given back as ``release`` says. Returns the bytes given back."""
        with jail.resolve(path, follow=False) as where:
            if where.name is None:
                raise PermissionError(errno.EPERM, "the server's root directory cannot be removed")
            st = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(where.name, dir_fd=where.dir_fd)
                return self.release(st)
            return self._remove_dir_at(where.dir_fd, where.name)

    def _remove_dir_at(self, parent_fd: int, name: str) -> int:
        """Depth first from directory fds opened with ``O_NOFOLLOW``: one fd per level."""
        freed = 0
        frames: list[tuple[int, str, int, list[str]]] = []  # (parent fd, name, fd, names left)
        try:
            fd = os.open(name, Jail._DIR_FLAGS, dir_fd=parent_fd)
            frames.append((parent_fd, name, fd, os.listdir(fd)))
            while frames:
                parent, own, fd, names = frames[-1]
                if not names:
                    frames.pop()
                    os.close(fd)
                    os.rmdir(own, dir_fd=parent)
                    continue
                child = names.pop()
                try:
                    st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        child_fd = os.open(child, Jail._DIR_FLAGS, dir_fd=fd)
                        frames.append((fd, child, child_fd, os.listdir(child_fd)))
                    else:
                        os.unlink(child, dir_fd=fd)
                        freed += self.release(st)
                except FileNotFoundError:
                    continue  # removed meanwhile
        finally:
            for _, _, fd, _ in frames:
                os.close(fd)
        return freed

    def rename(
        self, jail: Jail, src: str, dst: str, overwrite: bool = True
    ) -> os.stat_result | None:
        """``Jail.rename``; a file it replaces is given back as ``release`` says."""
        old = jail.rename(src, dst, overwrite=overwrite)
        self.release(old)
        return old

    def release(self, st: os.stat_result | None) -> int:
        """Give back what the figure counts for a file whose last link is gone; returns it.

        ``st`` is the file's lstat taken before it went. Nothing is given back for a directory,
        a symlink, a file with links left, or a file a metered handle still holds (that happens
        when the last such handle closes).
        """
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            return 0
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._open:
                return 0
            return self._give_back(key, st)

    def _give_back(self, key: tuple[int, int], st: os.stat_result) -> int:
        """Forget a file that is gone and give back what the figure counted for it (lock held)."""
        known = key in self._ledger or st.st_ctime_ns < self._walk_started_ns - self._CTIME_SLACK_NS
        credit = self._counted(key, st)
        self._ledger.pop(key, None)
        self._usage = max(0, self._usage - credit)
        self._booked_total -= credit
        for walk in self._walks:
            walk.removed[key] = walk.removed.get(key, 0) + credit
        if not known and st.st_size and self._measured_at is not None:
            # The game wrote it since the walk; nothing booked it. The next walk tells the truth.
            due = time.monotonic() - self.check_interval_s + self.recheck_after_unknown_s
            self._measured_at = min(self._measured_at, due)
        return credit

    def _counted(self, key: tuple[int, int], st: os.stat_result) -> int:
        """What the figure counts for this inode, given its stat before a change (lock held)."""
        if key in self._ledger:
            return self._ledger[key]
        if st.st_ctime_ns < self._walk_started_ns - self._CTIME_SLACK_NS:
            return st.st_size  # unchanged since before the last walk began: it counted this
        return 0

    def _book(
        self, n_bytes: int, key: tuple[int, int] | None = None, st: os.stat_result | None = None
    ) -> bool:
        """Check and book ``n_bytes`` (of the inode ``key`` whose stat was ``st``)."""
        if n_bytes <= 0:
            return True
        if self._limit and self._measured_at is None and self.quota.usage_bytes(self.root) is None:
            # the first metered write of a never-measured server waits for a real figure
            self.recalculate()
        else:
            self.usage_bytes()
        with self._lock:
            if self._limit and self._usage + n_bytes > self._limit:
                return False
            self._usage += n_bytes
            self._booked_total += n_bytes
            if key is not None and st is not None:
                self._note(key, st, n_bytes)
            return True

    def _unbook(self, key: tuple[int, int], st: os.stat_result, n_bytes: int) -> None:
        """Give back bytes of an inode that it no longer holds (a failed write, a truncation)."""
        with self._lock:
            credit = min(n_bytes, self._counted(key, st))
            if credit <= 0:
                return
            self._usage = max(0, self._usage - credit)
            self._booked_total -= credit
            self._note(key, st, -credit)

    def _shrunk(self, key: tuple[int, int], st: os.stat_result, size: int) -> None:
        """A file cut to ``size`` counts at most that: give back what was counted above it."""
        with self._lock:
            credit = self._counted(key, st) - size
            if credit > 0:
                self._usage = max(0, self._usage - credit)
                self._booked_total -= credit
                self._note(key, st, -credit)

    def _note(self, key: tuple[int, int], st: os.stat_result, delta: int) -> None:
        """Record a booking in the ledger and in every running walk (lock held)."""
        if key in self._ledger or len(self._ledger) < self.max_ledger_entries:
            self._ledger[key] = max(0, self._counted(key, st) + delta)
        for walk in self._walks:
            walk.booked[key] = walk.booked.get(key, 0) + delta

    def _opened(self, handle: MeteredFile, key: tuple[int, int]) -> None:
        with self._lock:
            self._open.setdefault(key, set()).add(handle)
            st = os.fstat(handle.fileno())
            if st.st_nlink == 0 and key not in self._ledger:
                # Removed between its open and now, and perhaps given back already: it is held.
                self._usage += st.st_size
                self._booked_total += st.st_size
                self._ledger[key] = st.st_size

    def _closing(
        self, handle: MeteredFile, key: tuple[int, int], st: os.stat_result | None
    ) -> None:
        """The last metered handle of a file whose last link went gives its bytes back."""
        with self._lock:
            handles = self._open.get(key)
            if handles is not None:
                handles.discard(handle)
                if handles:
                    return
                del self._open[key]
            if st is not None and st.st_nlink == 0:
                self._give_back(key, st)

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
    """A gitignore-style glob as a regex over '/'-rooted paths (``*.jar``, ``/config/**``,
    ``logs/``)."""
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


# Python integers cannot overflow, but the kernel's offsets can: beyond off_t a write is refused.
MAX_FILE_BYTES = (1 << 63) - 1


class DiskLimitExceeded(OSError):
    """A metered write or truncation that would pass the server's disk limit (errno EDQUOT).

    Nothing of the refused call was written. SFTP answers it with status 15, "Quota Exceeded".
    """

    def __init__(self, limit_bytes: int, path: str = ""):
        super().__init__(
            errno.EDQUOT, f"the disk limit of {limit_bytes} bytes would be passed", path or None
        )
        self.limit_bytes = limit_bytes


@dataclasses.dataclass
class _WalkState:
    """What raced one usage walk: bookings and removals by inode while it ran."""

    started_ns: int
    booked_at_start: int = 0
    booked: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    removed: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    seen_removed: set[tuple[int, int]] = dataclasses.field(default_factory=set)


class MeteredFile:
    """A regular file of a server, opened through its jail; every byte of growth is booked first.

    Made by ``Filesystem.open_metered(jail, path, flags)``. Methods for the caller: ``write(data)``
    (at the file position), ``pwrite(data, offset)``, ``read(n)``, ``pread(n, offset)``,
    ``truncate(size)``, ``seek(offset)``, ``stat()``, ``fileno()``, ``close()``; use it as a
    context manager. Thread-safe: one write or truncation at a time.

    Growth is ``max(0, offset + len(data) - current size)``: a write inside the file books nothing,
    a write past its end books the gap too (a sparse file counts its apparent size, as the usage
    walk does). A call that does not fit raises ``DiskLimitExceeded`` and writes nothing, so the
    file ends at the last write that fitted; bytes booked but not written (a failing disk) are
    given back. While any metered handle holds a file, removing or replacing it gives nothing
    back: its blocks stay on the disk until the last handle closes, and so does its count.
    """

    def __init__(self, fs: Filesystem, fd: int, append: bool = False, name: str = ""):
        self._fs = fs
        self._fd = fd
        self.append = append
        self.name = name
        self._pos = 0
        self._lock = threading.Lock()  # growth is computed from the size: one change at a time
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        fs._opened(self, self._key)

    def __enter__(self) -> MeteredFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on a closed file")
        return self._fd

    def stat(self) -> os.stat_result:
        return os.fstat(self.fileno())

    def seek(self, offset: int) -> None:
        self._pos = max(0, offset)

    def read(self, n_bytes: int) -> bytes:
        data = self.pread(n_bytes, self._pos)
        self._pos += len(data)
        return data

    def pread(self, n_bytes: int, offset: int) -> bytes:
        if n_bytes < 0 or offset < 0:
            raise OSError(errno.EINVAL, "negative length or offset", self.name)
        return os.pread(self.fileno(), n_bytes, offset)

    def write(self, data: bytes) -> int:
        with self._lock:
            offset = self._pos
            written = self._pwrite(data, offset)
            self._pos = os.fstat(self._fd).st_size if self.append else offset + written
            return written

    def pwrite(self, data: bytes, offset: int) -> int:
        """Write all of ``data`` at ``offset`` (at the end when opened for appending)."""
        with self._lock:
            return self._pwrite(data, offset)

    def _pwrite(self, data: bytes, offset: int) -> int:
        before = os.fstat(self.fileno())
        if self.append:  # O_APPEND would make pwrite ignore the offset that was metered
            offset = before.st_size
        end = offset + len(data)
        if offset < 0 or end > MAX_FILE_BYTES:
            raise OSError(
                errno.EFBIG, f"offset {offset} is outside what a file can hold", self.name
            )
        growth = max(0, end - before.st_size)
        if growth and not self._fs._book(growth, self._key, before):
            raise DiskLimitExceeded(self._fs.limit_bytes, self.name)
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                n = os.pwrite(self._fd, view[written:], offset + written)
                if n <= 0:
                    raise OSError(errno.EIO, "the file accepted no more bytes", self.name)
                written += n
        except BaseException:
            unused = growth - max(0, offset + written - before.st_size)
            if unused > 0:
                self._fs._unbook(self._key, os.fstat(self._fd), unused)
            raise
        return written

    def truncate(self, size: int) -> None:
        """Set the size; growth is booked first, shrinking gives back what was counted."""
        if size < 0 or size > MAX_FILE_BYTES:
            raise OSError(errno.EINVAL, f"invalid file size {size}", self.name)
        with self._lock:
            before = os.fstat(self.fileno())
            growth = size - before.st_size
            if growth > 0 and not self._fs._book(growth, self._key, before):
                raise DiskLimitExceeded(self._fs.limit_bytes, self.name)
            try:
                os.ftruncate(self._fd, size)
            except BaseException:
                if growth > 0:
                    self._fs._unbook(self._key, os.fstat(self._fd), growth)
                raise
            if growth < 0:
                self._fs._shrunk(self._key, before, size)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            st: os.stat_result | None = os.fstat(fd)
        except OSError:
            st = None
        try:
            self._fs._closing(self, self._key, st)
        finally:
            os.close(fd)


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


class JailEntry(tuple):
    """One entry met by ``Jail.walk``: its jail path (``/a/b``) and its lstat (links not followed).

    A tuple underneath: a walk makes one per file, and a tuple is the cheapest object to make.
    """

    __slots__ = ()

    def __new__(cls, path: str, st: os.stat_result) -> JailEntry:
        return tuple.__new__(cls, (path, st))

    @property
    def path(self) -> str:
        return self[0]

    @property
    def stat(self) -> os.stat_result:
        return self[1]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.stat.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.stat.st_mode)


# openat2(2), Linux 5.6+: resolve a path under a directory fd with the kernel's own guarantees.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437, "armv7l": 437, "ppc64le": 437}
_OPEN_HOW = struct.Struct("=QQQ")  # struct open_how: flags, mode, resolve
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08


def _openat2_beneath(dir_fd: int, path: str) -> bool | None:
    """Does ``path`` resolve beneath ``dir_fd`` (following links)? True: yes; False: it leads
    outside (EXDEV); None: the kernel cannot tell (no openat2, or a component does not exist)."""
    number = _SYS_OPENAT2.get(platform.machine())
    if number is None:
        return None
    how = ctypes.create_string_buffer(
        _OPEN_HOW.pack(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    )
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(number), ctypes.c_int(dir_fd), os.fsencode(path), how, ctypes.c_size_t(24)
    )
    if fd >= 0:
        os.close(fd)
        return True
    return (
        False if ctypes.get_errno() == errno.EXDEV else None
    )  # ENOSYS, ENOENT, ELOOP: ask the jail


class Jail:
    """Every path resolved beneath one directory, never through a symlink that leads out of it.

    Methods for the caller (paths as a client writes them; ``/`` is the jail's root, ``..`` may not
    climb above it): ``normalize``, ``resolve``, ``open``, ``stat``, ``lstat``, ``listdir``,
    ``walk``, ``mkdir``, ``rmdir``, ``remove``, ``rename``, ``symlink``, ``readlink``, ``chmod``,
    ``chown``, ``utime``, ``close``. Errors are ``OSError``; escapes are ``PathEscape`` (EACCES).
    Writers go through ``Filesystem.open_metered`` / ``remove`` / ``rename``, which call these
    and keep the disk figure right; every reader of a whole tree (usage walk, backups, archives,
    transfers) uses ``walk()``, which reports symlinks as links and never follows them.

    Symlinks made through the jail (``symlink``) must land inside when resolved from where they
    really sit -- not from the path as written, which may pass through other links -- and may
    climb with leading ``..`` only; moving a link or a directory re-checks the relative links it
    carries and refuses the move if one would land outside from the new place.
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
    max_walk_depth = (
        256  # ``walk`` holds one fd per level; deeper directories are reported, not entered
    )

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
        """``path`` cleaned lexically into components; ``PathEscape`` if it climbs above the
        root."""
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

    def check_link(self, path: str, target: str) -> None:
        """Refuse (``PathEscape``) a symlink ``path`` -> ``target`` that the jail would not make.

        For a caller that makes links some other way (an archive staged elsewhere first, say):
        ``path``'s directory is resolved as it really is (components that do not exist yet are
        taken as written) and the target checked from there, as ``symlink`` does.
        """
        parts = self.parts(path)
        self._check_new_link(self._real_dir(parts[:-1]), target)

    def _check_link_target(self, link_parts: list[str], target: str) -> None:
        """Where a link at ``link_parts`` (as written) to ``target`` lands must be inside."""
        self._check_landing(self._real_dir(link_parts[:-1]), target)

    def _real_dir(self, parts: list[str]) -> list[str]:
        """The real components of the directory ``parts`` names, links resolved; trailing
        components that do not exist yet are kept as written."""
        missing: list[str] = []
        parts = list(parts)
        while True:
            try:
                with self.resolve("/".join(parts)) as where:
                    return [p for p in where.relpath.split("/") if p] + missing
            except FileNotFoundError:
                if not parts:
                    raise
                missing.insert(0, parts.pop())

    def _check_new_link(self, parent: list[str], target: str) -> None:
        """Refuse a target for a new symlink whose real directory is ``parent`` (components).

        Only leading ``..`` are allowed: in ``a/../b`` the ``..`` climbs from wherever ``a``
        leads at the time, which another link can change later; ``../b`` climbs from the link's
        own directory, which only a rename can move (and a rename re-checks it).
        """
        if not target or "\x00" in target:
            raise OSError(errno.EINVAL, "empty symlink target or NUL byte in it")
        parts = [p for p in target.split("/") if p not in ("", ".")]
        climbs = next((i for i, p in enumerate(parts) if p != ".."), len(parts))
        if ".." in parts[climbs:]:
            raise PathEscape(f"symlink target {target!r}: '..' may only lead it, not follow a name")
        self._check_landing(parent, target)

    def _check_landing(self, parent: list[str], target: str) -> None:
        """Refuse ``target`` when, read from the real directory ``parent``, it lands outside.

        The kernel decides where it can (``openat2`` with ``RESOLVE_BENEATH`` from the root);
        a target that does not exist (yet) is resolved step by step by the jail itself.
        """
        if target.startswith("/"):
            raise PathEscape(f"symlink to an absolute path {target!r}")
        parts = [p for p in target.split("/") if p not in ("", ".")]
        climbs = next((i for i, p in enumerate(parts) if p != ".."), len(parts))
        if climbs > len(parent):
            raise PathEscape(f"symlink target {target!r} leads outside from /{'/'.join(parent)}")
        landing = "/".join([*parent, *parts])
        verdict = _openat2_beneath(self._fd, landing or ".")
        if verdict is False:
            raise PathEscape(f"symlink target {target!r} leads outside from /{'/'.join(parent)}")
        if verdict is None:
            try:
                with self.resolve(landing):
                    pass
            except (FileNotFoundError, NotADirectoryError):
                pass  # dangling: only names below a missing directory are left, which stay inside

    def _check_carried_links(self, src: str, parent: list[str], name: str) -> None:
        """Before directory ``src`` moves to ``parent``/``name``: every relative link inside it
        that climbs above it must still land inside from there."""
        for entry in self.walk(src):
            if not stat.S_ISLNK(entry.stat.st_mode):
                continue
            with self.resolve(entry.path, follow=False) as where:
                target = os.readlink(where.name, dir_fd=where.dir_fd)
            if target.startswith("/"):
                continue  # absolute: refused wherever it is followed, the move changes nothing
            inner = self.parts(entry.path)[len(self.parts(src)) : -1]
            parts = [p for p in target.split("/") if p not in ("", ".")]
            climbs = next((i for i, p in enumerate(parts) if p != ".."), len(parts))
            if climbs > len(inner):  # it climbs above the moved directory: its landing moves
                try:
                    self._check_landing([*parent, name, *inner], target)
                except PathEscape:
                    raise PathEscape(
                        f"moving {src!r} would make the link {entry.path!r} -> {target!r} lead "
                        "outside"
                    ) from None

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
        """``(name, lstat)`` of every entry of a directory (entries that vanish meanwhile are
        skipped)."""
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

    def walk(
        self, path: str = "/", on_error: Callable[[str, OSError], None] | None = None
    ) -> Iterator[JailEntry]:
        """Every entry beneath the directory ``path``, each directory before what it holds.

        Symlinks are yielded as links (their ``lstat``) and never followed; each directory is
        entered with ``O_NOFOLLOW`` from its parent's fd, so one swapped for a link meanwhile is
        skipped, never walked out of. Entries that vanish meanwhile are skipped. Errors on the way
        (unreadable directories, nesting deeper than ``max_walk_depth``) go to ``on_error(path,
        exc)`` and the walk goes on; without ``on_error`` they are raised. The denylist is not
        applied: a caller that hands entries to a client checks ``is_denied`` itself.
        """
        with self.resolve(path) as where:
            fd = os.open(where.name or ".", self._DIR_FLAGS, dir_fd=where.dir_fd)
            top = "/" + where.relpath
        frames: list[tuple[int, str, list[str]]] = []
        try:
            yield from self._walk_dir(fd, top, frames, on_error)
            while frames:
                fd, dirpath, pending = frames[-1]
                if not pending:
                    os.close(frames.pop()[0])
                    continue
                name = pending.pop()
                child = posixpath.join(dirpath, name)
                if len(frames) >= self.max_walk_depth:
                    self._walk_error(on_error, child, OSError(errno.ELOOP, "nested too deep"))
                    continue
                try:
                    child_fd = os.open(name, self._DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        self._walk_error(on_error, child, exc)
                    continue
                yield from self._walk_dir(child_fd, child, frames, on_error)
        finally:
            for frame in frames:
                os.close(frame[0])

    def _walk_dir(
        self,
        fd: int,
        dirpath: str,
        frames: list[tuple[int, str, list[str]]],
        on_error: Callable[[str, OSError], None] | None,
    ) -> Iterator[JailEntry]:
        """Yield one directory's entries; push it (fd, path, subdirectories) for the walk."""
        subdirs: list[str] = []
        frames.append((fd, dirpath, subdirs))  # from here on the walk closes ``fd``
        prefix = dirpath.rstrip("/") + "/"
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield JailEntry(prefix + entry.name, st)
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(entry.name)
        except OSError as exc:
            self._walk_error(on_error, dirpath, exc)
        subdirs.reverse()  # popped from the end: walk them in listing order

    @staticmethod
    def _walk_error(
        on_error: Callable[[str, OSError], None] | None, path: str, exc: OSError
    ) -> None:
        if on_error is None:
            raise exc
        on_error(path, exc)

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
        """Move ``src`` to ``dst``; returns the lstat of a file that was replaced (for
        accounting)."""
        with self.resolve(src, follow=False) as a, self.resolve(dst, follow=False) as b:
            if a.name is None or b.name is None:
                raise PermissionError(errno.EPERM, "the root cannot be renamed or replaced")
            st = os.stat(a.name, dir_fd=a.dir_fd, follow_symlinks=False)
            dst_parent = b.relpath.split("/")[:-1]  # where it really lands, links resolved
            if stat.S_ISLNK(st.st_mode):  # a relative link may point elsewhere from its new place
                self._check_landing(dst_parent, os.readlink(a.name, dir_fd=a.dir_fd))
            elif stat.S_ISDIR(st.st_mode):  # ... and so may the links a directory carries
                self._check_carried_links("/" + a.relpath, dst_parent, b.name)
            try:
                old = os.stat(b.name, dir_fd=b.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and not overwrite:
                raise FileExistsError(errno.EEXIST, "the target exists", dst)
            os.rename(a.name, b.name, src_dir_fd=a.dir_fd, dst_dir_fd=b.dir_fd)
            return old

    def symlink(self, target: str, path: str) -> None:
        """Create ``path`` -> ``target``; refused when the target would land outside the root
        read from where the link really sits (``path``'s directory may itself be reached through
        links), or climbs with ``..`` after a name (see ``_check_new_link``)."""
        with self.resolve(path, follow=False) as where:
            if where.name is None:
                raise FileExistsError(errno.EEXIST, "exists", path)
            self._check_new_link(where.relpath.split("/")[:-1], target)
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
    """``(mount point, filesystem type, source)`` of the mount holding ``path`` (from
    /proc/self/mountinfo)."""
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
        """The backend for ``data_dir``, turning btrfs quotas on if they are off; else ``None`` and
        why not."""
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
        backend.reason = (
            f"{data_dir} is on btrfs with quotas on: each server directory is a subvolume with a "
            "qgroup limit"
        )
        return backend, backend.reason

    def _cli(self, *args: str) -> str:
        try:
            done = self._run([self._btrfs, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(f"btrfs {' '.join(args)}: {exc}") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(
                f"btrfs {' '.join(args)}: "
                f"{lines[-1] if lines else f'exit status {done.returncode}'}"
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
            f"disk limit: soft for this server: {root} is a plain directory, not a btrfs "
            "subvolume, so the kernel cannot hold it"
            " to the limit (the daemon's writes are checked and the running server is stopped "
            "when over it)"
        )

    def set_limit(self, root: Path, limit_bytes: int) -> list[str]:
        if not self.enforced(root):
            return [self._soft_note(root)]
        qgroup = f"0/{int(self._cli('inspect-internal', 'rootid', str(root)).strip())}"
        # Name the qgroup and point the command at the parent: run against the subvolume itself,
        # btrfs charges the command's own metadata to that qgroup and refuses (EDQUOT) once it is
        # over its limit, so a full server could never have its limit raised or removed.
        self._cli(
            "qgroup",
            "limit",
            str(limit_bytes) if limit_bytes > 0 else "none",
            qgroup,
            str(root.parent),
        )
        # qgroup figures move at transaction commits; commit now so the sync record's usage is
        # today's
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
    """Referenced bytes of ``qgroup`` (default: the level-0 one) in ``btrfs qgroup show --raw``
    output."""
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
    """The ``if_dqblk`` for ``Q_SETQUOTA``: a hard (and soft) block limit rounded up to whole KiB; 0
    = none."""
    blocks = -(-limit_bytes // QUOTA_BLOCK_BYTES) if limit_bytes > 0 else 0
    return IF_DQBLK.pack(blocks, blocks, 0, 0, 0, 0, 0, 0, QIF_BLIMITS)


class KernelCalls:
    """The two system calls project quotas need (``ioctl``, ``quotactl``); tests substitute a
    recorder."""

    def ioctl(self, fd: int, request: int, buf: bytearray) -> None:
        fcntl.ioctl(fd, request, buf)

    def quotactl(self, cmd: int, device: str, ident: int, buf: bytearray) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        addr = (ctypes.c_char * len(buf)).from_buffer(buf)
        if libc.quotactl(ctypes.c_int(cmd), os.fsencode(device), ctypes.c_int(ident), addr) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"quotactl: {os.strerror(err)}")


class ProjectQuota(QuotaBackend):
    """ext4/xfs project quotas: each server directory tagged with its own project id, which
    carries a hard limit.

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
                errno.ESRCH: (
                    f"project quotas are not on for {device} (it needs a prjquota mount, which "
                    "needs a kernel with CONFIG_QUOTA)"
                ),
                errno.EPERM: "managing quotas needs root",
            }.get(exc.errno or 0, str(exc))
            return None, f"{data_dir} is on {fstype} but {why}"
        backend = cls(data_dir, device, calls=calls)
        backend.reason = (
            f"{data_dir} is on {fstype} ({device}) with project quotas on: each server directory "
            "has its own project id"
        )
        return backend, backend.reason

    def _xattr(self, fd: int) -> tuple[int, ...]:
        buf = bytearray(FSXATTR.size)
        self._calls.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        return FSXATTR.unpack(buf)

    def _tag(self, path: Path, project_id: int, inherit: bool) -> None:
        # O_NONBLOCK: the game server may have made a FIFO, whose plain open waits for a writer
        # forever.
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
    """The backend for ``wingslite.disk_quota``; ``auto`` takes the strongest the data
    directory's filesystem supports.

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
        soft.reason = (
            "wingslite.disk_quota is soft: the daemon's own write paths check the limit, and a "
            "server over it is stopped"
        )
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
    soft.reason = (
        f"{prefix} ({'; '.join(reasons)}): the daemon's own write paths check the limit, and a "
        "server over it is stopped"
    )
    (LOG.info if mode == "auto" else LOG.warning)("disk quota: soft: %s", soft.reason)
    return soft


def must_stop_for_disk(fs: Filesystem) -> bool:
    """True when a running server is over its disk limit and no kernel quota holds it there.

    Wings stops such a server ("Server is exceeding the assigned disk space limit, stopping
    process now.", server/listeners.go); under a kernel quota the writes are refused instead and
    the server runs on.
    """
    return (
        bool(fs.limit_bytes)
        and fs.quota.stops_running_servers
        and not fs.quota.enforced(fs.root)
        and not fs.has_space()
    )


# archives #########################################################################################
#
# Archives leave a jail as tar.gz (backups, transfers, the file manager's compress) and come back
# into one (restore, a received transfer, decompress). Both directions go through the ``Jail``:
#
#   out   ``write_tar_gz(jail, out, ignore=...)`` walks with directory fds opened O_NOFOLLOW, so a
#         symlink is archived as a link and never followed out; an ``IgnoreMatcher`` (gitignore
#         syntax, as ``.pteroignore``) leaves paths out; ``HashingWriter`` hashes while writing.
#   in    ``extract_archive(jail, fs, src, name=...)`` reads tar (plain, gz, bz2, xz), zip and a
#         single .gz/.bz2/.xz file from a stream or a file. Every entry is checked and written
#         through the jail: no absolute names, no "..", no link that points out, no device files
#         or FIFOs; modes are kept (without setuid/setgid); every byte is booked against the
#         disk limit before it is written, so an archive bomb stops at the limit.

UNSUPPORTED_ARCHIVE = "unsupported archive format"
# Linux's PATH_MAX. Wings makes each entry's directories by their full path, so longer names fail
# there; here a longer name would be a tree thousands of levels deep.
ARCHIVE_NAME_MAX_BYTES = 4096
ARCHIVE_CHUNK_BYTES = 1 << 20


class ArchiveError(WingsliteError):
    """An archive that cannot be read or breaks a rule; ``message`` names the entry and why."""

    status = 400


class IgnoreMatcher:
    """gitignore rules (``.pteroignore``, a backup's ``ignore``) over paths relative to a root.

    Supported: ``#`` comments, blank lines, ``!`` exceptions, trailing ``/`` (directories only),
    a leading or middle ``/`` anchoring the rule at the root, ``*``, ``?``, ``[...]``, ``**``,
    and ``\\`` escapes. The last rule that matches decides. As in git, nothing under an ignored
    directory can be brought back by an exception (the walk never enters that directory).

    Methods for the caller: ``ignored(relpath, is_dir)``; ``bool(matcher)`` is False when empty.
    """

    def __init__(self, text: str = ""):
        self.rules: list[tuple[Any, bool, bool]] = []  # (matcher with .match, negated, dirs only)
        for line in text.splitlines():
            rule = self._parse(line)
            if rule is not None:
                self.rules.append(rule)

    def __bool__(self) -> bool:
        return bool(self.rules)

    @staticmethod
    def _parse(line: str) -> tuple[Any, bool, bool] | None:
        line = line.rstrip("\r")
        while line.endswith(" ") and not line.endswith("\\ "):
            line = line[:-1]
        if not line or line.startswith("#"):
            return None
        negated = line.startswith("!")
        if negated or line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        dirs_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            return None
        anchored = "/" in line
        tokens = [("dirs", "(?:.*/)?")] if not anchored else []
        tokens += _gitignore_tokens(line.lstrip("/"))
        try:
            if sum(kind != "char" for kind, _ in tokens) <= 2:
                return re.compile("^" + "".join(f for _, f in tokens) + "$"), negated, dirs_only
            return _GlobAutomaton(tokens), negated, dirs_only
        except re.error:  # "[z-a]": git's wildmatch matches nothing with it either
            return None

    def ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """True when ``relpath`` ('/'-separated, relative to the root) is left out."""
        path = relpath.strip("/")
        verdict = False
        for regex, negated, dirs_only in self.rules:
            if (is_dir or not dirs_only) and regex.match(path):
                verdict = not negated
        return verdict


def _gitignore_tokens(glob: str) -> list[tuple[str, str]]:
    """A glob as ``(kind, regex)``: kind "char" (one character), "star" (``[^/]*``), "any"
    (``.*``) or "dirs" (``(?:.*/)?``, a leading or middle ``**/``)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i) and (i == 0 or glob[i - 1] == "/"):
            out.append(("dirs", "(?:.*/)?"))
            i += 3
        elif glob.startswith("**", i):
            out.append(("any", ".*"))
            i += 2
        elif c == "*":
            out.append(("star", "[^/]*"))
            i += 1
        elif c == "?":
            out.append(("char", "[^/]"))
            i += 1
        elif c == "\\" and i + 1 < len(glob):
            out.append(("char", re.escape(glob[i + 1])))
            i += 2
        elif c == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            inner = glob[i + 1 : end]
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            out.append(("char", "[" + inner.replace("\\", "\\\\") + "]"))
            i = end + 1
        else:
            out.append(("char", re.escape(c)))
            i += 1
    return out


class _GlobAutomaton:
    """A glob with three or more stars, matched in O(path x pattern) by following every state.

    Python's ``re`` backtracks: ``*a*a*a*a*a*a*a*a*b`` against a name of 60 "a"s took minutes,
    and both the backup's ``ignore`` and ``.pteroignore`` are written by the user. Wings matches
    with Go's RE2, which never backtracks; so does this. Fewer stars stay ``re`` (at worst
    quadratic over one path).
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.kinds = [kind for kind, _ in tokens]
        self.chars = [re.compile(f) if kind == "char" else None for kind, f in tokens]

    def _closure(self, states: set[int]) -> set[int]:
        todo, out = list(states), set(states)
        while todo:
            i = todo.pop()
            if 0 <= i < len(self.kinds) and self.kinds[i] != "char" and i + 1 not in out:
                out.add(i + 1)  # every star may match nothing
                todo.append(i + 1)
        return out

    def match(self, path: str) -> bool:
        # State i: before token i. A "dirs" token, once it has read a character, is inside its
        # ".*" (state -1 - i): only a "/" leads out of it.
        states = self._closure({0})
        for ch in path:
            after: set[int] = set()
            for i in states:
                if i < 0:
                    i = -1 - i
                    after.add(-1 - i)
                    if ch == "/":
                        after.add(i + 1)
                    continue
                if i >= len(self.kinds):
                    continue
                kind = self.kinds[i]
                if kind == "char":
                    if self.chars[i].fullmatch(ch):
                        after.add(i + 1)
                elif kind == "any" or (kind == "star" and ch != "/"):
                    after.add(i)
                elif kind == "dirs":
                    after.add(-1 - i)
                    if ch == "/":
                        after.add(i + 1)
            states = self._closure(after)
            if not states:
                return False
        return len(self.kinds) in states


class HashingWriter:
    """A writable stream that hashes and counts every byte on its way to ``out``.

    Attributes: ``bytes_written``; ``hexdigest()``. ``out`` may be any object with ``write``.
    """

    def __init__(self, out: Any, algorithm: str = "sha1"):
        self.out = out
        self.hash = hashlib.new(algorithm)
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.out.write(data)
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class _FixedSizeReader:
    """Exactly ``size`` bytes of ``fd``: a file that shrank while archived is padded with zeros and
    one that grew is cut, so the tar header written before the contents stays true."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = os.read(self.fd, n)
        if not data:
            data = bytes(n)
        self.left -= len(data)
        return data


def write_tar_gz(
    jail: Jail,
    out: Any,
    *,
    root: str = "/",
    files: Iterable[str] | None = None,
    ignore: IgnoreMatcher | str | None = None,
    compress_level: int = 1,
    on_entry: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> int:
    """Stream the tree under ``root`` of ``jail`` into ``out`` as tar.gz; returns the entry count.

    ``files`` (names relative to ``root``) limits the archive to those entries, else everything
    under ``root``. Names in the archive are relative to ``root``. Symlinks are stored as links
    (never followed); sockets, FIFOs and device files are skipped; the egg's denylist and
    ``ignore`` leave paths out. ``out`` only needs ``write`` (a file, a socket's file, a
    ``HashingWriter``). ``cancelled()`` is asked between entries and stops the walk with
    ``ArchiveError``. gzip level 1 by default, as Wings' ``compression_level: best_speed``.
    """
    matcher = ignore if isinstance(ignore, IgnoreMatcher) else IgnoreMatcher(ignore or "")
    with jail.resolve(root) as where:
        root_fd = os.open(where.name or ".", Jail._DIR_FLAGS, dir_fd=where.dir_fd)
    gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=compress_level, mtime=0)
    try:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            walk = _TarWalk(tar, jail, matcher, on_entry, cancelled)
            names = [n for n in (files or ()) if n.strip("/")]
            if files is None:
                walk.directory(root_fd, "")
            for name in names:
                walk.named(root_fd, "/".join(Jail.parts(name)))
            count = walk.count
        gz.close()
    finally:
        os.close(root_fd)
    return count


class _TarWalk:
    """The walk of ``write_tar_gz``: one directory fd at a time, every open ``O_NOFOLLOW``."""

    def __init__(
        self,
        tar: tarfile.TarFile,
        jail: Jail,
        matcher: IgnoreMatcher,
        on_entry: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ):
        self.tar, self.jail, self.matcher = tar, jail, matcher
        self.on_entry, self.cancelled = on_entry, cancelled
        self.count = 0

    def _skip(self, relpath: str, is_dir: bool) -> bool:
        if self.matcher.ignored(relpath, is_dir):
            return True
        return self.jail.is_denied is not None and self.jail.is_denied(relpath)

    def named(self, dir_fd: int, relpath: str) -> None:
        """One entry given by name (``files=``); its parents are walked without following links."""
        *parents, name = relpath.split("/")
        fds = [dir_fd]
        try:
            for part in parents:
                fds.append(os.open(part, Jail._DIR_FLAGS, dir_fd=fds[-1]))
            st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            self.entry(fds[-1], name, relpath, st)
        finally:
            for fd in fds[1:]:
                os.close(fd)

    def directory(self, dir_fd: int, relpath: str) -> None:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walk
            self.entry(dir_fd, entry.name, f"{relpath}/{entry.name}".lstrip("/"), st)

    def entry(self, dir_fd: int, name: str, relpath: str, st: os.stat_result) -> None:
        if self.cancelled is not None and self.cancelled():
            raise ArchiveError("the archive was cancelled")
        is_dir = stat.S_ISDIR(st.st_mode)
        if self._skip(relpath, is_dir):
            return
        info = tarfile.TarInfo(relpath)
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        info.uid, info.gid = st.st_uid, st.st_gid
        if is_dir:
            info.type = tarfile.DIRTYPE
            self._add(info)
            try:
                fd = os.open(name, Jail._DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            try:
                self.directory(fd, relpath)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            try:
                info.linkname = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            self._add(info)
        elif stat.S_ISREG(st.st_mode):
            self._file(dir_fd, name, info)

    def _file(self, dir_fd: int, name: str, info: tarfile.TarInfo) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP:
                return  # removed, or swapped for a link, since the listing
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            os.set_blocking(fd, True)
            info.size = st.st_size
            self._add(info, _FixedSizeReader(fd, st.st_size))
        finally:
            os.close(fd)

    def _add(self, info: tarfile.TarInfo, reader: Any = None) -> None:
        self.tar.addfile(info, reader)
        self.count += 1
        if self.on_entry is not None:
            self.on_entry(info.name)


# -- extraction -----------------------------------------------------------------------------------

_MAGIC_7Z = b"7z\xbc\xaf\x27\x1c"
_MAGIC_RAR = b"Rar!\x1a\x07"
_COMPRESSORS: dict[str, tuple[bytes, Callable[[Any], Any], tuple[str, ...]]] = {
    "gzip": (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"), (".gz", ".tgz")),
    "bzip2": (b"BZh", lambda raw: bz2.BZ2File(raw, mode="rb"), (".bz2", ".tbz2", ".tbz")),
    "xz": (b"\xfd7zXZ\x00", lambda raw: _xz_reader(raw), (".xz", ".txz")),
}
# An .xz header names the dictionary the decoder allocates: up to 4 GiB, filled as data passes,
# and a tar member the extractor skips (a device, an unknown type) passes without being written,
# so the disk limit does not bound it -- 80 KB of xz held 512 MiB. ``xz -9`` needs 65 MiB.
ARCHIVE_XZ_MEMLIMIT_BYTES = 256 << 20


def _xz_reader(raw: Any) -> Any:
    """``lzma.LZMAFile`` with a memory limit (LZMAFile has no parameter for it)."""
    import _compression  # what gzip, bz2 and lzma build their readers from

    return io.BufferedReader(
        _compression.DecompressReader(
            raw,
            lzma.LZMADecompressor,
            trailing_error=lzma.LZMAError,
            memlimit=ARCHIVE_XZ_MEMLIMIT_BYTES,
        )
    )


class _Prefixed:
    """A reader that gives ``head`` first, then the rest of ``src`` (magic bytes looked at once)."""

    def __init__(self, head: bytes, src: Any):
        self.head = head
        self.src = src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.src.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.src.read(n if n is not None else -1)


def _read_exactly(src: Any, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= 263 and block[257:262] == b"ustar"


def archive_format(head: bytes) -> str:
    """What the first bytes of an archive are: tar, zip, gzip, bzip2, xz; else ``ArchiveError``."""
    if head.startswith(_MAGIC_7Z) or head.startswith(_MAGIC_RAR):
        raise ArchiveError(UNSUPPORTED_ARCHIVE)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    for kind, (magic, _, _) in _COMPRESSORS.items():
        if head.startswith(magic):
            return kind
    if _is_tar_header(head):
        return "tar"
    raise ArchiveError(UNSUPPORTED_ARCHIVE)


def extract_archive(
    jail: Jail,
    fs: Filesystem,
    src: Any,
    *,
    name: str = "",
    dest: str = "/",
    on_entry: Callable[[str], None] | None = None,
    owner: tuple[int, int] | None = None,
) -> int:
    """Extract the archive read from ``src`` into ``dest`` of ``jail``; returns the entries written.

    ``src`` is a readable binary stream (a response body, an open file); ``name`` is the archive's
    file name, used only to name the output of a single compressed file (``log.txt.gz`` ->
    ``log.txt``). The format is found from the bytes: tar, tar.gz/tgz, tar.bz2, tar.xz, zip, or a
    single .gz/.bz2/.xz file; 7z, rar and anything else are ``ArchiveError("unsupported archive
    format")``. A refused entry (absolute name, "..", a link out of the jail, the egg's denylist,
    a file over the disk limit) stops the extraction with ``ArchiveError`` naming it; what was
    written before it stays. ``on_entry(relpath)`` is called after each entry is written.
    ``owner`` ``(uid, gid)``: what is made is chowned to it (the node's ``system.user``).
    """
    start = src.tell() if _seekable(src) else None
    head = _read_exactly(src, 512)
    kind = archive_format(head)
    target = _Extractor(jail, fs, dest, on_entry, owner)
    if kind == "zip":
        if start is not None:  # zip's directory is at its end: read it in place
            src.seek(start)
            target.zip(src)
        else:
            with tempfile.TemporaryFile() as spool:
                spool.write(head)
                _spool_within_limit(src, spool, fs)
                spool.seek(0)
                target.zip(spool)
    elif kind == "tar":
        target.tar(_Prefixed(head, src))
    else:
        _, opener, suffixes = _COMPRESSORS[kind]
        inner = opener(_Prefixed(head, src))
        try:
            first = _read_exactly(inner, 512)
        except lzma.LZMAError as exc:
            if "memory usage limit" in str(exc).lower():  # liblzma's LZMA_MEMLIMIT_ERROR text
                raise ArchiveError(
                    "refused archive: it needs more than "
                    f"{ARCHIVE_XZ_MEMLIMIT_BYTES >> 20} MiB of memory to decompress"
                ) from None
            raise ArchiveError(f"the archive is damaged: {exc}") from None
        except (OSError, EOFError) as exc:
            raise ArchiveError(f"the archive is damaged: {exc}") from None
        if _is_tar_header(first):
            target.tar(_Prefixed(first, inner))
        else:
            base = posixpath.basename(name.rstrip("/")) or "archive"
            single = next((base[: -len(s)] for s in suffixes if base.endswith(s)), "")
            target.single(single or base + ".out", _Prefixed(first, inner))
    return target.count


# Go's archive/tar (what Wings reads archives with) refuses a PAX header or GNU long name larger
# than 1 MiB (``maxSpecialFileSize``). Python's tarfile reads such a header into memory whole,
# whatever size it declares, and keeps a sparse file's map as a Python list: a few hundred KB of
# gzip can claim gigabytes of memory. Every header block before a member's data is read through
# this budget instead.
ARCHIVE_HEADER_MAX_BYTES = 1 << 20
_SPECIAL_TAR_TYPES = frozenset(
    (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.GNUTYPE_SPARSE,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )
)


class _HeaderBudget:
    """``tarfile``'s stream while it reads one member's header blocks: at most ``left`` bytes."""

    def __init__(self, stream: Any, left: int):
        self.stream, self.left = stream, left
        self.depth = 0  # headers for the same member, nested (long name, then PAX, then ...)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            raise ArchiveError(
                f"refused archive: a header is larger than {ARCHIVE_HEADER_MAX_BYTES} bytes"
            )
        self.left -= n
        return self.stream.read(n)

    def __getattr__(self, name: str) -> Any:  # tell, seek, ... of the real stream
        return getattr(self.stream, name)


class _BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` whose long names, PAX headers and sparse maps share one 1 MiB budget."""

    def _proc_member(self, tar: Any) -> Any:
        if self.type not in _SPECIAL_TAR_TYPES:
            return super()._proc_member(tar)
        if isinstance(tar.fileobj, _HeaderBudget):  # nested: the outer budget counts it
            tar.fileobj.depth += 1  # tarfile recurses once per header: keep far off its limit
            if tar.fileobj.depth > 16:
                raise ArchiveError("refused archive: a member has more than 16 extended headers")
            return super()._proc_member(tar)
        real = tar.fileobj
        tar.fileobj = _HeaderBudget(real, ARCHIVE_HEADER_MAX_BYTES)
        try:
            return super()._proc_member(tar)
        finally:
            tar.fileobj = real


def _spool_within_limit(src: Any, spool: Any, fs: Filesystem) -> None:
    """Copy a zip that arrives as a stream (a transfer, an s3 restore) into ``spool``.

    The spool is the host's temporary directory, not the server's: without a bound, a peer
    could send gigabytes that fill it. It may hold no more than the server has room for --
    what the zip holds must fit there anyway.
    """
    spooled = 0
    while chunk := src.read(ARCHIVE_CHUNK_BYTES):
        spooled += len(chunk)
        if fs.limit_bytes and not fs.has_space(spooled):
            raise ArchiveError(
                f"the zip archive is larger than the server's free disk space ({_NO_SPACE})"
            )
        spool.write(chunk)


def _seekable(src: Any) -> bool:
    try:
        return bool(src.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class _Extractor:
    """Writes checked entries into a jail; every byte booked first (``Filesystem.open_metered``)."""

    def __init__(
        self,
        jail: Jail,
        fs: Filesystem,
        dest: str,
        on_entry: Callable[[str], None] | None,
        owner: tuple[int, int] | None = None,
    ):
        self.jail, self.fs, self.on_entry, self.owner = jail, fs, on_entry, owner
        self.dest = "/".join(Jail.parts(dest))
        self.count = 0
        self.made: set[str] = set()  # directories this extraction has made or found

    # -- names -------------------------------------------------------------------------------

    def path(self, member: str) -> str:
        """The jail path of an archive member; ``ArchiveError`` for absolute names and ``..``."""
        if "\x00" in member:
            raise ArchiveError(f"refused archive entry {member!r}: NUL byte in its name")
        if len(member.encode("utf-8", "surrogateescape")) > ARCHIVE_NAME_MAX_BYTES:
            raise ArchiveError(
                f"refused archive entry {member[:64]!r}...: its name is longer than "
                f"{ARCHIVE_NAME_MAX_BYTES} bytes"
            )
        if member.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", member):
            raise ArchiveError(f"refused archive entry {member!r}: absolute path")
        parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ArchiveError(f"refused archive entry {member!r}: it climbs out with '..'")
        return "/".join([self.dest, *parts]).lstrip("/")

    def _done(self, path: str) -> None:
        if self.owner is not None:
            self.jail.chown(path, *self.owner)  # never follows a link
        self.count += 1
        if self.on_entry is not None:
            self.on_entry(path)

    # -- formats -----------------------------------------------------------------------------

    def tar(self, stream: Any) -> None:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)
            while True:
                member = tar.next()
                if member is None:
                    return
                tar.members = []  # stream mode keeps every header otherwise: memory would grow
                self.entry(member.name, lambda m=member: self._tar_member(tar, m))
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"the archive is damaged: {exc}") from None
        except OSError as exc:  # gzip and bz2 report bad data as OSError
            raise ArchiveError(f"the archive is damaged: {exc}") from None

    def entry(self, member: str, extract: Callable[[], None]) -> None:
        """Run ``extract``; a refusal by the jail or the disk becomes ``ArchiveError``."""
        try:
            extract()
        except PathEscape as exc:
            raise ArchiveError(f"refused archive entry {member!r}: {exc.strerror}") from None
        except PermissionError as exc:
            raise ArchiveError(f"refused archive entry {member!r}: {exc.strerror}") from None
        except OSError as exc:
            raise ArchiveError(f"cannot extract {member!r}: {exc.strerror or exc}") from None

    def _tar_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = self.path(member.name)
        if not path:
            return  # "." or "./": the destination itself
        mode = member.mode & 0o1777
        if member.isdir():
            self.mkdir(path, mode)
        elif member.issym():
            self.symlink(member.linkname, path)
        elif member.islnk():
            self.hardlink(self.path(member.linkname), path)
        elif member.isreg():
            reader = tar.extractfile(member)
            self.file(path, reader, mode, member.mtime, member.size)
        else:
            LOG.debug("archive: skipped %s (device file or FIFO)", member.name)

    def zip(self, fileobj: Any) -> None:
        try:
            archive = zipfile.ZipFile(fileobj)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(f"the archive is damaged: {exc}") from None
        with archive:
            infos = archive.infolist()
            declared = sum(i.file_size for i in infos)
            if self.fs.limit_bytes and not self.fs.has_space(declared):
                raise ArchiveError(
                    f"the archive holds {declared} bytes; there is not enough disk space for them"
                )
            for info in infos:
                try:
                    self.entry(info.filename, lambda i=info: self._zip_member(archive, i))
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise ArchiveError(
                        f"the archive is damaged at {info.filename!r}: {exc}"
                    ) from None
                except RuntimeError as exc:  # an encrypted member
                    raise ArchiveError(f"cannot extract {info.filename!r}: {exc}") from None

    def _zip_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        path = self.path(info.filename)
        if not path:
            return
        unix_mode = info.external_attr >> 16
        kind = stat.S_IFMT(unix_mode)
        if info.is_dir() or kind == stat.S_IFDIR:
            self.mkdir(path, stat.S_IMODE(unix_mode) or 0o755)
        elif kind == stat.S_IFLNK:
            with archive.open(info) as reader:
                target = reader.read(4096).decode("utf-8", "surrogateescape")
            self.symlink(target, path)
        elif kind in (0, stat.S_IFREG):
            mtime = time.mktime((*info.date_time, 0, 0, -1))
            with archive.open(info) as reader:
                self.file(path, reader, stat.S_IMODE(unix_mode) or 0o644, mtime, info.file_size)
        else:
            LOG.debug("archive: skipped %s (device file or FIFO)", info.filename)

    def single(self, name: str, reader: Any) -> None:
        path = self.path(name)
        self.entry(name, lambda: self.file(path, reader, 0o644, time.time()))

    # -- writing -----------------------------------------------------------------------------

    def _parents(self, path: str) -> None:
        # Each directory is made (or found) once per extraction: walking every prefix of every
        # entry from the root cost depth**2 opens per entry -- seconds for one deep name.
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix not in self.made:
                self._mkdir_one(prefix, 0o755)
                self.made.add(prefix)

    def _mkdir_one(self, path: str, mode: int) -> bool:
        try:
            self.jail.mkdir(path, mode)
            if self.owner is not None:
                self.jail.chown(path, *self.owner)
            return True
        except FileExistsError:
            if not stat.S_ISDIR(self.jail.stat(path).st_mode):
                raise ArchiveError(f"cannot extract into {path!r}: it is not a directory") from None
            return False

    def mkdir(self, path: str, mode: int) -> None:
        self._parents(path)
        if self._mkdir_one(path, mode):
            self.jail.chmod(path, mode | 0o700)  # the daemon must be able to fill it
        self._done(path)

    def _clear(self, path: str) -> None:
        """Remove the file or link (never a directory) at ``path``, giving its bytes back."""
        try:
            st = self.jail.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"cannot extract {path!r}: a directory of that name exists")
        self.fs.remove(self.jail, path)

    def symlink(self, target: str, path: str) -> None:
        self._parents(path)
        self._clear(path)
        try:
            self.jail.symlink(target, path)
        except PathEscape:
            raise ArchiveError(
                f"refused archive entry {path!r}: a link to {target!r} would point outside"
            ) from None
        self._done(path)

    def hardlink(self, source: str, path: str) -> None:
        st = self.jail.lstat(source)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"refused archive entry {path!r}: a hard link to a non-file")
        self._parents(path)
        self._clear(path)
        if not self.fs.reserve(st.st_size):  # the usage walk counts every link's apparent size
            raise ArchiveError(_NO_SPACE)
        with self.jail.resolve(source, follow=False) as a, self.jail.resolve(path, False) as b:
            os.link(a.name, b.name, src_dir_fd=a.dir_fd, dst_dir_fd=b.dir_fd, follow_symlinks=False)
        self._done(path)

    def file(self, path: str, reader: Any, mode: int, mtime: float, size: int = 0) -> None:
        """Write one file: its declared ``size`` booked before the first byte, the rest as read.

        Every byte is booked for this file (``Filesystem.open_metered``), so removing it later
        gives back exactly what it cost.
        """
        self._parents(path)
        self._clear(path)
        refused = f"cannot extract {path!r} ({size} bytes): {_NO_SPACE}"
        if self.fs.limit_bytes and size > self.fs.limit_bytes:
            raise ArchiveError(refused)
        handle = self.fs.open_metered(self.jail, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._prebook(handle, size, refused)
            written = metered_copy(reader, handle)
            if written < size:
                handle.truncate(written)  # gives back what the declared size booked beyond it
            os.fchmod(handle.fileno(), mode & 0o1777)
            # A PAX mtime may be any decimal ("inf", "nan", 1e30): one the kernel cannot hold is
            # left as now, as GNU tar does with a warning, rather than failing the archive.
            with contextlib.suppress(ValueError, OverflowError):
                os.utime(handle.fileno(), (mtime, mtime))
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                self.fs.remove(self.jail, path)
            raise
        handle.close()
        LOG.debug("archive: wrote %s (%d bytes)", path, written)
        self._done(path)

    def _prebook(self, handle: MeteredFile, size: int, refused: str) -> None:
        """Book the declared size before the first byte: the file is set to it (sparse), so a
        write within it books nothing more. Without a limit there is nothing to refuse."""
        if not size or not self.fs.limit_bytes:
            return
        try:
            handle.truncate(size)
        except DiskLimitExceeded:
            raise ArchiveError(refused) from None


_NO_SPACE = "There is not enough disk space available to perform that action."


def metered_copy(reader: Any, handle: MeteredFile) -> int:
    """Copy ``reader`` into the metered file from its start; returns the bytes written.

    ``MeteredFile`` books every byte the file grows by before it is written; a chunk that would
    pass the disk limit raises ``ArchiveError`` and is not written (what was written stays
    booked, for the file it belongs to).
    """
    total = 0
    while True:
        chunk = reader.read(ARCHIVE_CHUNK_BYTES)
        if not chunk:
            return total
        try:
            handle.pwrite(chunk, total)
        except DiskLimitExceeded:
            raise ArchiveError(_NO_SPACE) from None
        total += len(chunk)


# egg configuration files ##########################################################################
#
# Every egg names files the node rewrites before each start (``process_configuration.configs``):
# that is how an allocation change reaches the game (``server-port`` in server.properties,
# ``listeners[0].host`` in BungeeCord's config.yml). The Panel has already put its own values in
# (``{{server.*}}``, ``{{env.*}}``); the node fills ``{{config.*}}`` from its own config. Wings
# v1.11 does this in parser/parser.go, parser/helpers.go and server/config_parser.go; where Wings
# rewrites a whole file (dropping comments and order) or has a known slip, wingslite edits the
# lines it must and keeps the rest, and says so next to the code.
#
#   parser       what a ``match`` names                      kept as it was
#   file         lines starting with ``match``               every other line
#   properties   a Java properties key                       comments, order, other lines
#   ini          ``section.key`` (or ``key`` before any      comments, order, other lines
#                section)
#   yaml / yml   a dotted path with ``[n]`` and ``*``        comments and layout (unless a key
#                                                            must be created)
#   json         a dotted path with ``[n]`` and ``*``        key order, indent width
#   xml          ``Root.child.child`` (``*`` allowed)        comments, prolog

CONFIG_FILE_MAX_BYTES = 4 * 1024 * 1024  # an egg config file larger than this is left alone

_CONFIG_PLACEHOLDER = re.compile(r"{{\s?config\.([\w.-]+)\s?}}")  # Wings parser/helpers.go
_XML_ATTRIBUTE_VALUE = re.compile(r"^\[(\w+)='(.*)'\]$")  # ``[value='x']`` sets an attribute
_PATH_INDEX = re.compile(r"\[(\d+)\]")


class ConfigFileSkipped(Exception):
    """A config file that was not rewritten; the message is shown on the server's console."""


def replacement_text(value: Any) -> str:
    """How a ``replace_with`` JSON value is written into a text file (properties, ini, xml)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _go_replacement(template: str) -> str:
    """A Go ``regexp.ReplaceAllString`` template (``$1``, ``${name}``, ``$$``) for ``re.sub``."""
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "\\":
            out.append("\\\\")
        elif ch == "$" and template[i + 1 : i + 2] == "$":
            out.append("$")
            i += 1
        elif ch == "$":
            m = re.match(r"\$(?:\{(\w+)\}|(\w+))", template[i:])
            if m is None:
                out.append("$")
            else:
                out.append(f"\\g<{m.group(1) or m.group(2)}>")
                i += m.end() - 1
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def conditional_value(current: str | None, if_value: str | None, value: str) -> str | None:
    """The text to write for a replacement given the value now in the file; None to leave it.

    No ``if_value``: always ``value``. ``regex:<re>``: when the current value matches, every match
    replaced by ``value`` (``$1`` groups as in Go). Otherwise: only when the current value equals
    ``if_value``. A missing key never matches a condition. (Wings v1.11 inverts the regex check
    for yaml/json and compares the literal against the whole document; this is what eggs expect.)
    """
    if if_value is None or if_value == "":
        return value
    if current is None:
        return None
    if if_value.startswith("regex:"):
        try:
            pattern = re.compile(if_value[6:])
        except re.error as exc:
            raise ConfigFileSkipped(f"if_value {if_value!r} is not a valid regex: {exc}") from None
        if not pattern.search(current):
            return None
        return pattern.sub(_go_replacement(value), current)
    return value if current == if_value else None


class NodePlaceholders:
    """``{{config.*}}`` placeholders filled from the node's own config (Wings parser/helpers.go).

    Path components are snake-cased (``{{config.docker.networkInterface}}`` reads
    ``docker.network_interface``); ``{{config.docker.interface}}`` is the Panel's legacy spelling
    of ``docker.network.interface``. An unknown placeholder is left as it is and logged once.
    """

    def __init__(self, config: Config):
        tree: dict[str, Any] = {}
        for key, _kind, _default in _CONFIG_SCHEMA:
            node = tree
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = config.get(key)
        self._tree = _deep_merge(tree, config.raw)
        self._warned: set[str] = set()

    def lookup(self, path: str) -> str | None:
        parts = [_snake_case(p) for p in path.split(".")]
        value = _dig_plain(self._tree, parts)
        if value is None and parts == ["docker", "interface"]:
            value = _dig_plain(self._tree, ["docker", "network", "interface"])
        if value is None:
            return None
        return value if isinstance(value, str) else replacement_text(value)

    def fill(self, value: Any) -> Any:
        """``value`` with every known ``{{config.*}}`` replaced; non-strings pass unchanged."""
        if not isinstance(value, str) or "{{" not in value:
            return value

        def one(m: re.Match[str]) -> str:
            found = self.lookup(m.group(1))
            if found is None:
                if m.group(1) not in self._warned:
                    self._warned.add(m.group(1))
                    LOG.warning("config file placeholder %s is not a node config key", m.group(0))
                return m.group(0)
            return found

        return _CONFIG_PLACEHOLDER.sub(one, value)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).replace("-", "_").lower()


def _dig_plain(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- text parsers: file, properties, ini ---------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    """Lines with their endings kept, so untouched lines come back byte for byte."""
    return text.splitlines(keepends=True)


def _ending(line: str, default: str = "\n") -> str:
    stripped = line.rstrip("\r\n")
    return line[len(stripped) :] or default


def _file_ending(lines: list[str]) -> str:
    return next((_ending(line) for line in lines if line.endswith("\n")), "\n")


def rewrite_plain_file(text: str, replaces: list[Replacement]) -> str:
    """The ``file`` parser: a line that starts with ``match`` becomes ``replace_with`` entirely.

    The first replacement that matches a line wins (Wings writes every match, glued together).
    """
    out = []
    for line in _split_lines(text):
        body = line.rstrip("\r\n")
        for r in replaces:
            if r.match and body.startswith(r.match):
                line = replacement_text(r.replace_with) + line[len(body) :]
                break
        out.append(line)
    return "".join(out)


def _properties_unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 >= len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
            continue
        out.append({"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(nxt, nxt))
        i += 2
    return "".join(out)


def properties_escape(text: str, is_key: bool = False) -> str:
    """Escape as Java's ``Properties.store`` does: ``\\``, ``= : # !``, controls, non-ASCII.

    Non-ASCII as ``\\uXXXX`` as Wings does too: ``§`` in a motd reaches Minecraft intact.
    """
    out = []
    for i, ch in enumerate(text):
        if ch == " " and (is_key or i == 0):
            out.append("\\ ")
        elif ch in "\\=:#!":
            out.append("\\" + ch)
        elif ch in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[ch])
        elif ord(ch) < 0x20 or ord(ch) > 0x7E:
            out.append("".join(f"\\u{u:04X}" for u in _utf16_units(ch)))
        else:
            out.append(ch)
    return "".join(out)


def _utf16_units(ch: str) -> list[int]:
    raw = ch.encode("utf-16-be")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def _properties_entries(lines: list[str]) -> list[tuple[int, int, str, str]]:
    """``(first line, last line, key, value)`` of each logical line (continuations joined)."""
    entries, i = [], 0
    while i < len(lines):
        start, pieces = i, [lines[i].rstrip("\r\n").lstrip(" \t\f")]
        # Joined once at the end: adding to a string per continuation line was quadratic, and a
        # user's 4 MiB of "a\\" lines held a start for hours. The backslashes before the last
        # one of a piece are even in number, so the last piece alone says whether it goes on.
        while _continues(pieces[-1]) and i + 1 < len(lines):
            i += 1
            pieces[-1] = pieces[-1][:-1]
            pieces.append(lines[i].rstrip("\r\n").lstrip(" \t\f"))
        logical = "".join(pieces)
        i += 1
        if not logical or logical[0] in "#!":
            continue
        m = re.match(r"((?:\\.|[^\\=:\s])*)\s*[=:]?\s*", logical)
        assert m is not None  # the pattern matches any string
        entries.append(
            (
                start,
                i - 1,
                _properties_unescape(m.group(1)),
                _properties_unescape(logical[m.end() :]),
            )
        )
    return entries


def _continues(line: str) -> bool:
    """A line ending in an odd number of backslashes continues on the next one."""
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def rewrite_properties(text: str, replaces: list[Replacement]) -> str:
    """Java properties: set each ``match`` key, keep every other line, add missing keys at the end.

    (Wings rewrites the file from its parsed keys: comments below the first key are lost.)
    """
    lines = _split_lines(text)
    ending = _file_ending(lines)
    entries = _properties_entries(lines)
    appended: list[str] = []
    for r in replaces:
        value = replacement_text(r.replace_with)
        found = [e for e in entries if e[2] == r.match]
        if not found:
            if conditional_value(None, r.if_value, value) is not None:
                appended.append(f"{properties_escape(r.match, True)}={properties_escape(value)}")
            continue
        for first, last, key, current in found:
            new = conditional_value(current, r.if_value, value)
            if new is None or (new == current and first == last):
                continue
            lines[first] = f"{properties_escape(key, True)}={properties_escape(new)}" + _ending(
                lines[last], ending
            )
            for k in range(first + 1, last + 1):
                lines[k] = ""
    if appended:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += ending
        lines.extend(line + ending for line in appended)
    return "".join(lines)


_INI_SECTION = re.compile(r"^\s*\[([^\]]*)\]")
_INI_KEY = re.compile(r"^(\s*)([^=:;#\[\s][^=:]*?)(\s*[=:]\s*)(.*?)(\s*)$")


def _ini_path(match: str) -> tuple[str, str]:
    """``section.key`` -> (section, key); the first dot outside brackets splits (Wings)."""
    depth = 0
    for i, ch in enumerate(match):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "." and depth == 0:
            return match[:i], match[i + 1 :]
    return "", match


def _ini_unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
        return value[1:-1]
    return value


def rewrite_ini(text: str, replaces: list[Replacement]) -> str:
    """INI: set ``section.key`` (or a key before any section); keep comments and order.

    A missing key is added at the end of its section, a missing section at the end of the file.
    """
    lines = _split_lines(text)
    ending = _file_ending(lines)
    for r in replaces:
        section, key = _ini_path(r.match)
        value = replacement_text(r.replace_with)
        if not _ini_set(lines, section, key, r.if_value, value):
            if conditional_value(None, r.if_value, value) is not None:
                _ini_add(lines, section, f"{key}={value}", ending)
    return "".join(lines)


def _ini_sections(lines: list[str]) -> Iterator[tuple[str, int, str]]:
    """``(section, line index, line)`` for every line, section '' before the first header."""
    section = ""
    for i, line in enumerate(lines):
        m = _INI_SECTION.match(line)
        if m:
            section = m.group(1).strip()
        yield section, i, line


def _ini_set(lines: list[str], section: str, key: str, if_value: str | None, value: str) -> bool:
    found = False
    for sec, i, line in _ini_sections(lines):
        m = _INI_KEY.match(line.rstrip("\r\n"))
        if sec != section or m is None or m.group(2) != key or _INI_SECTION.match(line):
            continue
        found = True
        new = conditional_value(_ini_unquote(m.group(4)), if_value, value)
        if new is not None:
            lines[i] = m.group(1) + m.group(2) + m.group(3) + new + _ending(line)
    return found


def _ini_add(lines: list[str], section: str, entry: str, ending: str) -> None:
    last_of_section = None
    for sec, i, line in _ini_sections(lines):
        if sec == section and (line.strip() and not line.lstrip().startswith((";", "#"))):
            last_of_section = i
    if last_of_section is None and section == "":
        last_of_section = -1  # before the first header
    if last_of_section is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += ending
        lines.extend([f"[{section}]" + ending, entry + ending])
        return
    if 0 <= last_of_section and not lines[last_of_section].endswith("\n"):
        lines[last_of_section] += ending
    lines.insert(last_of_section + 1, entry + ending)


# -- structured parsers: json, yaml, xml ---------------------------------------------------------


def _path_steps(path: str) -> list[str | int]:
    """``listeners[0].host`` -> ["listeners", 0, "host"]; ``servers.*.address`` keeps ``*``."""
    steps: list[str | int] = []
    for part in path.split("."):
        name = part.split("[", 1)[0]
        if name:
            steps.append(name)
        steps.extend(int(n) for n in _PATH_INDEX.findall(part[len(name) :]))
    return steps


def _typed(new: str, original: Any, current: Any, exists: bool) -> Any:
    """The JSON value to store for the text ``new``.

    A ``replace_with`` that is not a string keeps its own type. A string takes the type of the
    value it replaces (a port that was a number stays a number); for a key that is created, a
    whole number becomes a number as Wings does, since the Panel sends every placeholder it
    filled as a string (``"25565"``).
    """
    if not isinstance(original, str) and new == replacement_text(original):
        return original
    if exists and isinstance(current, str):
        return new
    if exists and isinstance(current, bool):
        return {"true": True, "false": False}.get(new, new)
    if re.fullmatch(r"[+-]?\d{1,18}", new):
        return int(new)
    if exists and isinstance(current, float):
        with contextlib.suppress(ValueError):
            return float(new)
    return new


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, (dict, list)):
        return None
    return replacement_text(value)


def set_structured(data: Any, replaces: list[Replacement]) -> tuple[Any, list[tuple]]:
    """Apply replacements to parsed JSON/YAML data; returns it and the paths that changed.

    Each change is ``(steps, created)``: ``created`` when a key or list item had to be made.
    """
    changes: list[tuple] = []
    for r in replaces:
        value = replacement_text(r.replace_with) if r.if_value else r.replace_with
        for steps in _expand(data, _path_steps(r.match)):
            data = _set_path(data, steps, r, value, changes)
    return data, changes


def _expand(data: Any, steps: list[str | int]) -> Iterator[list[str | int]]:
    """Concrete paths for ``steps``: each ``*`` becomes every existing key or index there."""
    if "*" not in steps:
        yield steps
        return
    at = steps.index("*")
    node: Any = data
    for step in steps[:at]:
        node = _child(node, step)
        if node is _MISSING:
            return
    keys = (
        range(len(node)) if isinstance(node, list) else list(node) if isinstance(node, dict) else ()
    )
    for key in keys:
        yield from _expand(data, [*steps[:at], key, *steps[at + 1 :]])


_MISSING = object()


def _child(node: Any, step: str | int) -> Any:
    if isinstance(node, dict):
        if step in node:
            return node[step]
        return next((v for k, v in node.items() if str(k) == str(step)), _MISSING)
    if isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
        return node[step]
    return _MISSING


def _set_path(data: Any, steps: list, r: Replacement, value: Any, changes: list) -> Any:
    if not steps:
        return data
    root = data if isinstance(data, (dict, list)) else {}
    node, created = root, False
    for i, step in enumerate(steps[:-1]):
        nxt = _child(node, step)
        if nxt is _MISSING or not isinstance(nxt, (dict, list)):
            if r.if_value:
                return root  # a condition needs an existing value
            nxt = [] if isinstance(steps[i + 1], int) else {}
            if not _put(node, step, nxt):
                return root
            created = True
        node = nxt
    current = _child(node, steps[-1])
    exists = current is not _MISSING
    text = value if isinstance(value, str) else replacement_text(value)
    if r.if_value:
        text = conditional_value(_scalar_text(current) if exists else None, r.if_value, text)
        if text is None:
            return root
    new = _typed(text, r.replace_with if not r.if_value else text, current, exists)
    if exists and type(current) is type(new) and current == new:
        return root
    if _put(node, steps[-1], new):
        changes.append((steps, created or not exists))
    return root


def _put(node: Any, step: str | int, value: Any) -> bool:
    if isinstance(node, dict):
        key = next((k for k in node if str(k) == str(step)), step)
        node[key] = value
        return True
    if isinstance(node, list) and isinstance(step, int):
        if step < len(node):
            node[step] = value
            return True
        if step == len(node):
            node.append(value)
            return True
    return False


def rewrite_json(text: str, replaces: list[Replacement]) -> str:
    """JSON: dotted paths with ``[n]`` and ``*``; key order and the indent width are kept."""
    data = json.loads(text) if text.strip() else {}
    data, changes = set_structured(data, replaces)
    if not changes:
        return text
    m = re.search(r"\n([ \t]+)\S", text)
    indent = m.group(1) if m else "    "
    out = json.dumps(data, indent=indent, ensure_ascii=False)
    return out + ("\n" if text.endswith("\n") or not text else "")


def rewrite_yaml(text: str, replaces: list[Replacement]) -> str:
    """YAML: as JSON, and each changed scalar is spliced into the original text in place, so
    comments and layout survive. Only when a key must be created is the document dumped anew
    (as Wings always does, losing comments).
    """
    data = yaml.load(text, Loader=_YAML_LOADER) if text.strip() else {}
    _refuse_alias_bombs(data)
    data, changes = set_structured(data if data is not None else {}, replaces)
    if not changes:
        return text
    if not any(created for _steps, created in changes):
        spliced = _yaml_splice(text, data, [steps for steps, _c in changes])
        if spliced is not None:
            return spliced
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


YAML_MAX_ALIAS_NODES = 1_000_000
# The pure-Python safe loader, on purpose: libyaml's (CSafeLoader) recurses in C once per
# nesting level and crashes the whole daemon (SIGSEGV) on "[[[[..." or "- - - -..." a user wrote,
# where this one raises RecursionError. Its cost (~10 s per MiB) is why yaml files are capped at
# YAML_MAX_BYTES.
_YAML_LOADER = yaml.SafeLoader
YAML_MAX_BYTES = 1024 * 1024


def _refuse_alias_bombs(data: Any) -> None:
    """``ValueError`` when aliases make ``data`` more than a million nodes larger than its text.

    safe_load shares an aliased node instead of copying it, so ten lines of ``&a [*b, *b, ...]``
    load at once -- and then expand to billions of nodes in every walk, compare or dump. A user
    writes this file; it is read before every start. go-yaml (Wings) refuses "excessive aliasing"
    likewise. An alias to an enclosing node (a cycle) is refused too.
    """
    expanded: dict[int, int] = {}  # id -> nodes under it, counting every alias in full
    visited = [0]  # nodes actually walked: the document's own size

    def count(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            visited[0] += 1
            return 1
        key = id(node)
        if key in expanded:
            if expanded[key] < 0:
                raise ValueError("an alias refers to a node that encloses it")
            return expanded[key]
        visited[0] += 1
        expanded[key] = -1
        items = node.values() if isinstance(node, dict) else node
        total = 1 + sum(count(item) for item in items)
        if total - visited[0] > YAML_MAX_ALIAS_NODES:
            raise ValueError(f"its aliases expand to more than {YAML_MAX_ALIAS_NODES} nodes")
        expanded[key] = total
        return total

    count(data)


def _yaml_splice(text: str, after: Any, paths: list[list]) -> str | None:
    """Replace the changed scalars' text in place; None when that cannot be done exactly."""
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError:
        return None
    edits: dict[int, tuple[int, str]] = {}
    for steps in paths:
        node = root
        for step in steps:
            node = _yaml_child(node, step)
            if node is None:
                return None
        value = _dig_steps(after, steps)
        if not isinstance(node, yaml.ScalarNode) or isinstance(value, (dict, list)):
            return None
        style = node.style if isinstance(value, str) and node.style in ("'", '"') else None
        dumped = yaml.safe_dump(value, default_style=style, allow_unicode=True, width=1 << 30)
        dumped = dumped.removesuffix("\n...\n").rstrip("\n")
        if "\n" in dumped:
            return None
        edits[node.start_mark.index] = (node.end_mark.index, dumped)
    out = text
    for start in sorted(edits, reverse=True):
        end, dumped = edits[start]
        out = out[:start] + dumped + out[end:]
    try:
        if yaml.load(out, Loader=_YAML_LOADER) != after:
            return None
    except yaml.YAMLError:
        return None
    return out


def _yaml_child(node: Any, step: str | int) -> Any:
    if isinstance(node, yaml.MappingNode):
        found = [
            v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(step)
        ]
        return found[-1] if found else None
    if isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
        return node.value[step]
    return None


def _dig_steps(data: Any, steps: list) -> Any:
    for step in steps:
        data = _child(data, step)
    return data


def rewrite_xml(text: str, replaces: list[Replacement]) -> str:
    """XML: ``Root.child.child`` names elements (``*`` allowed); a value ``[name='x']`` sets an
    attribute. Comments and the prolog (declaration, doctype) are kept; missing elements are
    created (Wings parser.go) and only then is the document re-indented (two spaces, as Wings).
    """
    import xml.etree.ElementTree as ET  # only servers with xml configs load it

    start = re.search(r"<(?![?!])", text)
    prolog = text[: start.start()] if start else ""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True, insert_pis=True))
    root = ET.fromstring(text[start.start() :], parser=parser) if start else None
    created = changed = False
    for r in replaces:
        parts = r.match.split(".")
        if root is None:
            root = ET.Element(parts[0])
            created = changed = True
        if root.tag != parts[0]:
            continue
        if "*" not in r.match and not r.if_value:
            created |= _xml_make_path(root, parts[1:])
        value = replacement_text(r.replace_with)
        targets = root.findall("./" + "/".join(parts[1:])) if parts[1:] else [root]
        for element in targets:
            changed |= _xml_set(element, r.if_value, value)
    if not changed:
        return text
    if created:
        ET.indent(root, "  ")
    body = ET.tostring(root, encoding="unicode")
    return prolog + body + ("\n" if text.endswith("\n") or not text else "")


def _xml_make_path(root: Any, tags: list[str]) -> bool:
    import xml.etree.ElementTree as ET

    element, created = root, False
    for tag in tags:
        if not re.fullmatch(r"[\w.-]+", tag):
            return created  # a predicate or wildcard: only existing elements are changed
        child = element.find(tag)
        if child is None:
            child = ET.SubElement(element, tag)
            created = True
        element = child
    return created


def _xml_set(element: Any, if_value: str | None, value: str) -> bool:
    attribute = _XML_ATTRIBUTE_VALUE.match(value)
    if attribute:
        name, new = attribute.group(1), attribute.group(2)
        current = element.get(name)
        new = conditional_value(current, if_value, new)
        if new is None or current == new:
            return False
        element.set(name, new)
        return True
    current = (element.text or "").strip()
    new = conditional_value(current, if_value, value)
    if new is None or element.text == new:
        return False
    element.text = new
    return True


CONFIG_PARSERS: dict[str, Callable[[str, list[Replacement]], str]] = {
    "file": rewrite_plain_file,
    "properties": rewrite_properties,
    "ini": rewrite_ini,
    "json": rewrite_json,
    "yaml": rewrite_yaml,
    "yml": rewrite_yaml,
    "xml": rewrite_xml,
}


# -- writing them into a server's directory ------------------------------------------------------


class ConfigFileWriter:
    """Rewrites a server's egg config files inside its directory, before each start.

    Methods for the caller: ``apply(configs, say)`` -> the names of the files that failed.
    Class variables that may be overridden: ``max_bytes``.

    Every file is reached through the server's ``Jail`` (a symlink that leads out is refused, a
    FIFO or device is never opened for reading or writing), read up to ``max_bytes``, rewritten
    in memory, and written back atomically (a temp file beside it, fsynced, renamed over it) with
    its mode and owner kept; a new file gets ``owner``. The new bytes are booked for the new file
    (a ``MeteredFile``) with the old file's bytes credited meanwhile, so a rewrite costs only its
    growth and removing the file later gives back what it cost. A file that does not exist is
    created with only the replaced keys, as Wings does.
    """

    max_bytes = CONFIG_FILE_MAX_BYTES

    def __init__(
        self,
        jail: Jail,
        placeholders: NodePlaceholders,
        fs: Filesystem,
        owner: tuple[int, int] | None = None,
    ):
        self.jail, self.placeholders, self.fs, self.owner = jail, placeholders, fs, owner

    def apply(self, configs: Iterable[ConfigFile], say: Callable[[str], None]) -> list[str]:
        failed = []
        for cf in configs:
            try:
                self.rewrite(cf)
            except (ConfigFileSkipped, OSError, ValueError, yaml.YAMLError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                say(f"Failed to update configuration file {cf.file}: {why}")
                LOG.warning("config file %s (%s parser) not updated: %s", cf.file, cf.parser, why)
                failed.append(cf.file)
        return failed

    def rewrite(self, cf: ConfigFile) -> bool:
        """Rewrite one file; True when its bytes changed."""
        parse = CONFIG_PARSERS.get(cf.parser)
        if parse is None:
            raise ConfigFileSkipped(f"unknown parser {cf.parser!r}")
        replaces = [
            dataclasses.replace(r, replace_with=self.placeholders.fill(r.replace_with))
            for r in cf.replace
        ]
        self._make_parents(cf.file)
        with self.jail.resolve(cf.file) as where:
            if where.name is None:
                raise ConfigFileSkipped("the path names the server's directory itself")
            limit = YAML_MAX_BYTES if cf.parser in ("yaml", "yml") else self.max_bytes
            old, st = self._read(where, min(limit, self.max_bytes))
            text = old.decode("utf-8-sig", errors="surrogateescape")
            try:
                new = parse(text, replaces).encode("utf-8", errors="surrogateescape")
            except (ValueError, SyntaxError, yaml.YAMLError) as exc:
                raise ConfigFileSkipped(f"cannot be parsed as {cf.parser}: {exc}") from None
            except RecursionError:  # the parsers recurse once per level: "[[[[..." of 4 MiB
                raise ConfigFileSkipped(
                    f"cannot be parsed as {cf.parser}: it is nested too deeply"
                ) from None
            if new == old and st is not None:
                return False
            self._replace(where, new, st)
            return True

    def _make_parents(self, path: str) -> None:
        parts = Jail.parts(path)
        for i in range(1, len(parts)):
            try:
                self.jail.mkdir("/".join(parts[:i]))
            except FileExistsError:
                continue
            if self.owner is not None:
                self.jail.chown("/".join(parts[:i]), *self.owner)

    def _read(self, where: _Where, max_bytes: int) -> tuple[bytes, os.stat_result | None]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(where.name, flags, dir_fd=where.dir_fd)
        except FileNotFoundError:
            return b"", None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigFileSkipped("it is a symlink that leads outside") from None
            raise
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigFileSkipped("it is not a regular file")
            if st.st_size > max_bytes:
                raise ConfigFileSkipped(f"it is larger than {max_bytes / 1048576:g} MiB")
            data = fh.read(max_bytes + 1)
            if len(data) > max_bytes:  # it grew while we read it
                raise ConfigFileSkipped(f"it is larger than {max_bytes / 1048576:g} MiB")
            return data, st

    def _replace(self, where: _Where, data: bytes, st: os.stat_result | None) -> None:
        """``_write`` with the old file's bytes credited meanwhile (a rewrite costs its growth);
        only the first of parallel rewrites of one file may credit them."""
        path = "/" + where.relpath
        claimed = st is not None and self.fs.claim_replacement(path)
        credit = st.st_size if claimed and st is not None and st.st_nlink <= 1 else 0
        self.fs.add_usage(-credit)
        try:
            self._write(where, data, st)
        finally:
            self.fs.add_usage(credit)
            if claimed:
                self.fs.release_replacement(path)

    def _write(self, where: _Where, data: bytes, st: os.stat_result | None) -> None:
        tmp = f".{where.name}.{uuidlib.uuid4().hex[:12]}.wingslite"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=where.dir_fd,
        )
        # Opened by dir_fd (the directory resolved once, beneath the jail), metered as
        # ``Filesystem.open_metered`` would: the bytes are booked for this file.
        handle = MeteredFile(self.fs, fd, name=tmp)
        try:
            try:
                handle.write(data)
            except DiskLimitExceeded:
                raise ConfigFileSkipped("there is not enough disk space") from None
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            owner = (st.st_uid, st.st_gid) if st is not None else self.owner
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
            handle.close()
            old = self._lstat(where)
            os.rename(tmp, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                gone = os.stat(tmp, dir_fd=where.dir_fd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=where.dir_fd)
                self.fs.release(gone)
            raise
        self.fs.release(old)  # what the figure counts for the file it replaced

    @staticmethod
    def _lstat(where: _Where) -> os.stat_result | None:
        try:
            return os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None


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
                "resource limits: no container exists; they apply when it is created at the next "
                "start"
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
        """Do the slow part of a coming start (e.g. fetch the image) without holding the power
        lock."""
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
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run the egg's install ``script`` against the server's files; its exit code.

        ``cancelled()`` true (a suspension or a delete came first) stops it before anything runs.
        """
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
                    f"the cgroup of container {container_id[:12]} is not at {root / rel} (cgroup "
                    f"v2, {driver} driver)"
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
                f"the cgroup of container {container_id[:12]} is not at {dirs['memory']} (cgroup "
                f"v1, {driver} driver)"
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
    """systemd nests ``a-b.slice`` inside ``a.slice``: ``a-b-c.slice`` ->
    ``a.slice/a-b.slice/a-b-c.slice``."""
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
    """The Docker SDK, imported on first use (embedders without Docker do not pay for it)."""
    if "docker" not in sys.modules:
        # The SDK imports its ssh:// transport, and with it paramiko and cryptography (~35 MB),
        # whenever paramiko is installed (docker/transport/__init__.py); a node talks to its
        # own engine over a unix socket or TCP. A None entry in sys.modules makes that import
        # fail as it does when paramiko is missing, so SFTP alone decides when paramiko loads.
        sys.modules.setdefault("docker.transport.sshconn", None)  # type: ignore[arg-type]
    import docker

    return docker


def _docker_ssh_transport(docker: Any) -> None:
    """Import the SDK's ssh:// transport that ``_docker()`` held back, for an engine reached
    over ssh (it needs paramiko)."""
    if sys.modules.get("docker.transport.sshconn", False) is None:
        del sys.modules["docker.transport.sshconn"]
        from docker.transport.sshconn import SSHHTTPAdapter

        docker.api.client.SSHHTTPAdapter = SSHHTTPAdapter


def docker_client(config: Config) -> Any:
    """A low-level Docker API client for ``wingslite.docker_url`` (else ``DOCKER_HOST``, else
    the socket).

    No engine is contacted here: the API version is fixed (1.41, Docker 20.10, understood by every
    later engine), so a daemon starts while the engine is still down.
    """
    docker = _docker()
    kwargs = docker.utils.kwargs_from_env()
    if config.get("wingslite.docker_url"):
        kwargs["base_url"] = config.get("wingslite.docker_url")
    if str(kwargs.get("base_url", "")).startswith("ssh://"):
        _docker_ssh_transport(docker)
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
        # Set by destroy(): a start that was making the container then makes nothing more.
        self._destroyed = False

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
        """``(exit code, killed by the OOM killer)`` of the last exit; a missing container is (1,
        False)."""
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
        """Make the running container's limits match ``config.build`` now (README, "The sync,
        step by step").

        The steps: find the running container; ``POST /containers/{id}/update`` with what Docker's
        update API can express (raw, so that ``PidsLimit`` goes too, which the SDK lacks); lift in
        the cgroup files what it cannot (a memory, swap or CPU limit, a cpuset); read the kernel's
        files back and report what they do not show as failed. A stopped container is left alone:
        the next start re-creates it with the new limits.
        """
        for _ in range(3):
            try:
                return self._apply_limits_once(config)
            except _ContainerReplaced:  # replaced behind our back: look it up again
                self._running_info = None
        return LimitReport(pending=[f"{_ALL_LIMITS} (container being replaced; next start)"])

    def _apply_limits_once(self, config: ServerConfig) -> LimitReport:
        build = config.build
        resources = container_resources(build, self.config)
        try:
            info = self._limits_target()
            blkio_unsupported = self._post_limits(info, build, resources)
            cgroup, kernel = self._lift_in_cgroup(info, build, resources)
        except _LimitsSettled as settled:
            return settled.report
        report = _kernel_report(cgroup, kernel, build, resources)
        if blkio_unsupported:
            report.applied.append(
                f"io weight {build.io_weight}: not supported by this kernel, skipped"
            )
        else:
            report.applied.append(f"io weight {build.io_weight}")
        return report

    def _limits_target(self) -> dict[str, Any]:
        """The running container (its inspect), or ``_LimitsSettled``: the next start applies
        them."""
        # The container this environment started or attached to: no inspect on the sync's path.
        info = self._running_info if self._state in (STARTING, RUNNING) else None
        try:
            info = info or self._inspect()
        except WingsliteError as exc:
            raise _LimitsSettled(
                LimitReport(pending=[f"{_ALL_LIMITS} (next start)"], failed=[exc.message])
            ) from None
        if info is None:
            raise _LimitsSettled(
                LimitReport(pending=[f"{_ALL_LIMITS} (no container yet; next start)"])
            )
        if not info["State"].get("Running"):
            raise _LimitsSettled(
                LimitReport(
                    pending=[f"{_ALL_LIMITS} (container stopped; next start re-creates it)"]
                )
            )
        return info

    def _post_limits(self, info: dict[str, Any], build: Build, resources: dict[str, Any]) -> bool:
        """Docker's update API; True when the engine says this kernel has no block I/O weight."""
        docker = _docker()
        try:
            answer = self.client._result(
                self.client._post_json(
                    self.client._url("/containers/{0}/update", info["Id"]),
                    data=_limits_update_body(build, resources),
                ),
                True,
            )
        except docker.errors.NotFound:
            if info is not self._running_info:
                raise _LimitsSettled(
                    LimitReport(pending=[f"{_ALL_LIMITS} (no container yet; next start)"])
                ) from None
            raise _ContainerReplaced() from None
        except (docker.errors.DockerException, OSError) as exc:
            error = _docker_error("updating the container's limits", exc)
            raise _LimitsSettled(
                LimitReport(pending=[f"{_ALL_LIMITS} (next start)"], failed=[error.message])
            ) from None
        warnings = [w for w in (answer or {}).get("Warnings") or [] if w]
        for warning in warnings:
            LOG.info(
                "server %s: Docker warned while updating limits: %s", self.server_uuid, warning
            )
        return any("Block I/O weight" in w or "blkio" in w.lower() for w in warnings)

    def _lift_in_cgroup(
        self, info: dict[str, Any], build: Build, resources: dict[str, Any]
    ) -> tuple[Cgroup, CgroupLimits]:
        """Write what Docker cannot lift into the cgroup files; what the kernel then enforces."""
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
            return cgroup, cgroup.read()
        except WingsliteError as exc:
            try:
                still_running = bool((self._inspect() or {}).get("State", {}).get("Running"))
            except WingsliteError:
                still_running = True
            if not still_running:  # the process exited under us: its cgroup went with it
                raise _LimitsSettled(
                    LimitReport(
                        pending=[f"{_ALL_LIMITS} (container stopped; next start re-creates it)"]
                    )
                ) from None
            raise _LimitsSettled(LimitReport(failed=[f"cgroup: {exc.message}"])) from None

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
            self._refuse_if_destroyed()
            self._create_container(config, image)
            self._refuse_if_destroyed()  # a delete that ran while the container was created
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

    def _refuse_if_destroyed(self) -> None:
        if self._destroyed:
            self._remove_container()
            raise WingsliteError("the start was cancelled: the server was deleted")

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
        if not is_image_reference(name):  # never put a name outside the grammar into an API path
            raise WingsliteError(f"image {name[:200]!r} is not a valid Docker image reference")
        try:
            self.client.inspect_image(name)
            return name
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            raise _docker_error(f"looking up image {name}", exc) from None
        if image.startswith("~"):
            raise WingsliteError(
                f"image {name} is not on this node and is marked local-only ('~'), so it is not "
                "pulled"
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
        """Create the container as Wings does (environment/docker/container.go; README,
        "Docker")."""
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
        spawn(self._read_output, sock, generation, name=f"wingslite-console-{short}")
        spawn(self._poll_stats, generation, name=f"wingslite-stats-{short}")

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
        """Stop as the server's stop type says, then SIGKILL after ``timeout_s``; returns when
        offline.

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
            # Intentional, so never a crash; a start still making the container sees it and gives
            # up.
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
        self._destroyed = True
        with self._lock:
            if self._state != OFFLINE:
                self._set_state(STOPPING)
            self._detach()
        try:
            self.client.remove_container(self.name, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            self._destroyed = False  # the server stays on the node, and may start again
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
        """Re-attach to a running container without restarting it (daemon restart). True if
        running."""
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
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int:
        installer = DockerInstaller(self, cancelled)
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


_ALL_LIMITS = "resource limits (memory, swap, cpu, cpuset, io weight, pids)"


class _LimitsSettled(Exception):
    """A step of ``DockerEnvironment.apply_limits`` that already knows the whole report."""

    def __init__(self, report: LimitReport):
        super().__init__(report)
        self.report = report


class _ContainerReplaced(Exception):
    """The container the environment knew is gone; another one may run under its name."""


def _limits_update_body(build: Build, resources: dict[str, Any]) -> dict[str, Any]:
    """The body of Docker's ``POST /containers/{id}/update`` for ``build``."""
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
    return body


def _kernel_report(
    cgroup: Cgroup, kernel: CgroupLimits, build: Build, resources: dict[str, Any]
) -> LimitReport:
    """Compare what the kernel enforces with what ``build`` asks: applied, or failed naming both."""
    report = LimitReport()

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
            None if swap < 0 or memory is None else (swap if cgroup.version == 1 else swap - memory)
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
    check(
        "cpuset",
        _cpu_set(kernel.cpuset or kernel.all_cpus) == _cpu_set(build.threads or kernel.all_cpus),
        kernel.cpuset,
        f"cpuset {build.threads or 'all (' + kernel.all_cpus + ')'}",
    )
    pids = resources["PidsLimit"] or None
    check("pids", kernel.pids == pids, kernel.pids, f"pids {pids or 'unlimited'}")
    return report


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

    def __init__(self, env: DockerEnvironment, cancelled: Callable[[], bool] = lambda: False):
        self.env = env
        self.cancelled = cancelled  # asked before each step: a suspension or delete came first
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
            self._check_aborted()
            self._write_script(script["script"])
            image = self.env._ensure_image(script["container_image"])
            self._remove()
            self._check_aborted()
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
        if self.cancelled():
            self._aborted.set()
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


def configured_app_name(config: Config) -> str:
    """The node's ``app_name`` (Wings' config.yml), which prefixes every daemon console line."""
    name = config.raw.get("app_name")
    return name if isinstance(name, str) and name else "Pterodactyl"


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
        return cls(
            events,
            throttle_lines=lines,
            throttle_interval_ms=config.get("throttles.line_reset_interval"),
            app_name=configured_app_name(config),
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
        code: int = CLOSE_UNAUTHORIZED,
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
    # A writer still inside a send after this long is blocked on a client that does not read:
    # close() then drops the connection instead of queueing behind it, so that closing many stuck
    # sockets (a suspending sync) costs milliseconds each, not seconds.
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
        self._writer = spawn(self._write_loop, name="wingslite-ws-writer")
        if pending is not None:
            self.close(*pending)

    @property
    def closed(self) -> bool:
        """True once a close frame was sent or the connection dropped."""
        return self._close_sent or self._finished.is_set()

    def close(
        self, code: int = CLOSE_NORMAL, reason: str = "", lock_timeout_s: float | None = None
    ) -> None:
        """Send the close frame now (it is on the wire when this returns) and end the connection.

        The client's close reply is awaited for ``close_timeout_s``; then TCP is shut down. Safe to
        call from any thread and more than once (only the first call sends a frame). The writer
        is waited for ``lock_timeout_s`` (default ``close_lock_timeout_s``) before the connection
        is dropped without a frame.
        """
        if lock_timeout_s is None:
            lock_timeout_s = self.close_lock_timeout_s
        if not self._send_lock.acquire(timeout=lock_timeout_s):
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
                # Over TLS the frame must pass through the TLS layer: a short timeout instead.
                if isinstance(self._sock, ssl.SSLSocket):
                    self._sock.settimeout(self.close_lock_timeout_s)
                    self._sock.sendall(frame)
                elif os.write(self._sock.fileno(), frame) < len(frame):
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
            self.close(exc.code, exc.reason, lock_timeout_s=self.send_timeout_s)
            self.abort()  # "fail the connection": no need to wait for the client's reply
            raise WebSocketClosed(exc.code, exc.reason) from None

    def _fill(self, deadline: float | None) -> bool:
        if self._finished.is_set():
            raise WebSocketClosed(*self._ending())
        timeout_ms = (
            None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        )
        # Over TLS, decrypted bytes may already wait inside the TLS layer, where poll cannot see.
        pending = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        if not pending and not self._poll.poll(timeout_ms):
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
            # Echo the client's code, as the RFC suggests. This is the connection's own reader:
            # it may wait for the writer's sendall (bounded by send_timeout_s). The short default
            # wait is for other threads; under load a writer merely descheduled while holding the
            # lock would exceed it, and the connection would drop without its close frame.
            self.close(code, reason, lock_timeout_s=self.send_timeout_s)
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
    """Sign ``claims`` with HS256, the way the Panel does (tests, tools and the demo Panel use
    it)."""

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


# -- signed URLs -----------------------------------------------------------------------------------
#
# The browser downloads and uploads files (and downloads backups) straight from the node, with a
# JWT in the URL that the Panel signed with the node token (Panel NodeJWTService; Wings
# router/tokens/{file,upload,backup}.go). The same HS256 check as the websocket's applies. Each
# token is good for one request: Wings remembers every ``unique_id`` it has accepted
# (router/tokens/token_store.go) and answers a second use -- or a token for a server this node
# does not hold -- with 404. Tokens issued before the daemon started, or revoked by
# ``POST /ws/deny`` / ``POST /api/deauthorize-user`` (their ``jti`` is the websocket's), are refused
# too: the memory of used ids does not survive a restart, so an older token could otherwise be
# replayed after one.

SIGNED_URL_NOT_FOUND = "The requested resource was not found on this server."
# kind -> the claims, besides server_uuid and unique_id, that a token of that kind must carry.
SIGNED_URL_CLAIMS: Mapping[str, tuple[str, ...]] = {
    "file-download": ("file_path",),
    "file-upload": (),
    "backup-download": ("backup_uuid",),
}

# The Panel's tokens of every kind are signed with the same node key, and older Panels send no
# ``scope``: an upload token is told apart only by what it lacks. Wings v1.11 accepts any of them
# at /upload/file, so a user allowed to download one file, a backup, or to open the console
# could upload. A claim that marks another kind (``permissions``: a websocket token) refuses it;
# a token with a ``scope`` (newer Panels) is judged by that alone.
SIGNED_URL_FOREIGN_CLAIMS: Mapping[str, tuple[str, ...]] = {
    "file-download": ("backup_uuid", "permissions"),
    "file-upload": ("file_path", "backup_uuid", "permissions"),
    "backup-download": ("file_path", "permissions"),
}


@dataclasses.dataclass(frozen=True)
class SignedToken:
    """An accepted one-time token: whose, for which server, and its claims (``file_path``...)."""

    kind: str
    server_uuid: str
    user_uuid: str
    unique_id: str
    claims: Mapping[str, Any]

    def claim(self, key: str) -> str:
        value = self.claims.get(key)
        return value if isinstance(value, str) else ""


class SignedUrls:
    """Verifies the one-time JWTs of ``/download/file``, ``/upload/file`` and ``/download/backup``.

    ``verify(token, kind, has_server)`` returns a ``SignedToken`` or raises ``WingsliteError``:
    403 for a token that is malformed, signed with another key, expired, revoked, of another kind
    (a ``scope`` claim, sent by newer Panels, must name ``kind``) or missing a claim; 404 (Wings'
    text) when ``has_server(server_uuid)`` is false or the ``unique_id`` was used before. Ids are
    remembered until their token expires, so the memory is bounded by what the Panel issues.
    """

    prune_every_s = 60.0

    def __init__(self, secret: Callable[[], str], revocations: Revocations | None = None):
        self._secret = secret  # read per call: a node token that changes is honoured at once
        self._revocations = revocations
        self._seen: dict[str, float] = {}  # unique_id -> the token's exp
        self._lock = threading.Lock()
        self._pruned_at = time.time()

    def verify(self, token: str, kind: str, has_server: Callable[[str], bool]) -> SignedToken:
        if kind not in SIGNED_URL_CLAIMS:
            raise ValueError(f"unknown signed URL kind {kind!r}")
        if not token:
            raise WingsliteError(f"the {kind} link has no token", 403)
        try:
            claims = decode_jwt(token, self._secret())
        except JwtError as exc:
            raise WingsliteError(f"the {kind} token is not valid: {exc}", 403) from None
        scope = claims.get("scope")
        if scope is not None and scope != kind:
            raise WingsliteError(f"the token was issued for {scope!r}, not for {kind!r}", 403)
        for key in ("server_uuid", "unique_id", *SIGNED_URL_CLAIMS[kind]):
            if not isinstance(claims.get(key), str) or not claims[key]:
                raise WingsliteError(f"the {kind} token has no {key} claim", 403)
        for key in SIGNED_URL_FOREIGN_CLAIMS[kind] if scope is None else ():  # scope decides
            if key in claims:
                raise WingsliteError(f"a token with a {key} claim is not a {kind} token", 403)
        signed = SignedToken(
            kind,
            claims["server_uuid"],
            claims["user_uuid"] if isinstance(claims.get("user_uuid"), str) else "",
            claims["unique_id"],
            claims,
        )
        self._check_revoked(signed)
        if not has_server(signed.server_uuid) or not self._first_use(
            signed.unique_id, claims["exp"]
        ):
            raise WingsliteError(SIGNED_URL_NOT_FOUND, 404)
        return signed

    def _check_revoked(self, signed: SignedToken) -> None:
        if self._revocations is None:
            return
        iat = signed.claims.get("iat")
        jti = signed.claims.get("jti")
        problem = self._revocations.check(
            jti if isinstance(jti, str) else "",
            signed.user_uuid,
            signed.server_uuid,
            iat if _is_number(iat) else -1.0,
        )
        if problem:
            raise WingsliteError(f"the {signed.kind} token is not valid: {problem}", 403)

    def first_use(self, unique_id: str, exp: float) -> bool:
        """True the first time ``unique_id`` is seen (remembered until ``exp``), False after."""
        return self._first_use(unique_id, exp)

    def _first_use(self, unique_id: str, exp: float) -> bool:
        now = time.time()
        with self._lock:
            if now - self._pruned_at > self.prune_every_s:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
                self._pruned_at = now
            if unique_id in self._seen:
                return False
            self._seen[unique_id] = exp
            return True


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

    def refund(self, key: str) -> None:
        """Give back the token an allowed message took (it turned out not to count)."""
        count, _ = self._rates.get(key, self._default)
        if key in self._buckets:
            tokens, last = self._buckets[key]
            self._buckets[key] = (min(float(count), tokens + 1.0), last)


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
# The inbound events Wings handles; any other name shares one rate-limit key, so that a client
# cannot grow a socket's limiter state with made-up names (every other name is ignored anyway).
_INBOUND_EVENTS = frozenset(("auth", "send logs", "send stats", "send command", "set state"))
_POWER_PERMISSIONS = {
    "start": "control.start",
    "stop": "control.stop",
    "restart": "control.restart",
    "kill": "control.stop",
}


def stats_json(utilization: Mapping[str, Any]) -> str:
    """The ``stats`` payload: a JSON string; ``network`` is always present (the browser reads
    it)."""
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

    auth_timeout_s = 5.0  # the Panel's browser sends its token at once; strangers are cut early
    ping_interval_s = 30.0
    expiring_window_s = 60.0  # Wings sends "token expiring" with <= 60 s left (listeners.go)
    # Wings' websocket power actions do not wait for the power lock at all; the "offline" status
    # reaches the browser a moment before the stop that sent it lets go of the lock, so a start
    # clicked right then failed with "another power action". A few seconds' wait closes that gap.
    power_wait_s = 5

    def __init__(self, ws: WebSocket, server: Any, daemon: Any, ip: str = ""):
        self.ws = ws
        self.server = server
        self.daemon = daemon
        self.ip = ip  # the client's address, for activity events
        self.token: WebsocketToken | None = None
        self.session: Any = None
        self._expiring_sent = False
        self._expired_sent = False
        self._muted = False  # token expired or revoked: nothing is forwarded until a new auth
        self._subscription: Any = None
        self._power_threads: list[threading.Thread] = []
        self._limiter = RateLimiter(WEBSOCKET_EVENT_RATES, WEBSOCKET_DEFAULT_RATE)
        self._total = RateLimiter({}, WEBSOCKET_TOTAL_RATE)
        self._throttled: set[str] = set()
        self._opened_at = time.monotonic()
        self._lock = threading.Lock()
        self.on_authenticated: Callable[[], None] = lambda: None  # called once, at the first auth

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
                self.ws.close(
                    CLOSE_UNAUTHORIZED, f"no valid auth within {self.auth_timeout_s:.0f} s"
                )
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
            if not self._on_auth("".join(args)):
                # A refused token does not use up the auth limit: the Panel's browser answers
                # the "jwt error" with a new token at once, and one issued in the same second as
                # a deny is refused too; counting those would leave the page without a console.
                self._limiter.refund("auth")
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

    def _on_auth(self, jwt: str) -> bool:
        """Accept a token (True) or answer ``jwt error`` (False)."""
        if not jwt:
            self._send("jwt error", self._prefixed(JWT_MISSING))
            return False
        try:
            token = WebsocketToken.from_claims(decode_jwt(jwt, self.daemon.config.token))
        except JwtError as exc:
            self._send("jwt error", self._prefixed(str(exc)))
            return False
        problem = self._token_problem(token)
        if problem is not None:
            self._send("jwt error", self._prefixed(problem))
            return False
        if self.server.suspended:
            self.ws.close(CLOSE_SUSPENDED, "server is suspended")
            return True
        first = self.token is None
        if self.token is None or self.token.user_uuid != token.user_uuid:
            self.register(token.user_uuid)
        if first and not self._within_server_limit():
            return
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
        return True

    def _within_server_limit(self) -> bool:
        """At the first auth: only authenticated sockets count against the server's limit."""
        limit = self.daemon.config.get("wingslite.websocket_max_per_server")
        if authenticated_websockets(self.daemon.sessions, self.server.uuid) <= limit:
            self.on_authenticated()
            return True
        self.daemon.sessions.unregister(self.session)
        self.session = None
        self.ws.close(
            CLOSE_TRY_AGAIN,
            f"too many open websocket connections for this server (the limit is {limit})",
        )
        return False

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
        self.server.record_activity(
            ACTIVITY_CONSOLE_COMMAND, self.token.user_uuid, self.ip, {"command": line}
        )

    def _set_state(self, action: str) -> None:
        assert self.token is not None
        permission = _POWER_PERMISSIONS.get(action)
        if permission is None:
            raise BadRequest(f"attempting to handle unknown power action {action[:64]!r}")
        if not self.token.can(permission):
            return  # Wings ignores it silently
        with self._lock:
            # Two at most per socket (the "set state" rate limit bounds them too). One more than
            # one: a start clicked as a stop's status turns offline finds the stop's thread still
            # finishing (activity record, lock release); the server's power lock decides between
            # them, waiting ``power_wait_s``.
            self._power_threads = [t for t in self._power_threads if t.is_alive()]
            if len(self._power_threads) >= 2:
                raise Conflict(
                    "another power action is currently being processed for this server, please "
                    "try again later"
                )
            # In its own thread, as Wings handles each message in its own goroutine: the reader
            # keeps answering pings and close frames while the container starts.
            self._power_threads.append(spawn(self._power, action, name="wingslite-ws-power"))

    def _power(self, action: str) -> None:
        try:
            self.server.power(action, self.power_wait_s)
        except Exception as exc:
            self._daemon_error(exc)
            return
        # Only a power action that succeeded, and only from here: the Panel logs its own HTTP calls.
        user = self.token.user_uuid if self.token else None
        self.server.record_activity(ACTIVITY_POWER_PREFIX + action, user, self.ip)

    # -- outbound -------------------------------------------------------------------------------

    def _on_event(self, event: str, *args: Any) -> None:
        # Called from whichever thread publishes; only queues, never blocks.
        token = self.token
        if token is None or self.ws.closed:
            return
        if event == WEBSOCKET_RECHECK_EVENT:
            problem = None if self._muted else self._token_problem(token)
            if problem is not None:
                # The text the Panel's browser answers by fetching a new token
                # (WebsocketHandler.tsx).
                self._muted = True
                self._send("jwt error", problem)
            return
        if self._muted or time.time() > token.exp:
            # As Wings' SendJson (router/websocket/websocket.go): every event for a socket whose
            # token is no longer valid goes out as a "jwt error", so the page keeps asking for a
            # new token until one is accepted, instead of falling silent.
            self._send("jwt error", self._token_problem(token) or JWT_EXPIRED)
            return
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
            "This endpoint speaks only the websocket protocol: expected an 'Upgrade: websocket' "
            "request."
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


def authenticated_websockets(sessions: SessionTable, server_uuid: str) -> int:
    """A server's console sockets that carry an accepted token (those under a user)."""
    return sum(1 for s in sessions.sessions(server_uuid, kind="websocket") if s.user_uuid)


class PerIpCounter:
    """How many of something each client IP holds at once, at most ``limit`` each (0: no limit).

    Methods for the caller: ``acquire(ip)`` (False at the limit) and ``releaser(ip)`` (a callable
    that gives the slot back once, however often it is called).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, ip: str) -> bool:
        with self._lock:
            if self.limit and self._held.get(ip, 0) >= self.limit:
                return False
            self._held[ip] = self._held.get(ip, 0) + 1
            return True

    def releaser(self, ip: str) -> Callable[[], None]:
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                left = self._held.get(ip, 1) - 1
                if left > 0:
                    self._held[ip] = left
                else:
                    self._held.pop(ip, None)

        return release

    def held(self, ip: str) -> int:
        with self._lock:
            return self._held.get(ip, 0)


def serve_websocket(handler: Any, daemon: Any, server: Any) -> None:
    """``GET /api/servers/:server/ws``: accept the upgrade and speak Wings' console protocol on the
    request thread until the socket closes. Refusals before the upgrade raise ``WingsliteError``
    (400 not a websocket request, 403 Origin, 426 version, 429 too many sockets for the server or
    too many not yet authenticated from the client's IP).

    Until it authenticates, a socket counts against its client IP's allowance
    (``wingslite.websocket_unauthenticated_per_ip``, through ``handler.server.websocket_strangers``
    when there is one), not against the server's ``wingslite.websocket_max_per_server``: strangers
    cannot take the owner's slots, and are closed after ``ConsoleSocket.auth_timeout_s``.
    """
    handler.close_connection = True  # after the socket, this connection carries no more HTTP
    strangers = getattr(handler.server, "websocket_strangers", None) or PerIpCounter(0)
    ip = handler.client_address[0]
    if not strangers.acquire(ip):
        notices = getattr(handler.server, "notices", None)
        if notices is not None:
            notices.log(
                "websocket strangers",
                "refusing websockets from %s: %d not yet authenticated "
                "(wingslite.websocket_unauthenticated_per_ip)",
                ip,
                strangers.limit,
            )
        raise WingsliteError(
            f"Too many websocket connections from {ip} have not authenticated yet "
            f"(the limit is {strangers.limit}).",
            429,
        )
    release = strangers.releaser(ip)
    try:
        _serve_websocket(handler, daemon, server, release)
    finally:
        release()


def _serve_websocket(
    handler: Any, daemon: Any, server: Any, authenticated: Callable[[], None]
) -> None:
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
    limit = daemon.config.get("wingslite.websocket_max_per_server")
    if authenticated_websockets(daemon.sessions, server.uuid) >= limit:
        raise WingsliteError(
            f"Too many open websocket connections for this server (the limit is {limit}).", 429
        )
    ws = WebSocket(handler.connection, _drain_read_buffer(handler))
    console = ConsoleSocket(ws, server, daemon, ip=handler.client_address[0])
    console.on_authenticated = authenticated
    console.register("")  # in the table from now on, so that a suspension closes it too
    response = (
        f"HTTP/1.1 101 Switching Protocols\r\nServer: {handler.server_version}\r\nUpgrade: "
        "websocket\r\nConnection: Upgrade\r\n"
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
# Wings' username pre-check (sftp/server.go): "<panel user>.<first 8 characters of the server
# uuid>".
_SFTP_USERNAME_RE = re.compile(r"^(.+)\.([a-z0-9]{8})$", re.IGNORECASE)


def sftp_available() -> bool:
    """True when paramiko is installed (SFTP is optional). It is not imported here."""
    return importlib.util.find_spec("paramiko") is not None


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
    ``max_ssh_packet_bytes``, ``max_banner_line_bytes``, ``auth_timeout_s``,
    ``pubkey_failure_weight``.

    A login is ``<panel user>.<8-char server id>`` with a password or a public key; both are
    checked by ``POST /api/remote/sftp/auth`` (any Panel 4xx is bad credentials; a Panel that does
    not answer within the retry budget refuses the login and nothing else). Failed logins are
    limited per client IP (``wingslite.sftp_login_attempts_per_minute``). A login for a suspended
    server is refused even when the Panel accepts it.

    Each SFTP channel is a session in the daemon's ``SessionTable``: suspension, deletion and
    ``POST /api/deauthorize-user`` close its connection before they return. Every path goes
    through a ``Jail`` over the server's directory; every file is opened as a ``MeteredFile``
    (``Filesystem.open_metered``), which books each written byte before it is written -- refused
    with status 15 when it would pass the disk limit -- and keeps a removed file counted while
    the handle holds it.

    Threads: one accept thread; per connection one thread that runs it start to end (and watches
    its deadlines), paramiko's transport thread and one thread per SFTP channel.

    What a stranger can hold: at most ``wingslite.sftp_max_connections`` connections are open,
    and at most ``wingslite.sftp_max_unauthenticated_per_ip`` of them from one address before they
    log in; more are closed at once. The SSH banner exchange and key exchange must be done within
    ``wingslite.sftp_handshake_timeout_s`` of the connect, and the login within
    ``auth_timeout_s`` more (or the Panel's ``remote_query.timeout``, if longer); a banner line is
    at most 255 bytes (RFC 4253 section 4.2). A logged-in connection with no SFTP request for
    ``wingslite.sftp_idle_timeout_s`` is closed, and one Panel user holds at most
    ``wingslite.sftp_max_sessions_per_user`` connections, so that no user can take every slot.
    """

    max_channels = 4  # per connection; OpenSSH and paramiko clients use one
    max_handles = 256  # open files and directories per channel
    max_read_bytes = 256 * 1024  # per read request, as OpenSSH's sftp-server
    max_packet_bytes = 256 * 1024 + 1024  # an SFTP packet larger than this closes the channel
    max_ssh_packet_bytes = (
        256 * 1024 + 1024
    )  # an SSH packet larger than this closes the connection (OpenSSH: 256 KiB)
    max_banner_line_bytes = 255  # RFC 4253 section 4.2, CR LF included
    auth_timeout_s = 60.0  # after the handshake; OpenSSH's LoginGraceTime is 120 s for both
    pubkey_failure_weight = 0.25  # clients offer several keys before the right one

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.config = daemon.config
        self.port = 0
        self.read_only = bool(self.config.get("system.sftp.read_only"))
        # paramiko (and cryptography under it, ~40 MB) is imported when the first client
        # connects: until then a plain socket listens, and an idle node does not pay for it.
        self._loaded: types.SimpleNamespace | None = None
        self._load_lock = threading.Lock()
        self._limiter = _LoginLimiter(self.config.get("wingslite.sftp_login_attempts_per_minute"))
        self._slots = threading.BoundedSemaphore(
            max(1, self.config.get("wingslite.sftp_max_connections"))
        )
        self.handshake_timeout_s = float(self.config.get("wingslite.sftp_handshake_timeout_s"))
        self.idle_timeout_s = float(self.config.get("wingslite.sftp_idle_timeout_s"))
        self.max_unauthenticated_per_ip = self.config.get(
            "wingslite.sftp_max_unauthenticated_per_ip"
        )
        self.max_sessions_per_user = self.config.get("wingslite.sftp_max_sessions_per_user")
        # A login waits on the Panel, whose calls may take the whole remote_query.timeout.
        self.login_timeout_s = self.handshake_timeout_s + max(
            self.auth_timeout_s, float(self.config.get("remote_query.timeout")) + 5
        )
        self._refusals = _RefusalLog()
        _quiet_paramiko()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._live: set[_SftpConnection] = set()
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def host_key_path(self) -> str:
        return os.path.join(self.config.root_dir, ".sftp", "id_ed25519")

    def start(self) -> None:
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
        self._thread = spawn(self._accept_loop, name="wingslite-sftp")
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
        for connection in live:
            connection.close()

    def connections(self) -> int:
        """How many client connections are open (a closed one stops counting at once)."""
        with self._live_lock:
            return sum(1 for c in self._live if c.transport is not None and c.transport.is_active())

    def _load_paramiko(self) -> types.SimpleNamespace:
        """paramiko, the classes built on it and the host key: loaded by the first connection."""
        loaded = self._loaded
        if loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    import paramiko  # optional dependency: the caller checked sftp_available()

                    glue = _paramiko_glue(paramiko)
                    host_key = self._load_host_key(paramiko)
                    self._loaded = types.SimpleNamespace(
                        module=paramiko, glue=glue, host_key=host_key
                    )
                loaded = self._loaded
        return loaded

    @property
    def _paramiko(self) -> types.ModuleType:
        return self._load_paramiko().module

    @property
    def _glue(self) -> types.SimpleNamespace:
        return self._load_paramiko().glue

    @property
    def _host_key(self) -> Any:
        return self._load_paramiko().host_key

    def _load_host_key(self, paramiko: types.ModuleType) -> Any:
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
        return paramiko.Ed25519Key.from_private_key_file(path)

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
            connection = self._admit(conn, addr)
            if connection is None:
                conn.close()
                continue
            spawn(self._serve, connection, name=f"wingslite-sftp-{addr[0]}")

    def _admit(self, sock: socket.socket, addr: tuple[Any, ...]) -> _SftpConnection | None:
        """A new connection, counted; None when its address or the node is over its bound."""
        ip = str(addr[0])
        with self._live_lock:
            waiting = sum(1 for c in self._live if c.ip == ip and c.waiting())
            if self.max_unauthenticated_per_ip and waiting >= self.max_unauthenticated_per_ip:
                self._refusals.note(
                    "per-ip",
                    f"SFTP: refusing connections from {ip}: {waiting} of its connections have "
                    "not logged in yet (wingslite.sftp_max_unauthenticated_per_ip)",
                )
                return None
            if not self._slots.acquire(blocking=False):
                self._refusals.note(
                    "total",
                    f"SFTP: refusing {ip}: {self.config.get('wingslite.sftp_max_connections')} "
                    "connections are already open (wingslite.sftp_max_connections)",
                )
                return None
            connection = _SftpConnection(self, sock, addr)
            self._live.add(connection)
            return connection

    def _serve(self, connection: _SftpConnection) -> None:
        """One connection, start to end. Nothing a client sends may take the daemon down."""
        sock = connection.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = self._paramiko.Transport(sock)
            connection.transport = transport
            transport.local_version = f"SSH-2.0-wingslite_{VERSION}"
            transport.set_log_channel(_PARAMIKO_LOG)
            transport.handshake_timeout = self.handshake_timeout_s
            transport.banner_timeout = self.handshake_timeout_s
            transport.add_server_key(self._host_key)
            _bound_ssh_packets(transport, self.max_ssh_packet_bytes)
            _bound_banner(transport, self.max_banner_line_bytes)
            transport.set_subsystem_handler("sftp", self._glue.Subsystem, _SftpSession)
            if self._stopping.is_set():
                return
            # With an event, start_server returns at once instead of waiting for the key
            # exchange: the deadlines below must run while the handshake does.
            transport.start_server(event=threading.Event(), server=self._glue.SshServer(connection))
            self._watch(connection)
        except Exception as exc:  # a bad handshake, a reset, garbage: that connection only
            LOG.debug("SFTP connection from %s ended: %s", connection.ip, exc)
        finally:
            connection.close()
            with self._live_lock:
                self._live.discard(connection)
            with contextlib.suppress(OSError):
                sock.close()
            self._slots.release()

    def _watch(self, connection: _SftpConnection) -> None:
        """Wait for the connection to end; close it when it passes one of its deadlines."""
        transport = connection.transport
        timeouts = [self.handshake_timeout_s, self.idle_timeout_s]
        poll_s = min(1.0, max(0.05, min(t for t in timeouts if t > 0) / 4 if any(timeouts) else 1))
        while transport.is_alive():
            transport.join(poll_s)
            reason = self._overdue(connection, time.monotonic())
            if reason is not None:
                if connection.authenticated():
                    LOG.info("SFTP: closing the connection of %s: %s", connection.ip, reason)
                else:
                    self._refusals.note(
                        "deadline", f"SFTP: closing a connection from {connection.ip}: {reason}"
                    )
                connection.close()
                transport.join(5)
                return

    def _overdue(self, connection: _SftpConnection, now: float) -> str | None:
        """Why this connection must be closed now, or None."""
        transport, age_s = connection.transport, now - connection.accepted_at
        if connection.authenticated():
            idle_s = now - connection.last_activity
            if self.idle_timeout_s and idle_s > self.idle_timeout_s:
                return f"no SFTP request for {idle_s:.0f} s (wingslite.sftp_idle_timeout_s)"
            return None
        handshake_done = getattr(transport, "initial_kex_done", transport.session_id is not None)
        if not handshake_done and self.handshake_timeout_s and age_s > self.handshake_timeout_s:
            return (
                f"the SSH handshake was not done within {self.handshake_timeout_s:g} s "
                "(wingslite.sftp_handshake_timeout_s)"
            )
        if age_s > self.login_timeout_s:
            return f"no login within {self.login_timeout_s:g} s of connecting"
        return None

    def claim_slot(self, connection: _SftpConnection, login: SftpLogin) -> bool:
        """Count this connection as one of its user's (``wingslite.sftp_max_sessions_per_user``)."""
        with self._live_lock:
            if connection.user_uuid == login.user_uuid:
                return True
            held = sum(
                1
                for c in self._live
                if c is not connection and c.user_uuid == login.user_uuid and c.is_open()
            )
            if self.max_sessions_per_user and held >= self.max_sessions_per_user:
                self._refusals.note(
                    "per-user",
                    f"SFTP login {login.username!r} from {login.ip} refused: that user already "
                    f"has {held} connections open (wingslite.sftp_max_sessions_per_user)",
                )
                return False
            connection.user_uuid = login.user_uuid
            return True

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
        """Ask the Panel; ``None`` means refused (the reason is logged, the client learns
        nothing)."""
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
                "SFTP login %r: the Panel answered for server %s, which is not this login's "
                "server on this node",
                username,
                answer["server"],
            )
            return None
        if server.suspended or server.transferring:
            LOG.info(
                "SFTP login %r from %s refused: server %s is suspended or being transferred",
                username,
                ip,
                server.uuid,
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

    def __init__(self, sftp: SftpServer, sock: socket.socket, addr: tuple[Any, ...]):
        self.sftp = sftp
        self.sock = sock
        self.transport: Any = None  # paramiko's Transport, once the connection's thread made it
        self.addr = addr
        self.ip = str(addr[0])
        self.accepted_at = self.last_activity = time.monotonic()
        self.user_uuid: str | None = None  # the Panel user whose connection this counts as
        self.closed = False
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
        if self.pending is not None and not self.sftp.claim_slot(self, self.pending):
            self.pending = None
        if self.pending is not None:
            self.touch()  # the idle clock starts at the login
        return self.pending is not None

    def touch(self) -> None:
        """The client did something: the idle timeout starts again."""
        self.last_activity = time.monotonic()

    def authenticated(self) -> bool:
        return self.transport is not None and self.transport.is_authenticated()

    def is_open(self) -> bool:
        return not self.closed and (self.transport is None or self.transport.is_active())

    def waiting(self) -> bool:
        """Open, and not logged in yet."""
        return self.is_open() and not self.authenticated()

    def close(self) -> None:
        """Close the connection now, from any thread (a blocked read wakes up)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()

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


def _bound_banner(transport: Any, max_line_bytes: int) -> None:
    """Refuse an SSH banner line longer than ``max_line_bytes`` instead of buffering it.

    paramiko reads the client's version line until a newline, however long, and keeps it all
    (a 4 MiB line without one stayed held past the handshake limit). RFC 4253 section 4.2 bounds
    the line at 255 bytes. With a paramiko whose internals differ, this bound is skipped; the
    handshake deadline still holds.
    """
    packetizer = transport.packetizer
    read = getattr(packetizer, "_read_timeout", None)
    if read is None or not hasattr(packetizer, "_Packetizer__remainder"):
        return

    def readline(timeout: float) -> str:
        buf = packetizer._Packetizer__remainder
        while b"\n" not in buf[: max_line_bytes + 1]:
            if len(buf) > max_line_bytes:
                raise EOFError(f"SSH banner line longer than {max_line_bytes} bytes")
            buf += read(timeout)
        n = buf.index(b"\n")
        packetizer._Packetizer__remainder = buf[n + 1 :]
        return buf[:n].rstrip(b"\r").decode("utf-8", "replace")

    packetizer.readline = readline


_PARAMIKO_LOG = "wingslite.sftp.paramiko"


class _ParamikoAsDebug(logging.Filter):
    """paramiko logs a traceback at ERROR for every client that sends garbage; a flood of them
    would be a flood of log lines. What matters is logged by the daemon itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return LOG.isEnabledFor(logging.DEBUG)


def _quiet_paramiko() -> None:
    """Transports log to ``wingslite.sftp.paramiko``, at debug level only (idempotent)."""
    logger = logging.getLogger(_PARAMIKO_LOG)
    if not any(isinstance(f, _ParamikoAsDebug) for f in logger.filters):
        logger.addFilter(_ParamikoAsDebug())


class _RefusalLog:
    """One log line per kind of refused or cut connection per minute, with how many were left out.

    A flood of strangers must not turn into a flood of log lines.
    """

    interval_s = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, left out since)

    def note(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            logged_at, left_out = self._last.get(kind, (-self.interval_s, 0))
            if now - logged_at < self.interval_s:
                self._last[kind] = (logged_at, left_out + 1)
                return
            self._last[kind] = (now, 0)
        more = f" ({left_out} more like it in the last minute)" if left_out else ""
        LOG.warning("%s%s", message, more)


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
        def _process(self, t: int, request_number: int, msg: Any) -> None:
            self.server.connection.touch()  # an SFTP request: the session is not idle
            super()._process(t, request_number, msg)

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
            # paramiko keeps every open listing in memory (~40 MB per 100,000 entries): bound how
            # many a channel may hold, and the entries not yet read from them (``Jail.max_entries``
            # in all).
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


def _done(_: object) -> int:
    return 0  # SSH_FX_OK, whatever the operation returned


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
            self.connection.close()

    def _begin(self) -> None:
        daemon = self.sftp.daemon
        login = self.connection.login()
        server = self.sftp.server_of(login.server_uuid) if login else None
        connection = self.connection
        if login is None or server is None:
            self.refused = True
            return
        self.login, self.server = login, server
        # Registered before the checks below: a suspension that lands in between either is seen
        # here or closes this session itself (the sync marks the server suspended first).
        self.session = daemon.sessions.register(
            server.uuid, login.user_uuid, "sftp", lambda code, reason: connection.close()
        )
        revoked = daemon.revocations.check("", login.user_uuid, server.uuid, int(login.at))
        if server.suspended or server.transferring or revoked:
            LOG.info(
                "SFTP session of %s refused: server %s is suspended, being transferred, or the "
                "user was deauthorized",
                login.username,
                server.uuid,
            )
            self.refused = True
            return
        try:
            server.fs.ensure()
            self.jail = server.fs.jail()
            # a server never measured starts its walk now, before the first write
            server.fs.usage_bytes()
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
        # One leading slash: normpath keeps a leading "//" (POSIX), which clients then show as the
        # cwd.
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
        event = ACTIVITY_SFTP_WRITE if exists else ACTIVITY_SFTP_CREATE
        return self._logged(event, [path], self._run(permission, lambda: self._open(path, flags)))

    def _open(self, path: str, flags: int) -> Any:
        if self.handles >= self.sftp.max_handles:
            return 4
        # Read-only handles are metered too: a file removed while one holds it still counts.
        file = self.server.fs.open_metered(self.jail, path, flags, 0o644)
        self.handles += 1
        return self.sftp._glue.Handle(_SftpFile(self, file))

    # -- changing ------------------------------------------------------------------------------

    def mkdir(self, path: str, attr: Any) -> int:
        status = self._run("file.create", lambda: self.jail.mkdir(path, 0o755) or 0)
        return self._logged(ACTIVITY_SFTP_CREATE_DIRECTORY, [path], status)

    def rmdir(self, path: str) -> int:
        return self._logged(
            ACTIVITY_SFTP_DELETE,
            [path],
            self._run("file.delete", lambda: self.jail.rmdir(path) or 0),
        )

    def remove(self, path: str) -> int:
        status = self._run("file.delete", lambda: _done(self.server.fs.remove(self.jail, path)))
        return self._logged(ACTIVITY_SFTP_DELETE, [path], status)

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTP v3 rename never replaces an existing file; posix-rename@openssh.com does.
        status = self._run(
            "file.update",
            lambda: _done(self.server.fs.rename(self.jail, oldpath, newpath, overwrite=False)),
        )
        return self._logged(ACTIVITY_SFTP_RENAME, [(oldpath, newpath)], status)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        status = self._run(
            "file.update", lambda: _done(self.server.fs.rename(self.jail, oldpath, newpath))
        )
        return self._logged(ACTIVITY_SFTP_RENAME, [(oldpath, newpath)], status)

    def symlink(self, target_path: str, path: str) -> int:
        return self._run("file.create", lambda: self.jail.symlink(target_path, path) or 0)

    def chattr(self, path: str, attr: Any) -> int:
        def action() -> int:
            if attr.st_size is not None:
                with self.server.fs.open_metered(self.jail, path, os.O_WRONLY) as file:
                    file.truncate(attr.st_size)
            if attr.st_mode is not None:
                self.jail.chmod(path, attr.st_mode & 0o777)  # never setuid/setgid/sticky bits
            if attr.st_atime is not None and attr.st_mtime is not None:
                self.jail.utime(path, (attr.st_atime, attr.st_mtime))
            # Ownership is the daemon's business (Wings ignores uid/gid in setstat too).
            return 0

        return self._run("file.update", action)

    # -- activity ----------------------------------------------------------------------------

    def _logged(self, event: str, paths: list[Any], result: Any) -> Any:
        """Record a successful change as Wings' SFTP activity (sftp/event.go); pass ``result``
        on."""
        if isinstance(result, int) and result != 0:
            return result
        files: list[Any] = [
            {"from": self.canonicalize(p[0]), "to": self.canonicalize(p[1])}
            if isinstance(p, tuple)
            else self.canonicalize(p)
            for p in paths
        ]
        self.server.record_activity(event, self.login.user_uuid, self.login.ip, {"files": files})
        return result


class _SftpFile:
    """An open file of a session: a ``MeteredFile``, so every write books its growth first.

    A write that does not fit is refused whole with status 15 (Wings' "Quota Exceeded").
    """

    def __init__(self, session: _SftpSession, file: MeteredFile):
        self.session = session
        self.file = file

    def read(self, offset: int, length: int) -> bytes | int:
        refused = self.session._refuse("file.read-content")
        if refused is not None:
            return refused
        try:
            return self.file.pread(min(length, self.session.sftp.max_read_bytes), offset)
        except (OSError, ValueError) as exc:
            return _sftp_status(exc) if isinstance(exc, OSError) else 4

    def write(self, offset: int, data: bytes) -> int:
        if self.session.server.suspended or self.session.login is None:
            return 3
        try:
            self.file.pwrite(data, offset)
            return 0
        except DiskLimitExceeded:
            LOG.info(
                "SFTP write refused on server %s: the disk limit of %d bytes would be passed",
                self.session.server.uuid,
                self.session.server.fs.limit_bytes,
            )
            return SFTP_QUOTA_EXCEEDED
        except OSError as exc:
            return _sftp_status(exc)

    def stat(self) -> Any:
        try:
            return self.session._attributes(self.file.stat())
        except (OSError, ValueError) as exc:
            return _sftp_status(exc) if isinstance(exc, OSError) else 4

    def chattr(self, attr: Any) -> int:
        refused = self.session._refuse("file.update")
        if refused is not None:
            return refused
        try:
            if attr.st_size is not None:
                self.file.truncate(attr.st_size)
            if attr.st_mode is not None:
                os.fchmod(self.file.fileno(), attr.st_mode & 0o777)
            if attr.st_atime is not None and attr.st_mtime is not None:
                os.utime(self.file.fileno(), (attr.st_atime, attr.st_mtime))
            return 0
        except OSError as exc:
            return _sftp_status(exc)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.session.handles -= 1


# activity #########################################################################################
#
# What users did to a server, for the Panel's Activity tab. Events are written to a small SQLite
# queue under ``system.root_directory`` the moment they happen, and a sender thread posts them to
# ``POST /api/remote/activity`` every ``system.activity_send_interval`` seconds. A batch leaves
# the queue only once the Panel accepted it, so a Panel outage or a daemon restart loses nothing.

_ANY_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def activity_ip(address: str | None) -> str | None:
    """A client address as the Panel accepts it: the IP alone, or None when there is none.

    The Panel validates ``ip`` as an IP address and refuses the whole batch over one
    ``1.2.3.4:5678`` (ActivityEventRequest), so a port or IPv6 brackets are taken off here.
    """
    text = (address or "").strip()
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates.append(text[1 : text.index("]")])
    elif text.count(":") == 1:
        candidates.append(text.split(":", 1)[0])
    for candidate in candidates:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(candidate.split("%", 1)[0]))
    return None


def activity_timestamp(at_s: float) -> str:
    """RFC 3339 in UTC with a ``Z``: the Panel replaces an offset it cannot parse with "now"."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_s))


class ActivityLog:
    """The node's activity queue (SQLite) and the thread that sends it to the Panel.

    Methods for the caller: ``record(server_uuid, event, user_uuid, ip, metadata)`` (never raises;
    safe from any thread), ``start()`` / ``stop()`` (the sender thread), ``send_pending()`` (one
    sending round now), ``pending()`` (events still queued).

    Sending follows Wings' crons (internal/cron/activity_cron.go, sftp_cron.go): up to
    ``batch_size`` ordinary events per request; SFTP events of one user, server, IP and kind
    within one minute are merged into one event whose ``files`` lists them all, stamped with the
    first one's time. A batch the Panel refuses with a 4xx can never succeed: it is logged and
    dropped instead of being resent forever. Any other failure keeps it for the next round.
    Deletes go one id at a time (``executemany``), so no batch size meets SQLite's limit on
    variables per statement (the bug of GHSA-2497-gp99-2m74).
    """

    max_batches_per_round = 50  # drains a backlog after an outage without starving the interval

    def __init__(self, path: Path, panel: Any, interval_s: float = 60, batch_size: int = 100):
        self.path = Path(path)
        self.panel = panel
        self.interval_s = max(1.0, float(interval_s))
        self.batch_size = max(1, int(batch_size))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        """The queue's connection (``_lock`` held), opened on first use."""
        if self._db is None:
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            # A damaged queue must not silence activity for good: keep it aside for inspection and
            # start an empty one.
            aside = f"{self.path.name}.damaged-{int(time.time())}"
            LOG.error("activity queue %s is damaged (%s); moved to %s", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):  # a stale log must not be replayed into the new one
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", self.path.with_name(aside + suffix))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            # WAL: a record is one small append; NORMAL sync survives a crash of the daemon.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS activity (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " user TEXT, server TEXT NOT NULL, event TEXT NOT NULL, metadata TEXT,"
                " ip TEXT, at_s REAL NOT NULL)"
            )
        except BaseException:
            db.close()
            raise
        return db

    # -- recording -----------------------------------------------------------------------------

    def record(
        self,
        server_uuid: str,
        event: str,
        user_uuid: str | None = None,
        ip: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one event now; a failure is logged, never raised into the caller's action."""
        try:
            row = (
                user_uuid if user_uuid and _ANY_UUID_RE.fullmatch(user_uuid) else None,
                server_uuid,
                event,
                None if metadata is None else json.dumps(dict(metadata), separators=(",", ":")),
                activity_ip(ip),
                time.time(),
            )
            with self._lock:
                self._conn().execute(
                    "INSERT INTO activity (user, server, event, metadata, ip, at_s)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
        except (sqlite3.Error, OSError, TypeError, ValueError) as exc:
            LOG.error("activity %s of server %s could not be queued: %s", event, server_uuid, exc)

    def pending(self) -> int:
        with self._lock:
            return self._conn().execute("SELECT COUNT(*) FROM activity").fetchone()[0]

    # -- sending -------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = spawn(self._loop, name="wingslite-activity")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.send_pending()
            except Exception:  # the sender must outlive any one bad round
                LOG.exception("sending activity to the Panel failed")

    def send_pending(self) -> int:
        """One round: send queued events until the queue is empty or the Panel fails; the count
        sent."""
        sent = 0
        for take in (self._take_ordinary, self._take_sftp):
            for _ in range(self.max_batches_per_round):
                if self._stop.is_set() and self._thread is not None:
                    return sent
                ids, events = take()
                if not ids:
                    break
                if not self._send(ids, events):
                    return sent
                sent += len(events)
        return sent

    def _rows(self, where: str, limit: int) -> list[tuple[Any, ...]]:
        with self._lock:
            return (
                self._conn()
                .execute(
                    "SELECT id, user, server, event, metadata, ip, at_s FROM activity"
                    f" WHERE {where} ORDER BY id LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )

    def _take_ordinary(self) -> tuple[list[int], list[dict[str, Any]]]:
        rows = self._rows("event NOT LIKE 'server:sftp.%'", self.batch_size)
        return [r[0] for r in rows], [_activity_event(*r[1:]) for r in rows]

    def _take_sftp(self) -> tuple[list[int], list[dict[str, Any]]]:
        """SFTP rows merged per (user, server, ip, event, minute), at most ``batch_size`` events."""
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        ids: list[int] = []
        rows = self._rows("event LIKE 'server:sftp.%'", self.batch_size * 20)
        for row_id, user, server, event, metadata, ip, at_s in rows:
            key = (user, server, ip, event, time.strftime("%Y-%m-%d_%H:%M", time.gmtime(at_s)))
            if key not in merged:
                if len(merged) >= self.batch_size:
                    continue  # the next batch takes it
                merged[key] = _activity_event(user, server, event, None, ip, at_s)
                merged[key]["metadata"] = {"files": []}
            files = _json_or_none(metadata)
            files = files.get("files") if isinstance(files, dict) else None
            merged[key]["metadata"]["files"].extend(files if isinstance(files, list) else [])
            ids.append(row_id)
        return ids, list(merged.values())

    def _send(self, ids: list[int], events: list[dict[str, Any]]) -> bool:
        """POST one batch; True when it may leave the queue (accepted, or refused for good)."""
        try:
            self.panel.send_activity(events)
        except PanelError as exc:
            if not 400 <= exc.http_status < 500:
                LOG.warning(
                    "activity: %d event(s) kept for the next round: %s", len(ids), exc.message
                )
                return False
            LOG.error("activity: the Panel refused %d event(s), dropped: %s", len(ids), exc.message)
        with self._lock:
            self._conn().executemany("DELETE FROM activity WHERE id = ?", [(i,) for i in ids])
        return True


def _json_or_none(text: str | None) -> Any:
    """A stored metadata column: a damaged one is sent as null rather than blocking the queue."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _activity_event(
    user: str | None, server: str, event: str, metadata: str | None, ip: str | None, at_s: float
) -> dict[str, Any]:
    """One item of ``POST /api/remote/activity`` with Wings' field names."""
    return {
        "user": user,
        "server": server,
        "event": event,
        "metadata": _json_or_none(metadata),
        "ip": ip,
        "timestamp": activity_timestamp(at_s),
    }


# file manager #####################################################################################

# The Panel's Files tab (Wings router/router_server_files.go, router/router_download.go,
# server/filesystem/*). Every path goes through the server's ``Jail``: a leading "/" is the
# server's own root, ".." cannot climb out of it, a symlink is followed only while it stays
# inside. The egg's ``file_denylist`` refuses writes, renames, copies, uploads and extraction (as
# Wings); reads, listings, deletes and chmod ignore it (as Wings). Every write is staged under a
# temporary name beside its target, metered against the disk limit chunk by chunk, and renamed
# over the target only when complete -- a refused or broken write leaves the old file as it was
# and nothing new behind. Request bodies and answers are streamed; no file is held in memory.

# Wings' texts (router/middleware/request_error.go, router/router_server_files.go).
FM_NOT_FOUND = "The requested resources was not found on the system."
FM_DENYLIST = "This file cannot be modified: present in egg denylist."
FM_IS_DIR = "Cannot perform that action: file is a directory."
FM_NO_SPACE = "There is not enough disk space available to perform that action."
FM_NAME_TOO_LONG = "Cannot perform that action: file name is too long."
FM_PULL_DISABLED = "This functionality is not currently enabled on this instance."
FM_PULL_LIMIT = (
    "This server has reached its limit of 3 simultaneous remote file downloads at once. "
    "Please wait for one to complete before trying again."
)
FM_MAX_PULLS_PER_SERVER = 3
FM_CHUNK_BYTES = 256 * 1024
FM_DISCARD_BYTES = 64 * 1048576  # a refused body up to this size is read, so the client hears why
FM_PULL_USER_AGENT = "Pterodactyl Panel (https://pterodactyl.io)"  # what Wings sends
FM_PULL_READ_TIMEOUT_S = 60.0
_FM_SERVER = r"/api/servers/(?P<server>[^/]+)/files"
# Built-in tables only: the host's /etc/mime.types would make answers differ between nodes.
_MIME_TYPES = mimetypes.MimeTypes()
# (offset, magic, type) as gabriel-vasile/mimetype (Wings' detector) names them; the Panel offers
# "Unarchive" for the archive types and refuses to edit the binary ones.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/x-rar-compressed"),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd"),
    (257, b"ustar", "application/x-tar"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF8", "image/gif"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"\x7fELF", "application/x-elf"),
)
_TEXT_APPLICATION_TYPES = frozenset(
    ("application/json", "application/xml", "application/javascript", "application/x-sh")
)


class NotEnoughSpace(OSError):
    """A write that would pass the server's disk limit (Wings' ``E_NODISK``)."""

    def __init__(self) -> None:
        super().__init__(errno.EDQUOT, "filesystem: not enough disk space")


def detect_mime(head: bytes, name: str) -> str:
    """The type the Panel's editor reads: magic numbers first, then UTF-8 text, then the name.

    A UTF-8 file is ``text/plain; charset=utf-8`` unless its extension names a text type; an
    empty file counts as text (the Panel can open it). Binary without magic or a known extension
    is ``application/octet-stream``, which the Panel does not open in its editor.
    """
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            if kind == "application/zip" and name.lower().endswith(".jar"):
                return "application/jar"
            return kind
    guess = _MIME_TYPES.guess_type(name, strict=False)[0]
    if b"\x00" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            pass
        else:
            if guess and guess.startswith("text/"):
                return f"{guess}; charset=utf-8"
            if guess in _TEXT_APPLICATION_TYPES or (guess or "").endswith(("+json", "+xml")):
                return guess
            return "text/plain; charset=utf-8"
    if guess and not guess.startswith("text/"):
        return guess
    return "application/octet-stream"


def go_file_mode(mode: int) -> str:
    """``st_mode`` as Go's ``FileMode.String()`` prints it (``-rw-r--r--``, ``Lrwxrwxrwx``)."""
    kinds = [
        (stat.S_ISDIR(mode), "d"),
        (stat.S_ISLNK(mode), "L"),
        (stat.S_ISBLK(mode) or stat.S_ISCHR(mode), "D"),
        (stat.S_ISFIFO(mode), "p"),
        (stat.S_ISSOCK(mode), "S"),
        (bool(mode & stat.S_ISUID), "u"),
        (bool(mode & stat.S_ISGID), "g"),
        (stat.S_ISCHR(mode), "c"),
        (bool(mode & stat.S_ISVTX), "t"),
    ]
    prefix = "".join(letter for on, letter in kinds if on) or "-"
    perms = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return prefix + perms


def _rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def stat_object(
    name: str, st: os.stat_result, mime: str, target: os.stat_result | None = None
) -> dict[str, Any]:
    """Wings' ``Stat`` JSON (server/filesystem/stat.go), as the Panel's FileObjectTransformer reads.

    ``st`` is the entry itself (lstat); for a symlink, ``target`` is what it resolves to inside
    the jail (None when it dangles or leads out), which decides ``directory``/``file`` and the size.
    Unlike Wings v1.11 (whose ``symlink`` is always false), a symlink says so.
    """
    shown = target if target is not None else st
    is_dir = stat.S_ISDIR(shown.st_mode)
    return {
        "name": name,
        "created": _rfc3339(st.st_ctime),
        "modified": _rfc3339(st.st_mtime),
        "mode": go_file_mode(st.st_mode),
        "mode_bits": format(st.st_mode & 0o777, "o"),
        "size": shown.st_size,
        "directory": is_dir,
        "file": not is_dir,
        "symlink": stat.S_ISLNK(st.st_mode),
        "mime": mime,
    }


def attachment_header(name: str) -> str:
    """``Content-Disposition`` for a download: an ASCII name, and the real one (RFC 6266/5987)."""
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        raw = name.encode("utf-8", "surrogateescape")
        value += "; filename*=UTF-8''" + urllib.parse.quote_from_bytes(raw, safe="")
    return value


def _file_head(jail: Jail, path: str) -> bytes:
    fd = jail.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 3072, 0)
    finally:
        os.close(fd)


def stat_path(jail: Jail, path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """The ``Stat`` of one jail path (``st``: its lstat, when the caller has it already)."""
    st = st if st is not None else jail.lstat(path)
    name = posixpath.basename(jail.normalize(path)) or "/"
    target = None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = jail.stat(path)
        except OSError:  # dangling, or leading out of the jail: shown as the link it is
            return stat_object(name, st, "inode/symlink")
    shown = target or st
    if stat.S_ISDIR(shown.st_mode):
        return stat_object(name, st, "inode/directory", target)
    if not stat.S_ISREG(shown.st_mode):
        return stat_object(name, st, "application/octet-stream", target)
    try:
        head = _file_head(jail, path)
    except OSError:
        head = b"\x00"  # vanished or unreadable meanwhile: binary, not editable
    return stat_object(name, st, detect_mime(head, name), target)


def list_directory(jail: Jail, path: str) -> list[dict[str, Any]]:
    """Every entry of a directory as ``Stat``: directories first, then by name (byte order)."""
    base = jail.normalize(path)
    out = []
    for name, st in jail.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            out.append(stat_path(jail, posixpath.join(base, name), st))
    out.sort(key=lambda s: (not s["directory"], s["name"].encode("utf-8", "surrogateescape")))
    return out


def fs_error(exc: OSError) -> WingsliteError:
    """An ``OSError`` from the jail as Wings' status and text (a missing file: 404; Wings: 500)."""
    code = exc.errno
    if isinstance(exc, PathEscape) or code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return WingsliteError(FM_NOT_FOUND, 404)
    if code == errno.EACCES and "denylist" in str(exc.strerror or ""):
        return WingsliteError(FM_DENYLIST, 403)
    if code == errno.EISDIR:
        return WingsliteError(FM_IS_DIR, 400)
    if code in (errno.EDQUOT, errno.ENOSPC):
        return WingsliteError(FM_NO_SPACE, 400)
    if code == errno.ENAMETOOLONG:
        return WingsliteError(FM_NAME_TOO_LONG, 400)
    if code == errno.EEXIST:
        return WingsliteError("A file or directory already exists at that path.", 400)
    if code in (errno.EPERM, errno.EACCES):
        return WingsliteError(f"The operation was not permitted: {exc.strerror}.", 403)
    if code == errno.ETXTBSY:
        return WingsliteError(
            "One or more files this action is attempting to overwrite are currently in use by "
            "another process. Please try again.",
            400,
        )
    LOG.error("file manager: unexpected filesystem error: %s", exc)
    return WingsliteError("An unexpected error was encountered while processing this request")


@contextlib.contextmanager
def fs_errors() -> Iterator[None]:
    """Turn the jail's ``OSError``s (and paths that are not text) into answers."""
    try:
        yield
    except OSError as exc:
        raise fs_error(exc) from None
    except (UnicodeError, ValueError):
        raise BadRequest("the path is not valid") from None


def makedirs(jail: Jail, path: str, mode: int = 0o755) -> None:
    """``mkdir -p`` inside the jail (an existing symlink to a directory inside it is walked)."""
    current = ""
    for part in jail.parts(path):
        current += "/" + part
        with contextlib.suppress(FileExistsError):
            jail.mkdir(current, mode)


def node_owner(daemon: Any) -> tuple[int, int] | None:
    """The uid/gid a server's new files belong to (Wings ``system.user``), when it can chown."""
    return getattr(daemon, "file_owner", None)


def remove_tree(jail: Jail, path: str) -> int:
    """Remove a file, a symlink (never its target) or a whole directory; returns the bytes freed.

    The walk holds each directory open and works on names relative to it with no-follow calls, so
    a symlink swapped in while it runs is unlinked, never descended into.
    """
    with jail.resolve(path, follow=False) as where:
        if where.name is None:
            raise PermissionError(errno.EPERM, "the server's root directory cannot be deleted")
        return _remove_at(where.dir_fd, where.name)


def _freed_bytes(st: os.stat_result) -> int:
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1 else 0


def _remove_at(dir_fd: int, name: str) -> int:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return _freed_bytes(st)
    freed = 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    frames: list[tuple[int, str, int, list[str]]] = []  # (parent fd, name, fd, names left)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
        frames.append((dir_fd, name, fd, os.listdir(fd)))
        while frames:
            parent, own, fd, names = frames[-1]
            if not names:
                frames.pop()
                os.close(fd)
                os.rmdir(own, dir_fd=parent)
                continue
            child = names.pop()
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                child_fd = os.open(child, flags, dir_fd=fd)
                frames.append((fd, child, child_fd, os.listdir(child_fd)))
            else:
                os.unlink(child, dir_fd=fd)
                freed += _freed_bytes(st)
    finally:
        for _, _, fd, _ in frames:
            os.close(fd)
    return freed


class StagedFile:
    """A file written under a temporary name beside its target, metered, renamed over it at the end.

    Methods for the caller: ``write(data)`` (through ``Filesystem.open_metered``, which books the
    bytes for this file first; ``NotEnoughSpace`` if they do not fit), ``commit()``, ``abort()``;
    or use it as a context manager (commit on success, abort on any error). A target that is a
    symlink inside the jail is written through to where it points. The bytes of a file being
    replaced are credited for the duration, so rewriting a file costs only its growth, as in
    Wings. What was booked belongs to the file: removing it later gives exactly that back.
    """

    def __init__(self, jail: Jail, fs: Filesystem, path: str, mode: int = 0o644, owner: Any = None):
        self.jail, self.fs, self.owner = jail, fs, owner
        normalized = jail.normalize(path)
        if jail.is_denied is not None and jail.is_denied(normalized):
            raise PermissionError(errno.EACCES, "this file is in the egg's file_denylist", path)
        makedirs(jail, posixpath.dirname(normalized))
        with jail.resolve(normalized) as where:
            if where.name is None:
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            self.target = "/" + where.relpath
            try:
                old = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        parent = posixpath.dirname(self.target)
        self.tmp = posixpath.join(parent, f".wingslite-{uuidlib.uuid4().hex[:16]}.part")
        self.written = 0
        self.finished = False
        self.file: MeteredFile | None = fs.open_metered(
            jail, self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode
        )
        # The old bytes are credited now (a rewrite costs only its growth) by one writer at a
        # time, and squared with what the rename really replaced at commit.
        self.claimed = fs.claim_replacement(self.target)
        self.old_bytes = _freed_bytes(old) if old is not None and self.claimed else 0
        fs.add_usage(-self.old_bytes)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, data: bytes) -> int:
        if self.file is None:
            raise ValueError("write to a staged file that is closed")
        try:
            self.file.write(data)
        except DiskLimitExceeded:
            raise NotEnoughSpace() from None
        self.written += len(data)
        return len(data)

    def flush(self) -> None:  # a file-like sink for gzip and tarfile
        pass

    def finish_writing(self) -> None:
        """Close the file now (``commit``/``abort`` still to come): many staged files, few fds."""
        self._close()

    def _close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            file.close()

    def commit(self) -> None:
        if self.finished:
            return
        self._close()
        try:
            if self.owner is not None:
                self.jail.chown(self.tmp, *self.owner)
            # The advance credit is undone first; the rename then gives back what the figure
            # really counts for the file it replaces.
            self.fs.add_usage(self.old_bytes)
            self.old_bytes = 0
            self.fs.rename(self.jail, self.tmp, self.target)
        except BaseException:
            self.abort()
            raise
        self.finished = True
        self._release()

    def abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._close()
        self._release()
        with contextlib.suppress(OSError):
            self.fs.remove(self.jail, self.tmp)  # gives back what was booked for it
        self.fs.add_usage(self.old_bytes)

    def _release(self) -> None:
        if self.claimed:
            self.claimed = False
            self.fs.release_replacement(self.target)


def copy_name(jail: Jail, path: str) -> str:
    """Wings' name for a copy: ``a copy.txt``, ``a copy 1.txt``, ``x copy.tar.gz``..."""
    parent, base = posixpath.split(jail.normalize(path))
    stem, ext = posixpath.splitext(base)
    if stem.endswith(".tar"):
        stem, ext = stem[:-4], ".tar" + ext
    for i in range(51):
        candidate = posixpath.join(parent, f"{stem} copy{f' {i}' if i else ''}{ext}")
        try:
            jail.lstat(candidate)
        except FileNotFoundError:
            return candidate
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return posixpath.join(parent, f"{stem}copy.{stamp}{ext}")


# -- archives: compress and decompress --------------------------------------------------------


def archive_name(now: float | None = None) -> str:
    """Wings' name for a new archive: ``archive-2024-01-02T150405Z.tar.gz`` (RFC 3339, no ':')."""
    moment = datetime.datetime.fromtimestamp(
        time.time() if now is None else now, datetime.timezone.utc
    )
    return f"archive-{moment.strftime('%Y-%m-%dT%H%M%SZ')}.tar.gz"


def compress_files(
    jail: Jail, write_jail: Jail, fs: Filesystem, root: str, files: list[str], owner: Any = None
) -> str:
    """Stream ``files`` (names in ``root``) into a new tar.gz in ``root``; returns its jail path.

    The archive is staged and metered like every other write: past the disk limit it is refused
    and nothing is left behind.
    """
    target = posixpath.join(jail.normalize(root), archive_name())
    with StagedFile(write_jail, fs, target, owner=owner) as staged:
        write_tar_gz(jail, staged, root=root, files=files)
    return target


def decompress_file(
    jail: Jail,
    fs: Filesystem,
    root: str,
    file: str,
    is_denied: Callable[[str], bool] | None = None,
    owner: Any = None,
) -> None:
    """Extract ``root/file`` into ``root``, all or nothing.

    The shared extractor (``extract_archive``: every entry checked, every byte metered) writes into
    a hidden staging directory inside ``root``. Only when the whole archive came out, and every
    entry passes the checks at its final place (the egg's denylist, links that must still point
    inside from there, no file where a directory is), are the entries moved into place; otherwise
    the staging directory is removed and the tree is as it was.
    """
    dest = jail.normalize(root)
    staging = posixpath.join(dest, f".wingslite-{uuidlib.uuid4().hex[:16]}.extract")
    fd = jail.open(f"{dest}/{file}", os.O_RDONLY)
    with os.fdopen(fd, "rb") as src:
        jail.mkdir(staging, 0o700)
        try:
            extract_archive(jail, fs, src, name=posixpath.basename(file), dest=staging)
            # The denylist is asked about each path as written and where it really leads:
            # "/ln/server.jar" is "/config/server.jar" when "ln" links to "config". Only ``dest``
            # can be a link on the way (a link where a staged directory goes is refused), and
            # the moves are checked all before the first; the mover checks again as it goes.
            with jail.resolve(dest) as where:
                real = "/" + where.relpath

            def denied(path: str) -> bool:
                return is_denied is not None and (
                    is_denied(path) or is_denied(real + path[len(dest) :])
                )

            moves = _staged_moves(jail, staging, dest, denied)
            with Jail(jail.root, is_denied=is_denied) as mover:
                _move_staged(mover, fs, moves, owner)
        finally:
            with contextlib.suppress(OSError):
                fs.remove_tree(jail, staging)  # what is left gives back what it was booked


def _move_staged(
    jail: Jail, fs: Filesystem, moves: list[tuple[str, str, bool]], owner: Any
) -> None:
    for source, target, is_dir in moves:
        if is_dir:
            with contextlib.suppress(FileExistsError):
                jail.mkdir(target, jail.lstat(source).st_mode & 0o777 | 0o700)
        else:
            fs.rename(jail, source, target)  # a file it replaces is given back
        if owner is not None:
            jail.chown(target, *owner)


def _staged_moves(
    jail: Jail, staging: str, dest: str, is_denied: Callable[[str], bool] | None
) -> list[tuple[str, str, bool]]:
    """Every staged entry with its final place, parents first; refuses what may not go there."""
    moves: list[tuple[str, str, bool]] = []
    pending = [(staging, dest)]
    while pending:
        source_dir, target_dir = pending.pop()
        for name, st in sorted(jail.listdir(source_dir)):
            source, target = f"{source_dir}/{name}", f"{target_dir}/{name}"
            try:
                existing = jail.lstat(target)
            except FileNotFoundError:
                existing = None
            is_dir = stat.S_ISDIR(st.st_mode)
            if existing is not None and stat.S_ISDIR(existing.st_mode) != is_dir:
                kind = "directory" if is_dir else "file"
                raise ArchiveError(f"cannot extract the {kind} {target!r}: something else is there")
            if not is_dir and is_denied is not None and is_denied(target):
                raise PermissionError(errno.EACCES, "this file is in the egg's file_denylist")
            if stat.S_ISLNK(st.st_mode):  # its target is relative to where it will live
                link = jail.readlink(source)
                try:
                    jail._check_link_target(jail.parts(target), link)
                except PathEscape:
                    raise ArchiveError(
                        f"refused archive entry {target!r}: a link to {link!r} would point outside"
                    ) from None
            moves.append((source, target, is_dir))
            if is_dir:
                pending.append((source, target))
    return moves


# -- multipart bodies ---------------------------------------------------------------------------


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type (RFC 7578), or None."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if 0 < len(value) <= 200:
                return value.encode("latin-1", "replace")
    return None


class MultipartReader:
    """``multipart/form-data`` read as a stream (RFC 7578/2046): parts one after the other.

    ``parts()`` yields ``(headers, chunks)`` where ``chunks`` is an iterator over the part's body;
    a part not read to its end is skipped when the next one is asked for. Memory is bounded by
    the chunk size plus one delimiter, whatever the size of the parts.
    """

    max_header_bytes = 16 * 1024

    def __init__(self, read: Callable[[int], bytes], boundary: bytes, chunk_bytes: int = 65536):
        self._read = read
        self._delimiter = b"\r\n--" + boundary
        self._chunk = chunk_bytes
        self._buf = b"\r\n"  # so the first delimiter looks like every other one
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._read(self._chunk)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _until(self, marker: bytes, limit: int) -> bytes:
        while marker not in self._buf:
            if len(self._buf) > limit or not self._fill():
                raise BadRequest("Failed to get multipart form data from request.")
        head, _, self._buf = self._buf.partition(marker)
        return head

    def parts(self) -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        self._until(self._delimiter, self.max_header_bytes)  # the preamble
        while True:
            while len(self._buf) < 2 and self._fill():
                pass
            if self._buf.startswith(b"--"):
                return
            if not self._buf.startswith(b"\r\n"):
                raise BadRequest("Failed to get multipart form data from request.")
            self._buf = self._buf[2:]
            headers = self._headers(self._until(b"\r\n\r\n", self.max_header_bytes))
            body = self._body()
            yield headers, body
            for _ in body:  # whatever the consumer left unread
                pass

    @staticmethod
    def _headers(raw: bytes) -> dict[str, str]:
        headers = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        return headers

    def _body(self) -> Iterator[bytes]:
        keep = len(self._delimiter) - 1
        while True:
            at = self._buf.find(self._delimiter)
            if at >= 0:
                chunk, self._buf = self._buf[:at], self._buf[at + len(self._delimiter) :]
                if chunk:
                    yield chunk
                return
            if len(self._buf) > keep:
                chunk, self._buf = self._buf[:-keep], self._buf[-keep:]
                yield chunk
            if not self._fill():
                raise BadRequest("the multipart body ended before its closing boundary")


def form_disposition(value: str) -> dict[str, str]:
    """``Content-Disposition: form-data; name="files"; filename="a.txt"`` as a dict."""
    out = {}
    for param in re.finditer(r';\s*([\w*]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', value):
        key, raw = param.group(1).lower(), param.group(2).strip()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out[key] = raw
    if "filename*" in out and "''" in out["filename*"]:
        out["filename"] = urllib.parse.unquote(out["filename*"].split("''", 1)[1])
    return out


# -- remote downloads (files/pull) --------------------------------------------------------------


class PullRefused(OSError):
    """A remote download that may not go where its URL leads."""


def is_internal_address(ip: str) -> bool:
    """Loopback, private, link-local, shared, reserved, multicast: not the public Internet."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


def _connect_public(allow_internal: bool, address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    # Every address the name has is checked before a packet goes to it, and the socket connects
    # to that very address, so a name that resolves differently the second time (DNS rebinding)
    # gains nothing. Connecting first and looking at the peer after told an open internal port
    # ("internal address") from a closed one ("connection refused"): a port scanner. Wings
    # checks in its dialer's Control hook, before connect(2), likewise.
    host, port = address[0], address[1]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host!r}: {exc.strerror}") from None
    refused = ""
    for *_, sockaddr in found:
        if allow_internal or not is_internal_address(sockaddr[0]):
            return socket.create_connection((sockaddr[0], port), *args, **kwargs)
        refused = refused or sockaddr[0]
    raise PullRefused(
        errno.EACCES,
        f"the URL's host is an internal address ({refused}); remote downloads may only reach "
        "public addresses",
    )


class _PullHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, allow_internal: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_public, allow_internal)


class _PullHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, allow_internal: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_public, allow_internal)


class _PullHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_internal: bool):
        super().__init__()
        self.allow_internal = allow_internal

    def http_open(self, req: Any) -> Any:
        return self.do_open(_PullHTTPConnection, req, allow_internal=self.allow_internal)


class _PullHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_internal: bool):
        super().__init__()
        self.allow_internal = allow_internal

    def https_open(self, req: Any) -> Any:
        return self.do_open(
            _PullHTTPSConnection, req, context=self._context, allow_internal=self.allow_internal
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # Wings does not follow redirects either (router/downloader: ErrUseLastResponse): a redirect
    # could lead anywhere, and the answer to it is a refused download.
    def redirect_request(self, *args: Any) -> None:
        return None


def pull_opener(allow_internal: bool = False) -> urllib.request.OpenerDirector:
    """urllib without proxies (the peer checked must be the real one) and without redirects."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _PullHTTPHandler(allow_internal),
        _PullHTTPSHandler(allow_internal),
        _NoRedirects(),
    )


class Pull:
    """One remote download into a server's directory (Wings router/downloader)."""

    def __init__(self, server: Any, url: str, directory: str, file_name: str, use_header: bool):
        self.identifier = str(uuidlib.uuid4())
        self.server, self.url, self.directory = server, url, directory
        self.file_name, self.use_header = file_name, use_header
        self.progress = 0.0
        self.path = ""
        self.cancelled = threading.Event()

    def view(self) -> dict[str, Any]:
        return {"Identifier": self.identifier, "Progress": self.progress}  # Go's field names

    def _name(self, response: Any) -> str:
        name = ""
        if self.use_header:
            disposition = response.headers.get("Content-Disposition") or ""
            name = form_disposition(";" + disposition.partition(";")[2]).get("filename", "")
        if not name:
            name = self.file_name or urllib.parse.unquote(
                urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1]
            )
        name = posixpath.basename(name.replace("\\", "/"))
        if name in ("", ".", ".."):
            raise BadRequest("the download has no file name: give file_name")
        return name

    def run(self, opener: urllib.request.OpenerDirector, owner: Any) -> str:
        """Download to the server; returns the jail path written. Raises ``WingsliteError``."""
        request = urllib.request.Request(self.url, headers={"User-Agent": FM_PULL_USER_AGENT})
        try:
            with opener.open(request, timeout=FM_PULL_READ_TIMEOUT_S) as response:
                if response.status != 200:
                    raise BadRequest(f"the remote server answered {response.status}, not 200")
                self.path = posixpath.join(self.directory or "/", self._name(response))
                length = int(response.headers.get("Content-Length") or 0)
                if length and not self.server.fs.has_space(length):
                    raise fs_error(NotEnoughSpace())
                self._copy(response, length, owner)
        except PullRefused as exc:
            raise WingsliteError(str(exc.strerror), 400) from None
        except urllib.error.HTTPError as exc:
            raise BadRequest(
                f"the remote server answered {exc.code} {exc.reason}, not 200 "
                "(redirects are not followed)"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, PullRefused):
                raise WingsliteError(str(reason.strerror), 400) from None
            raise BadRequest(f"the download failed: {reason}") from None
        except (
            OSError,
            ValueError,
        ) as exc:  # a connection reset, a Content-Length that is not a number
            raise BadRequest(f"the download failed: {exc}") from None
        return self.path

    def _read(self, response: Any) -> bytes:
        if self.cancelled.is_set():
            raise BadRequest("the download was cancelled")
        try:
            return response.read1(FM_CHUNK_BYTES)  # what has arrived: progress moves
        except (OSError, http.client.HTTPException) as exc:
            raise BadRequest(f"the download failed: {exc}") from None

    def _copy(self, response: Any, length: int, owner: Any) -> None:
        fs = self.server.fs
        with Jail(fs.root, is_denied=fs.is_denied, owner=fs.owner) as jail, fs_errors():
            with StagedFile(jail, fs, self.path, owner=owner) as staged:
                while chunk := self._read(response):
                    staged.write(chunk)
                    if length:
                        self.progress = min(1.0, staged.written / length)
            self.progress = 1.0


class Pulls:
    """The remote downloads running on this node, by server (at most three per server, as Wings)."""

    def __init__(self) -> None:
        self._pulls: dict[str, Pull] = {}
        self._lock = threading.Lock()

    def of(self, server_uuid: str) -> list[Pull]:
        with self._lock:
            return [p for p in self._pulls.values() if p.server.uuid == server_uuid]

    def add(self, pull: Pull) -> None:
        with self._lock:
            if sum(p.server.uuid == pull.server.uuid for p in self._pulls.values()) >= (
                FM_MAX_PULLS_PER_SERVER
            ):
                raise BadRequest(FM_PULL_LIMIT)
            self._pulls[pull.identifier] = pull

    def done(self, pull: Pull) -> None:
        with self._lock:
            self._pulls.pop(pull.identifier, None)

    def cancel(self, server_uuid: str, identifier: str | None = None) -> None:
        """Cancel one download of a server (or all of them when ``identifier`` is None)."""
        with self._lock:
            for pull in list(self._pulls.values()):
                if pull.server.uuid == server_uuid and identifier in (None, pull.identifier):
                    pull.cancelled.set()
                    self._pulls.pop(pull.identifier, None)


# -- routes -------------------------------------------------------------------------------------

FILE_MANAGER_ROUTES: tuple[tuple[str, str, str, bool], ...] = (
    ("GET", _FM_SERVER + r"/contents", "file_contents", True),
    ("GET", _FM_SERVER + r"/list-directory", "list_directory", True),
    ("PUT", _FM_SERVER + r"/rename", "rename_files", True),
    ("POST", _FM_SERVER + r"/copy", "copy_file", True),
    ("POST", _FM_SERVER + r"/write", "write_file", True),
    ("POST", _FM_SERVER + r"/create-directory", "create_directory", True),
    ("POST", _FM_SERVER + r"/delete", "delete_files", True),
    ("POST", _FM_SERVER + r"/chmod", "chmod_files", True),
    ("POST", _FM_SERVER + r"/compress", "compress_files", True),
    ("POST", _FM_SERVER + r"/decompress", "decompress_file", True),
    ("GET", _FM_SERVER + r"/pull", "list_pulls", True),
    ("POST", _FM_SERVER + r"/pull", "pull_file", True),
    ("DELETE", _FM_SERVER + r"/pull/(?P<download>[^/]+)", "cancel_pull", True),
    ("GET", r"/download/file", "download_file", False),  # a one-time JWT in the query
    ("POST", r"/upload/file", "upload_file", False),  # a one-time JWT in the query
)


class FileManagerRoutes:
    """The file routes of ``ApiHandler`` (a mix-in using its ``read_json``, ``query``, ...)."""

    # -- helpers -------------------------------------------------------------------------------

    def _param(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    def _jail(self, server: Any, denylist: bool = False) -> Jail:
        try:
            server.fs.ensure()
            return Jail(
                server.fs.root,
                is_denied=server.fs.is_denied if denylist else None,
                owner=server.fs.owner,
            )
        except OSError as exc:
            raise WingsliteError(f"the server's directory cannot be opened: {exc}") from None

    def _json_object(self) -> dict[str, Any]:
        body = self.read_json()
        if not isinstance(body, dict):
            raise WingsliteError("The data provided in the request could not be validated.", 422)
        return body

    @staticmethod
    def _text(body: Mapping[str, Any], key: str, default: str = "") -> str:
        value = body.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise WingsliteError(f"{key} must be a string", 422)
        return value

    def _file_list(self, body: Mapping[str, Any], empty_error: str) -> list[Any]:
        files = body.get("files")
        if not isinstance(files, list) or not files:
            raise WingsliteError(empty_error, 422)
        return files

    def _write_head(self, status: int, headers: Mapping[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        all_headers = {"Date": self.date_time_string(), "Server": self.server_version}
        all_headers.update(self._cors_headers())
        all_headers["X-Request-Id"] = self.request_id
        if self.close_connection:
            all_headers["Connection"] = "close"
        all_headers.update(headers)
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.last_status = status

    def _send_file(self, fd: int, size: int, headers: Mapping[str, str]) -> None:
        """Stream ``size`` bytes of an open file (``sendfile`` where the socket allows it)."""
        self._drain_unread_body()
        self._write_head(200, {"Content-Length": str(size), **headers})
        if self.command == "HEAD":  # the same head as GET, no body (RFC 9110 9.3.2)
            return
        with os.fdopen(fd, "rb", closefd=False) as fh:
            try:
                sent = self.connection.sendfile(fh, 0, size) if size else 0
            except OSError:
                sent = -1
        if sent != size:  # the file shrank, or the client went away: the framing is broken
            self.close_connection = True

    def _body_reader(self) -> tuple[Callable[[int], bytes], int]:
        """A ``read(n)`` over the request body bounded by Content-Length, and that length."""
        self.body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise WingsliteError(
                "chunked request bodies are not supported; send Content-Length", 411
            )
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self.close_connection = True
            raise BadRequest("Missing Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise BadRequest("Missing Content-Length")
        remaining = [length]

        def read(n: int) -> bytes:
            if remaining[0] <= 0:
                return b""
            data = self.rfile.read(min(n, remaining[0]))
            if not data:
                self.close_connection = True
                raise BadRequest("the request body ended early")
            remaining[0] -= len(data)
            return data

        return read, length

    def _discard_body(self, read: Callable[[int], bytes]) -> None:
        """Read what is left of a refused body (up to ``FM_DISCARD_BYTES``), else close."""
        budget = FM_DISCARD_BYTES
        try:
            while budget > 0 and (data := read(FM_CHUNK_BYTES)):
                budget -= len(data)
        except (OSError, WingsliteError):
            self.close_connection = True
            return
        if budget <= 0:
            self.close_connection = True

    # -- Bearer routes ---------------------------------------------------------------------------

    def route_list_directory(self, server: Any) -> tuple[int, Any]:
        with self._jail(server) as jail, fs_errors():
            return 200, list_directory(jail, self._param("directory", "/"))

    def route_file_contents(self, server: Any) -> tuple[int | None, Any]:
        with self._jail(server) as jail, fs_errors():
            path = self._param("file")
            try:
                fd = jail.open(path, os.O_RDONLY)
            except OSError as exc:
                if exc.errno == errno.EPERM:  # a FIFO, socket or device (panel#4059)
                    raise BadRequest("Cannot open files of this type.") from None
                raise
            try:
                info = stat_path(jail, path)
                size = os.fstat(fd).st_size
                headers = {"X-Mime-Type": info["mime"], "Content-Type": info["mime"]}
                if self._param("download"):
                    headers["Content-Disposition"] = attachment_header(info["name"])
                    headers["Content-Type"] = "application/octet-stream"
                self._send_file(fd, size, headers)
            finally:
                os.close(fd)
        return None, None

    def route_write_file(self, server: Any) -> tuple[int, Any]:
        read, length = self._body_reader()
        try:
            self._write_file(server, self._param("file"), read, length)
        except BaseException:
            self._discard_body(read)  # so that the client reads the answer, not a broken pipe
            raise
        return 204, None

    def _write_file(
        self, server: Any, path: str, read: Callable[[int], bytes], length: int
    ) -> None:
        owner = node_owner(self.server.daemon)
        with self._jail(server, denylist=True) as jail, fs_errors():
            normalized = jail.normalize(path)
            if jail.is_denied(normalized):
                raise WingsliteError(FM_DENYLIST, 403)
            try:
                old = jail.stat(normalized)
                if stat.S_ISDIR(old.st_mode):
                    raise BadRequest(
                        "Cannot write file, name conflicts with an existing directory by the same "
                        "name."
                    )
                old_size = old.st_size
            except FileNotFoundError:
                old_size = 0
            if not server.fs.has_space(length - old_size):
                raise NotEnoughSpace()
            with StagedFile(jail, server.fs, normalized, owner=owner) as staged:
                while chunk := read(FM_CHUNK_BYTES):
                    staged.write(chunk)

    def route_create_directory(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        name, parent = self._text(body, "name"), self._text(body, "path", "/")
        if not name.strip("/"):
            raise WingsliteError("A directory name is required.", 422)
        with self._jail(server) as jail, fs_errors():
            try:
                makedirs(jail, f"{parent}/{name}")
            except NotADirectoryError:
                raise BadRequest(
                    "Part of the path being created is not a directory (ENOTDIR)."
                ) from None
        return 204, None

    def route_rename_files(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        root = self._text(body, "root", "/")
        files = self._file_list(body, "No files to move or rename were provided.")
        pairs = []
        for item in files:
            if not isinstance(item, dict):
                raise WingsliteError('each file must be {"from": "...", "to": "..."}', 422)
            source, target = self._text(item, "from"), self._text(item, "to")
            if not source or not target:
                raise WingsliteError(
                    "Invalid paths were provided, did you forget to provide both a new and old "
                    "path?",
                    422,
                )
            pairs.append((f"{root}/{source}", f"{root}/{target}"))
        with self._jail(server, denylist=True) as jail, fs_errors():
            for source, target in pairs:
                try:
                    jail.lstat(source)
                except FileNotFoundError:
                    continue  # Wings: a source that does not exist is skipped, not an error
                makedirs(jail, posixpath.dirname(jail.normalize(target)))
                try:
                    jail.rename(source, target, overwrite=False)
                except FileExistsError:
                    raise BadRequest(
                        "Cannot move or rename file, destination already exists."
                    ) from None
        return 204, None

    def route_copy_file(self, server: Any) -> tuple[int, Any]:
        location = self._text(self._json_object(), "location")
        owner = node_owner(self.server.daemon)
        with self._jail(server, denylist=True) as jail, fs_errors():
            try:
                fd = jail.open(location, os.O_RDONLY)
            except (IsADirectoryError, PermissionError) as exc:
                if "denylist" in str(exc):
                    raise
                raise WingsliteError(FM_NOT_FOUND, 404) from None  # regular files only, as Wings
            try:
                st = os.fstat(fd)
                if not server.fs.has_space(st.st_size):
                    raise NotEnoughSpace()
                target = copy_name(jail, location)
                with StagedFile(jail, server.fs, target, st.st_mode & 0o777, owner) as staged:
                    offset = 0
                    while offset < st.st_size:
                        chunk = os.pread(fd, min(FM_CHUNK_BYTES, st.st_size - offset), offset)
                        if not chunk:
                            break
                        staged.write(chunk)
                        offset += len(chunk)
            finally:
                os.close(fd)
        return 204, None

    def route_delete_files(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        root = self._text(body, "root", "/")
        files = self._file_list(body, "No files were specified for deletion.")
        if not all(isinstance(f, str) for f in files):
            raise WingsliteError("files must be a list of names", 422)
        with self._jail(server) as jail, fs_errors():
            paths = [f"{root}/{name}" for name in files]
            for path in paths:
                if not jail.parts(path):
                    raise BadRequest("Cannot delete the root server directory.")
            for path in paths:
                try:
                    server.fs.remove_tree(jail, path)  # what a client still holds stays counted
                except FileNotFoundError:
                    continue  # already gone: what was asked for is true
        return 204, None

    def route_chmod_files(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        root = self._text(body, "root", "/")
        files = self._file_list(body, "No files to chmod were provided.")
        changes = []
        for item in files:
            mode_text = item.get("mode") if isinstance(item, dict) else None
            if not isinstance(mode_text, str) or not re.fullmatch(r"[0-7]{1,4}", mode_text):
                raise BadRequest("Invalid file mode.")
            changes.append((f"{root}/{self._text(item, 'file')}", int(mode_text, 8) & 0o777))
        with self._jail(server) as jail, fs_errors():
            for path, mode in changes:
                with contextlib.suppress(FileNotFoundError):  # Wings skips missing files
                    jail.chmod(path, mode)
        return 204, None

    def route_compress_files(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        root = self._text(body, "root", "/")
        files = self._file_list(body, "No files were passed through to be compressed.")
        if not all(isinstance(f, str) for f in files):
            raise WingsliteError("files must be a list of names", 422)
        if not server.fs.has_space():
            raise Conflict(
                "This server does not have enough available disk space to generate a compressed "
                "archive."
            )
        owner = node_owner(self.server.daemon)
        with self._jail(server) as jail, self._jail(server, denylist=True) as write_jail:
            with fs_errors():
                path = compress_files(jail, write_jail, server.fs, root, files, owner)
                info = stat_path(jail, path)
        info["mime"] = "application/tar+gzip"  # as Wings answers it
        return 200, info

    def route_decompress_file(self, server: Any) -> tuple[int, Any]:
        body = self._json_object()
        root, file = self._text(body, "root", "/"), self._text(body, "file")
        if not file:
            raise WingsliteError("The file to decompress is required.", 422)
        owner = node_owner(self.server.daemon)
        with self._jail(server) as jail, fs_errors():
            decompress_file(jail, server.fs, root, file, server.fs.is_denied, owner)
        return 204, None

    # -- remote downloads ------------------------------------------------------------------------

    def _pulls_enabled(self) -> None:
        if self.server.daemon.config.get("api.disable_remote_download"):
            raise BadRequest(FM_PULL_DISABLED)

    def route_list_pulls(self, server: Any) -> tuple[int, Any]:
        self._pulls_enabled()
        return 200, {"downloads": [p.view() for p in self.server.daemon.pulls.of(server.uuid)]}

    def route_cancel_pull(self, server: Any, download: str) -> tuple[int, Any]:
        self._pulls_enabled()
        self.server.daemon.pulls.cancel(server.uuid, urllib.parse.unquote(download))
        return 204, None

    def route_pull_file(self, server: Any) -> tuple[int, Any]:
        self._pulls_enabled()
        body = self._json_object()
        url = self._text(body, "url")
        directory = self._text(body, "root") or self._text(body, "directory") or "/"
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("An error occurred while parsing that URL: expected an http(s) URL")
        if not server.fs.has_space():
            raise fs_error(NotEnoughSpace())
        daemon = self.server.daemon
        pull = Pull(
            server, url, directory, self._text(body, "file_name"), bool(body.get("use_header"))
        )
        daemon.pulls.add(pull)
        opener = pull_opener(daemon.config.get("wingslite.remote_download_allow_internal"))
        owner = node_owner(daemon)
        if not body.get("foreground"):

            def background() -> None:
                try:
                    pull.run(opener, owner)
                    LOG.info("server %s: pulled %s to %s", server.uuid, url, pull.path)
                except WingsliteError as exc:
                    LOG.warning("server %s: pull of %s failed: %s", server.uuid, url, exc.message)
                except Exception:
                    LOG.exception("server %s: pull of %s failed", server.uuid, url)
                finally:
                    daemon.pulls.done(pull)

            spawn(background, name="wingslite-pull")
            return 202, {"identifier": pull.identifier}
        try:
            path = pull.run(opener, owner)
        finally:
            daemon.pulls.done(pull)
        with self._jail(server) as jail, fs_errors():
            return 200, stat_path(jail, path)

    # -- signed URLs (the browser) ---------------------------------------------------------------

    def _signed(self, kind: str) -> tuple[SignedToken, Any]:
        daemon = self.server.daemon
        token = daemon.signed_urls.verify(
            self._param("token"), kind, lambda uuid: uuid in daemon.servers
        )
        server = daemon.servers.get(token.server_uuid)
        if server is None:
            raise WingsliteError(SIGNED_URL_NOT_FOUND, 404)
        if server.suspended:
            raise Conflict("This server is suspended; its files cannot be transferred.")
        return token, server

    def route_download_file(self) -> tuple[int | None, Any]:
        token, server = self._signed("file-download")
        with self._jail(server) as jail, fs_errors():
            try:
                fd = jail.open(token.claim("file_path"), os.O_RDONLY)
            except (IsADirectoryError, PermissionError):
                raise WingsliteError(SIGNED_URL_NOT_FOUND, 404) from None
            try:
                name = posixpath.basename(jail.normalize(token.claim("file_path")))
                headers = {
                    "Content-Disposition": attachment_header(name),
                    "Content-Type": "application/octet-stream",
                }
                self._send_file(fd, os.fstat(fd).st_size, headers)
            finally:
                os.close(fd)
        return None, None

    def route_upload_file(self) -> tuple[int, Any]:
        try:
            token, server = self._signed("file-upload")
            boundary = multipart_boundary(self.headers.get("Content-Type", ""))
            if boundary is None:
                raise BadRequest("Failed to get multipart form data from request.")
        except WingsliteError:
            with contextlib.suppress(WingsliteError):  # read the refused body: the browser
                self._discard_body(self._body_reader()[0])  # then sees the answer, not a reset
            raise
        directory = self._param("directory", "/")
        limit_mb = self.server.daemon.config.get("api.upload_limit")
        owner = node_owner(self.server.daemon)
        # By name: the same name twice in one form is replaced (the last one wins) without a
        # scan per part, which made a form of 20,000 tiny parts quadratic.
        staged: dict[str, StagedFile] = {}
        read, _ = self._body_reader()
        with self._jail(server, denylist=True) as jail, fs_errors():
            try:
                for headers, chunks in MultipartReader(read, boundary, FM_CHUNK_BYTES).parts():
                    form = form_disposition(headers.get("content-disposition", ""))
                    if form.get("name") != "files" or "filename" not in form:
                        continue
                    if not form["filename"]:
                        continue  # a file input left empty: browsers send an empty part
                    name = posixpath.basename(form["filename"].replace("\\", "/"))
                    if name in ("", ".", ".."):
                        raise BadRequest(
                            f"An uploaded file has no usable name: {form['filename']!r}"
                        )
                    earlier = staged.pop(name, None)
                    if earlier is not None:
                        earlier.abort()
                    target = StagedFile(jail, server.fs, f"{directory}/{name}", owner=owner)
                    staged[name] = target
                    for chunk in chunks:
                        if target.written + len(chunk) > limit_mb * 1048576:
                            raise BadRequest(
                                f"File {name} is larger than the maximum file upload size of "
                                f"{limit_mb} MB."
                            )
                        target.write(chunk)
                    # Its fd closed at once: one per part held to the end let one form of many
                    # parts take every fd of the daemon (EMFILE for every server).
                    target.finish_writing()
                if not staged:
                    raise BadRequest("No files were found on the request body.")
                for target in staged.values():
                    target.commit()
            except BaseException:
                for target in staged.values():
                    target.abort()
                self._discard_body(read)
                raise
        ip = self.client_address[0] if self.client_address else ""
        for name in staged:
            server.record_activity(
                "server:file.uploaded",
                token.user_uuid,
                ip,
                {"file": name, "directory": "/" + "/".join(Jail.parts(directory))},
            )
        return 200, None


# backups ##########################################################################################
#
# Wings v1.11's backups (router/router_server_backup.go, server/backup.go, server/backup/*.go;
# the Panel side: DaemonBackupRepository, BackupRemoteUploadController, BackupStatusController):
#
#   POST   /api/servers/:server/backup                  {adapter, uuid, ignore} -> 202, then a
#          tar.gz of the server directory (``write_tar_gz``) to ``system.backup_directory/<uuid>
#          .tar.gz`` (written under a temporary name, renamed when complete, sha1 while writing);
#          ``s3``: the parts PUT to the Panel's presigned URLs and the local file removed; then
#          ``POST /api/remote/backups/<uuid>`` and the websocket event ``backup completed:<uuid>``.
#   POST   /api/servers/:server/backup/:backup/restore  {adapter, truncate_directory,
#          download_url} -> 202, then stop, empty, ``extract_archive``, ``POST .../restore``.
#   DELETE /api/servers/:server/backup/:backup          -> 204, or 404 when there is none.
#   GET    /download/backup?token=                      the Panel's one-time JWT -> the archive.
#
# The node keeps one small record per backup under ``<root_directory>/wingslite/backups``: which
# server a local archive belongs to (so a token or a request for another server's backup is
# refused, which Wings does not check) and which backups were running. A daemon stopped in the
# middle of a backup leaves a record; at the next boot its temporary file is removed and the
# Panel is told the backup failed.

BACKUP_ADAPTERS = ("wings", "s3")
_BACKUP_SERVER = r"/api/servers/(?P<server>[^/]+)"
BACKUP_NOT_FOUND = "The requested backup was not found on this server."
_COMPRESSION_LEVELS = {"none": 0, "best_speed": 1, "best_compression": 9}


class BackupRecords:
    """``<directory>/<backup uuid>.json``: ``{server, adapter, state}`` of each backup made here.

    ``state`` is ``running`` while the archive is being made and ``done`` once a local archive is
    kept; an s3 backup's record is removed when it ends.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, backup_uuid: str) -> Path:
        return self.directory / f"{backup_uuid}.json"

    def write(self, backup_uuid: str, server_uuid: str, adapter: str, state: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"server": server_uuid, "adapter": adapter, "state": state}
        atomic_write(self._path(backup_uuid), json.dumps(record).encode())

    def read(self, backup_uuid: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(backup_uuid).read_bytes())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def remove(self, backup_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(backup_uuid).unlink()

    def running(self) -> list[tuple[str, dict[str, Any]]]:
        """``(backup uuid, record)`` of every backup whose record still says ``running``."""
        out = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else ():
            record = self.read(path.stem)
            if _UUID_RE.match(path.stem) and record and record.get("state") == "running":
                out.append((path.stem, record))
        return out


class Backups:
    """The node's backups: made, shipped, restored and deleted in background threads.

    Methods for the caller: ``create(server, backup_uuid, adapter, ignore)``, ``restore(server,
    backup_uuid, adapter, truncate, download_url)``, ``delete(server, backup_uuid)``,
    ``locate(backup_uuid, server_uuid)``, ``recover()`` (boot: clean up and report interrupted
    backups). ``node`` is the daemon (``config``, ``panel``, ``servers``).

    Class variables that may be overridden: ``upload_attempts`` and ``upload_backoff_s`` (an s3
    part is tried this many times, waiting ``backoff * 2**n`` between tries), ``upload_timeout_s``,
    ``restore_lines_per_s`` (console lines naming restored files).
    """

    upload_attempts = 5
    upload_backoff_s = 0.5
    upload_timeout_s = 300.0
    restore_lines_per_s = 10.0

    def __init__(self, node: Any):
        self.node = node
        self.directory = Path(node.config.get("system.backup_directory"))
        self.records = BackupRecords(node.config.root_dir / "wingslite" / "backups")
        self._lock = threading.Lock()
        self._running: set[str] = set()

    # -- files ---------------------------------------------------------------------------------

    def path(self, backup_uuid: str) -> Path:
        return self.directory / f"{backup_uuid}.tar.gz"

    def temp_path(self, backup_uuid: str) -> Path:
        return self.directory / f".{backup_uuid}.tar.gz.part"

    def locate(self, backup_uuid: str, server_uuid: str) -> Path:
        """The local archive of ``backup_uuid`` if it belongs to ``server_uuid``; ``NotFound`` else.

        An archive without a record (made by Wings before this node ran wingslite) belongs to
        whichever server asks, as in Wings.
        """
        if not isinstance(backup_uuid, str) or not _UUID_RE.match(backup_uuid):
            raise NotFound(BACKUP_NOT_FOUND)
        record = self.records.read(backup_uuid)
        if record is not None and record.get("server") != server_uuid:
            raise NotFound(BACKUP_NOT_FOUND)
        path = self.path(backup_uuid)
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise NotFound(BACKUP_NOT_FOUND) from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(BACKUP_NOT_FOUND)
        return path

    def delete(self, server: Any, backup_uuid: str) -> None:
        path = self.locate(backup_uuid, server.uuid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.records.remove(backup_uuid)

    # -- making a backup -------------------------------------------------------------------------

    def create(self, server: Any, backup_uuid: Any, adapter: Any, ignore: Any) -> None:
        """Check the request, then make the backup in the background (the caller answers 202)."""
        if adapter not in BACKUP_ADAPTERS:
            raise WingsliteError(
                f"router/backups: provided adapter is not valid: {adapter!r} (wings or s3)",
                422,
            )
        if not isinstance(backup_uuid, str) or not _UUID_RE.match(backup_uuid):
            raise WingsliteError(f"the backup uuid {backup_uuid!r} is not a UUID", 422)
        if ignore is not None and not isinstance(ignore, str):
            raise WingsliteError("ignore must be a string of newline-separated patterns", 422)
        with self._lock:
            if backup_uuid in self._running or self.path(backup_uuid).exists():
                raise Conflict(f"backup {backup_uuid} already exists on this node")
            self._running.add(backup_uuid)
        self.records.write(backup_uuid, server.uuid, adapter, "running")
        job = BackupJob(self, server, backup_uuid, adapter, ignore or "")
        spawn(job.run, name=f"wingslite-backup-{backup_uuid[:8]}")
        server.metrics.count("backup")

    def finished(self, backup_uuid: str) -> None:
        with self._lock:
            self._running.discard(backup_uuid)

    def report(self, backup_uuid: str, body: dict[str, Any]) -> None:
        """``POST /api/remote/backups/<uuid>``: the Panel learns how the backup ended."""
        self.node.panel.request("POST", f"/backups/{backup_uuid}", body=body)

    def recover(self) -> None:
        """Boot: remove the temporary archive of every interrupted backup and report it failed."""
        for backup_uuid, record in self.records.running():
            LOG.warning(
                "backup %s of server %s was interrupted by a restart: reporting it failed",
                backup_uuid,
                record.get("server"),
            )
            # The temporary file, and an archive renamed just before the restart: the Panel is
            # told the backup failed, so nothing would ever ask for it.
            for path in (self.temp_path(backup_uuid), self.path(backup_uuid)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self.report_failed(backup_uuid):
                self.records.remove(backup_uuid)

    def report_failed(self, backup_uuid: str) -> bool:
        """Tell the Panel a backup failed; False when it should be tried again at the next boot
        (the Panel is down). A 4xx is final: the Panel no longer knows the backup, or refuses."""
        try:
            self.report(backup_uuid, _failed_backup_body())
        except PanelError as exc:
            LOG.error("backup %s: the Panel was not told it failed: %s", backup_uuid, exc)
            return 400 <= exc.http_status < 500
        return True

    # -- restoring ---------------------------------------------------------------------------------

    def restore(
        self, server: Any, backup_uuid: Any, adapter: Any, truncate: Any, download_url: Any
    ) -> None:
        """Check the request and open the archive, then restore in the background (202)."""
        if adapter not in BACKUP_ADAPTERS:
            raise WingsliteError(f"the adapter must be wings or s3, not {adapter!r}", 422)
        if not isinstance(truncate, bool):
            raise WingsliteError("truncate_directory must be true or false", 422)
        if adapter == "s3" and (not isinstance(download_url, str) or not download_url):
            raise BadRequest(
                "The download_url field is required when the backup adapter is set to S3."
            )
        if adapter == "wings":
            path = self.locate(backup_uuid, server.uuid)
        if server.installing:
            raise Conflict("server is currently installing")
        if not server.begin_restore():
            raise Conflict("server is currently restoring")
        try:
            if adapter == "wings":
                source, name = (lambda: open(path, "rb")), path.name
            else:
                source, name = self._remote_source(download_url), f"{backup_uuid}.tar.gz"
            job = RestoreJob(self, server, str(backup_uuid), source, name, truncate)
            spawn(job.run, name=f"wingslite-restore-{str(backup_uuid)[:8]}")
        except BaseException:
            server.end_restore()
            raise

    def _remote_source(self, url: str) -> Callable[[], Any]:
        """Open the s3 download now (a bad link is the request's error), read it in the job."""
        if not re.match(r"^https?://", url):
            raise BadRequest("download_url must be an http(s) URL")
        try:
            resp = urllib.request.urlopen(url, timeout=self.upload_timeout_s)
        except urllib.error.HTTPError as exc:
            raise BadRequest(f"the backup could not be downloaded: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BadRequest(f"the backup could not be downloaded: {exc}") from None
        return lambda: resp


def _failed_backup_body() -> dict[str, Any]:
    return {"checksum": "", "checksum_type": "sha1", "size": 0, "successful": False, "parts": None}


class _PacedWriter:
    """Writes at most ``bytes_per_s`` a second on average (Wings ``system.backups.write_limit``,
    MiB/s: a backup must not starve the game servers' disk, panel#2798)."""

    def __init__(self, out: Any, bytes_per_s: int):
        self.out, self.bytes_per_s = out, bytes_per_s
        self.started, self.written = time.monotonic(), 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.written += len(data)
        ahead_s = self.written / self.bytes_per_s - (time.monotonic() - self.started)
        if ahead_s > 0:
            time.sleep(ahead_s)
        return len(data)


class _PartRetry(Exception):
    """A part upload that may succeed when tried again (5xx, 429, timeout, connection error)."""


class BackupJob:
    """One backup, start to end: archive, ship, tell the Panel, tell the websockets."""

    def __init__(self, backups: Backups, server: Any, backup_uuid: str, adapter: str, ignore: str):
        self.backups, self.server = backups, server
        self.uuid, self.adapter, self.ignore = backup_uuid, adapter, ignore

    def run(self) -> None:
        try:
            checksum, size = self._archive()
            parts = self._upload(size) if self.adapter == "s3" else None
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            self.backups.finished(self.uuid)
            if self.adapter == "s3":  # staging only: never kept, whatever happened
                with contextlib.suppress(FileNotFoundError):
                    self.backups.path(self.uuid).unlink()
        body = {
            "checksum": checksum,
            "checksum_type": "sha1",
            "size": size,
            "successful": True,
            "parts": parts,
        }
        try:
            self.backups.report(self.uuid, body)
        except PanelError as exc:
            # As Wings: a backup the Panel does not know about is deleted; the Panel cleans up.
            LOG.error(
                "backup %s: the Panel was not told it completed (%s); removing it", self.uuid, exc
            )
            with contextlib.suppress(FileNotFoundError):
                self.backups.path(self.uuid).unlink()
            self.backups.records.remove(self.uuid)
            return
        if self.adapter == "s3":
            self.backups.records.remove(self.uuid)
        else:
            self.backups.records.write(self.uuid, self.server.uuid, self.adapter, "done")
        LOG.info("backup %s of server %s completed (%d bytes)", self.uuid, self.server.uuid, size)
        self._publish(True, checksum, size)

    def _publish(self, successful: bool, checksum: str, size: int) -> None:
        event = {
            "uuid": self.uuid,
            "is_successful": successful,
            "checksum": checksum,
            "checksum_type": "sha1",
            "file_size": size,
        }
        # The event name carries the backup's uuid, as Wings' (server/backup.go): the Panel's
        # BackupRow.tsx listens for `backup completed:<uuid>`, one listener per backup row.
        self.server.events.publish(
            f"backup completed:{self.uuid}", json.dumps(event, separators=(",", ":"))
        )

    def _failed(self, exc: Exception) -> None:
        text = exc.message if isinstance(exc, WingsliteError) else str(exc)
        unexpected = not isinstance(exc, (WingsliteError, OSError))  # a bug: keep its traceback
        LOG.error(
            "backup %s of server %s failed: %s",
            self.uuid,
            self.server.uuid,
            text,
            exc_info=exc if unexpected else None,
        )
        for path in (self.backups.temp_path(self.uuid), self.backups.path(self.uuid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.backups.report_failed(self.uuid):  # else the next boot reports it
            self.backups.records.remove(self.uuid)
        self._publish(False, "", 0)

    def _ignore_rules(self, jail: Jail) -> str:
        """The request's ``ignore``, or when it is empty the server's ``.pteroignore`` (Wings)."""
        if self.ignore.strip():
            return self.ignore
        try:
            fd = jail.open("/.pteroignore", os.O_RDONLY)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as fh:
            return fh.read(1 << 20).decode("utf-8", "replace")

    def _archive(self) -> tuple[str, int]:
        """The tar.gz written under a temporary name and renamed; returns ``(sha1, size)``."""
        directory, temp = self.backups.directory, self.backups.temp_path(self.uuid)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        level = _COMPRESSION_LEVELS.get(
            self.backups.node.config.get("system.backups.compression_level"), 1
        )
        self.server.fs.ensure()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        limit_mib = self.backups.node.config.get("system.backups.write_limit")
        with (
            os.fdopen(fd, "wb", buffering=1 << 20) as fh,
            Jail(self.server.fs.root, is_denied=self.server.fs.is_denied) as jail,
        ):
            out = HashingWriter(_PacedWriter(fh, limit_mib << 20) if limit_mib > 0 else fh)
            write_tar_gz(jail, out, ignore=self._ignore_rules(jail), compress_level=level)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.backups.path(self.uuid))
        return out.hexdigest(), out.bytes_written

    # -- s3 -------------------------------------------------------------------------------------

    def _upload(self, size: int) -> list[dict[str, Any]]:
        """PUT the archive to the Panel's presigned part URLs; the ETags in part order."""
        answer = self.backups.node.panel.request(
            "GET", f"/backups/{self.uuid}", query={"size": size}
        )
        urls = answer.get("parts") if isinstance(answer, dict) else None
        part_size = answer.get("part_size") if isinstance(answer, dict) else None
        if (
            not isinstance(urls, list)
            or not urls
            or not all(isinstance(u, str) and re.match(r"^https?://", u) for u in urls)
            or not isinstance(part_size, int)
            or isinstance(part_size, bool)
            or part_size <= 0
            or -(-size // part_size) != len(urls)
        ):
            raise WingsliteError(
                f"the Panel's upload answer for {size} bytes is not {{parts: [url...], part_size}}"
                " with one URL per part"
            )
        parts = []
        for index, url in enumerate(urls):
            offset = index * part_size
            length = min(part_size, size - offset)
            etag = self._put_part(url, offset, length, index + 1)
            parts.append({"etag": etag, "part_number": index + 1})
        return parts

    def _put_part(self, url: str, offset: int, length: int, number: int) -> str:
        backups = self.backups
        for attempt in range(1, backups.upload_attempts + 1):
            try:
                return self._put_once(url, offset, length)
            except _PartRetry as exc:
                if attempt == backups.upload_attempts:
                    raise WingsliteError(
                        f"part {number} could not be uploaded after {attempt} attempts: {exc}"
                    ) from None
                wait = backups.upload_backoff_s * 2 ** (attempt - 1)
                LOG.warning(
                    "backup %s: part %d failed (%s), retrying in %.1fs",
                    self.uuid,
                    number,
                    exc,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _put_once(self, url: str, offset: int, length: int) -> str:
        # The part is read again from the file on every try: a failed try consumed its body.
        with open(self.backups.path(self.uuid), "rb") as fh:
            fh.seek(offset)
            body = _FixedSizeReader(fh.fileno(), length)
            request = urllib.request.Request(
                url,
                data=body,
                method="PUT",
                headers={"Content-Length": str(length), "Content-Type": "application/x-gzip"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.backups.upload_timeout_s) as resp:
                    resp.read()
                    etag = resp.headers.get("ETag", "")
            except urllib.error.HTTPError as exc:
                if exc.code >= 500 or exc.code == 429:
                    raise _PartRetry(f"HTTP {exc.code}") from None
                raise WingsliteError(f"the storage refused a part: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise _PartRetry(str(getattr(exc, "reason", exc))) from None
        if not etag:
            raise WingsliteError("the storage answered a part without an ETag")
        return etag


class RestoreJob:
    """One restore: stop the server, empty its directory if asked, extract, report."""

    def __init__(
        self,
        backups: Backups,
        server: Any,
        backup_uuid: str,
        source: Callable[[], Any],
        name: str,
        truncate: bool,
    ):
        self.backups, self.server, self.uuid = backups, server, backup_uuid
        self.source, self.name, self.truncate = source, name, truncate
        self.restored = 0
        self._skipped = 0
        self._last_line = 0.0

    def run(self) -> None:
        server = self.server
        successful = False
        try:
            server.console_message(f"Restoring the server from backup {self.uuid}...")
            self._stop()
            with Jail(server.fs.root, is_denied=server.fs.is_denied) as jail:
                if self.truncate:
                    empty_directory(jail, server.fs)
                with contextlib.closing(self.source()) as src:
                    owner = node_owner(server.daemon)
                    extract_archive(
                        jail, server.fs, src, name=self.name, on_entry=self._entry, owner=owner
                    )
            successful = True
        except Exception as exc:
            text = exc.message if isinstance(exc, WingsliteError) else str(exc)
            LOG.error("restore of backup %s to server %s failed: %s", self.uuid, server.uuid, text)
            server.console_message(
                f"Restoring the backup failed after {self.restored} files were restored: {text}"
            )
        finally:
            self._flush_skipped()
            server.fs.recalculate()
            server.end_restore()
        if successful:
            server.console_message(
                f"Completed server restoration from backup ({self.restored} files)."
            )
        try:
            self.backups.node.panel.request(
                "POST", f"/backups/{self.uuid}/restore", body={"successful": successful}
            )
        except PanelError as exc:
            LOG.error("backup %s: the Panel was not told how the restore ended: %s", self.uuid, exc)
        server.events.publish("backup restore completed", "")

    def _stop(self) -> None:
        server = self.server
        with server.power_lock:  # a start in flight finishes; power actions are refused meanwhile
            server.env.stop(server.config, server.daemon.config.get("wingslite.stop_timeout_s"))

    def _entry(self, path: str) -> None:
        """One console line per restored file, at most ``restore_lines_per_s``; the rest counted."""
        self.restored += 1
        now = time.monotonic()
        if now - self._last_line < 1.0 / self.backups.restore_lines_per_s:
            self._skipped += 1
            return
        self._last_line = now
        self._flush_skipped()
        self.server.console_message(f"(restoring): {path}")

    def _flush_skipped(self) -> None:
        if self._skipped:
            self.server.console_message(f"(restoring): ... and {self._skipped} more files")
            self._skipped = 0


def empty_directory(jail: Jail, fs: Filesystem) -> None:
    """Remove everything beneath the jail's root (never following a link); usage is recounted."""
    with jail.resolve("/") as where:
        root_fd = os.open(".", Jail._DIR_FLAGS, dir_fd=where.dir_fd)
    try:
        for name in os.listdir(root_fd):
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=root_fd)  # fd-based: safe against symlink swaps
            else:
                os.unlink(name, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    fs.recalculate()


class BackupRoutes:
    """The backup routes of ``ApiHandler`` (a mix-in: ``read_json``, ``_respond`` come from it)."""

    def route_backup_create(self, server: Any) -> tuple[int, Any]:
        body = self.read_json()
        if not isinstance(body, dict):
            raise WingsliteError(
                'expected {"adapter": "wings"|"s3", "uuid": "...", "ignore": "..."}', 422
            )
        self.server.daemon.backups.create(
            server, body.get("uuid"), body.get("adapter"), body.get("ignore")
        )
        return 202, None

    def route_backup_restore(self, server: Any, backup: str) -> tuple[int, Any]:
        body = self.read_json()
        if not isinstance(body, dict):
            raise WingsliteError('expected {"adapter", "truncate_directory", "download_url"}', 422)
        self.server.daemon.backups.restore(
            server,
            urllib.parse.unquote(backup),
            body.get("adapter"),
            body.get("truncate_directory", False),
            body.get("download_url"),
        )
        return 202, None

    def route_backup_delete(self, server: Any, backup: str) -> tuple[int, Any]:
        self.server.daemon.backups.delete(server, urllib.parse.unquote(backup))
        return 204, None

    def route_download_backup(self) -> tuple[int | None, Any]:
        daemon = self.server.daemon
        token = (self.query.get("token") or [""])[0]
        signed = daemon.signed_urls.verify(token, "backup-download", lambda u: u in daemon.servers)
        path = daemon.backups.locate(signed.claim("backup_uuid"), signed.server_uuid)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            headers = {
                "Content-Disposition": f"attachment; filename={json.dumps(path.name)}",
                "Content-Type": "application/octet-stream",
            }
            self._send_file(fd, os.fstat(fd).st_size, headers)  # the file manager's
        finally:
            os.close(fd)
        return None, None


BACKUP_ROUTES = (
    ("POST", _BACKUP_SERVER + r"/backup", "backup_create", True),
    ("POST", _BACKUP_SERVER + r"/backup/(?P<backup>[^/]+)/restore", "backup_restore", True),
    ("DELETE", _BACKUP_SERVER + r"/backup/(?P<backup>[^/]+)", "backup_delete", True),
    ("GET", r"/download/backup", "download_backup", False),  # the one-time JWT in the query
)


# transfers ########################################################################################
#
# A transfer moves a server to another node (the Panel's admin "Transfer"). Wings v1.11's
# protocol (router/router_server_transfer.go, router/router_transfer.go, server/transfer/*.go),
# byte for byte, so that either side may be Wings:
#
#   Panel  -> source       POST /api/servers/:server/transfer {url, token, server}   202
#   source -> destination  POST {url} (= destination/api/transfers), Authorization: <token>
#                          (``Bearer <JWT>``: HS256 with the destination's node token, sub = server
#                          uuid), Transfer-Encoding: chunked, multipart/form-data: the part
#                          ``archive`` (archive.tar.gz, the server directory) then the part
#                          ``checksum`` (hex sha256 of the archive bytes)
#   destination            extracts while the bytes arrive, checks the sha256, then tells the
#                          Panel: POST /api/remote/servers/{uuid}/transfer/success (or /failure)
#   Panel  -> source       (inside that success call) DELETE /api/servers/:server
#   destination -> source  200 once the Panel has answered
#
# Neither side writes a temporary archive or holds one in memory. wingslite keeps what Wings
# loses: links arrive as links (refused if they would point out), empty directories and modes are
# kept, and a failed transfer leaves nothing on the destination.

TRANSFER_CHUNK_BYTES = 256 * 1024
TRANSFER_NOT_RUNNING = "Server is not currently being transferred."


def transfer_log_line(text: str, node: str = "Source Node") -> str:
    """A ``transfer logs`` line as Wings colours it (colorstring "[yellow][bold]...[default]")."""
    when = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    return f"\x1b[33m\x1b[1m{when} [Transfer System] [{node}]:\x1b[39m {text}\x1b[0m"


def progress_bar(done_bytes: int, total_bytes: int, width: int = 25) -> str:
    """``[=====>      ] 12.00 MiB / 40.00 MiB`` (Wings internal/progress)."""
    total = max(total_bytes, done_bytes, 1)
    filled = min(width, done_bytes * width // total)
    bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
    return f"[{bar}] {done_bytes / 1048576:.2f} MiB / {total_bytes / 1048576:.2f} MiB"


class _ChunkedBody:
    """A writable HTTP/1.1 request body in chunked transfer coding (RFC 9112 section 7.1).

    Writes are gathered into chunks of ``TRANSFER_CHUNK_BYTES``, so memory stays bounded by one
    chunk whatever the size of what goes through.
    """

    def __init__(self, send: Callable[[bytes], Any]):
        self._send = send
        self._buf = bytearray()
        self.bytes_sent = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= TRANSFER_CHUNK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._send(b"%x\r\n" % len(self._buf) + bytes(self._buf) + b"\r\n")
            self.bytes_sent += len(self._buf)
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        self._send(b"0\r\n\r\n")


class _MultipartWriter:
    """``multipart/form-data`` written as a stream (RFC 7578): ``file()`` then ``field()``."""

    def __init__(self, out: Any):
        self.out = out
        self.boundary = uuidlib.uuid4().hex + uuidlib.uuid4().hex[:28]  # 60 chars, like Go's

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _head(self, headers: str) -> None:
        self.out.write(f"--{self.boundary}\r\n{headers}\r\n\r\n".encode())

    def file(self, name: str, filename: str) -> None:
        """Start a file part; its bytes are then written to ``out`` directly."""
        self._head(
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream"
        )

    def field(self, name: str, value: str) -> None:
        self.out.write(b"\r\n")  # ends the part before
        self._head(f'Content-Disposition: form-data; name="{name}"')
        self.out.write(value.encode())

    def close(self) -> None:
        self.out.write(f"\r\n--{self.boundary}--\r\n".encode())


class OutgoingTransfer:
    """Sends one server to another node; ``run()`` in a thread of its own.

    Methods for the caller: ``run()``, ``cancel()``. Class variables that may be overridden:
    ``stop_wait_s`` (how long the server may take to stop before it is killed, Wings: 15 s),
    ``progress_interval_s``, ``response_timeout_s``.

    The server is stopped first (killed when it does not stop in time); its directory goes out
    through ``write_tar_gz`` (links as links, never followed), hashed on its way into the request
    body. Progress reaches sockets with ``admin.websocket.transfer`` as ``transfer logs`` and
    ``transfer status`` events. On success nothing is sent to the Panel -- only the destination
    reports success, and the Panel then deletes the server here. On failure or cancel the Panel
    is told ``/transfer/failure`` and the server is usable again.
    """

    stop_wait_s = 15.0
    progress_interval_s = 5.0
    response_timeout_s = 600.0

    def __init__(self, server: Any, url: str, token: str):
        self.server, self.url, self.token = server, url, token
        self._cancelled = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self.sent_bytes = 0

    def cancel(self) -> None:
        self._cancelled.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def message(self, text: str) -> None:
        self.server.events.publish("transfer logs", transfer_log_line(text))

    def status(self, value: str) -> None:
        self.server.events.publish("transfer status", value)

    def run(self) -> None:
        try:
            self._stop_server()
            self.status("processing")
            self.message("Preparing to stream server data to destination...")
            answer = self._push()
            LOG.info(
                "server %s: transfer sent (%d bytes): %s", self.server.uuid, self.sent_bytes, answer
            )
        except Exception as exc:
            self._failed(exc)
        finally:
            self.server.daemon.transfers.outgoing.pop(self.server.uuid, None)

    def _failed(self, exc: Exception) -> None:
        cancelled = self._cancelled.is_set()
        why = "canceled" if cancelled else str(exc) or type(exc).__name__
        LOG.warning("server %s: transfer failed: %s", self.server.uuid, why)
        self.message("Canceled." if cancelled else f"Transfer failed: {why}")
        self.status("cancelled" if cancelled else "failed")
        self.server.transferring = False
        if not self.server.deleted:
            self.server.daemon.transfers.report(self.server.uuid, successful=False)

    def _stop_server(self) -> None:
        env = self.server.env
        if env.state == OFFLINE:
            return
        self.message("Stopping the server before it is transferred...")
        try:
            env.stop(self.server.config, self.stop_wait_s)
        except Exception as exc:
            LOG.info("server %s: stop before transfer: %s; killing it", self.server.uuid, exc)
        if env.state != OFFLINE:
            env.kill()

    def _connect(self) -> tuple[http.client.HTTPConnection, str]:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WingsliteError(f"the transfer URL {self.url!r} is not an http(s) URL", 422)
        timeout = self.response_timeout_s
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return conn, path

    def _push(self) -> str:
        conn, path = self._connect()
        self._conn = conn
        try:
            body = _ChunkedBody(conn.send)
            form = _MultipartWriter(body)
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for key, value in (
                ("Authorization", self.token),
                ("Content-Type", form.content_type),
                ("Transfer-Encoding", "chunked"),
                ("User-Agent", f"wingslite/{VERSION}"),
            ):
                conn.putheader(key, value)
            conn.endheaders()
            self.message("Streaming archive to destination...")
            form.file("archive", "archive.tar.gz")
            hashed = HashingWriter(body, "sha256")
            with self._progress(body), Jail(self.server.fs.root) as jail:
                write_tar_gz(jail, hashed, cancelled=self._cancelled.is_set)
            form.field("checksum", hashed.hexdigest())
            form.close()
            body.close()
            self.sent_bytes = body.bytes_sent
            self.message("Finished streaming archive to destination.")
            response = conn.getresponse()
            text = response.read(65536).decode("utf-8", "replace")
        finally:
            self._conn = None
            conn.close()
        if self._cancelled.is_set():
            raise WingsliteError("canceled")
        if response.status != 200:
            raise WingsliteError(f"the destination answered {response.status}: {text[:300]}")
        return text

    @contextlib.contextmanager
    def _progress(self, body: _ChunkedBody) -> Iterator[None]:
        done = threading.Event()
        total = self.server.fs.usage_bytes()

        def tick() -> None:
            while not done.wait(self.progress_interval_s):
                self.message("Uploading " + progress_bar(body.bytes_sent, total))

        spawn(tick, name="wingslite-transfer-progress")
        try:
            yield
        finally:
            done.set()


class IncomingTransfer:
    """Receives one server from another node (``POST /api/transfers``).

    Methods for the caller: ``receive(read, boundary)``, ``cancel()``, ``cleanup()``.

    The archive is extracted while it arrives, through the server's jail and metered against its
    disk limit (``extract_archive``), and hashed as it is read; the ``checksum`` part must equal
    that sha256. Anything else -- no archive, no checksum, a mismatch, an entry that would escape,
    the disk limit, a cancel -- removes everything received.
    """

    def __init__(self, server: Any):
        self.server = server
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def receive(self, read: Callable[[int], bytes], boundary: bytes) -> None:
        digest, checksum = None, None

        def guarded(n: int) -> bytes:
            if self._cancelled.is_set():
                raise WingsliteError("the transfer was canceled", 409)
            return read(n)

        for headers, chunks in MultipartReader(guarded, boundary).parts():
            name = form_disposition(headers.get("content-disposition", "")).get("name")
            if name == "archive":
                digest = self._extract(chunks)
            elif name == "checksum":
                if digest is None:
                    raise BadRequest("archive must be sent before the checksum")
                checksum = b"".join(_bounded_chunks(chunks, 1024)).decode("ascii", "replace")
        if digest is None or checksum is None:
            raise BadRequest("missing archive or checksum")
        if not hmac.compare_digest(checksum.strip().lower(), digest):
            raise BadRequest("checksums don't match")

    def _extract(self, chunks: Iterator[bytes]) -> str:
        stream = _HashingReader(chunks, "sha256")
        fs = self.server.fs
        fs.ensure()
        with Jail(fs.root) as jail:
            extract_archive(
                jail, fs, stream, name="archive.tar.gz", owner=node_owner(self.server.daemon)
            )
        stream.drain()  # the sha256 covers every byte sent, past the end of the tar stream too
        return stream.hexdigest()


def _bounded_chunks(chunks: Iterator[bytes], most_bytes: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > most_bytes:
            raise BadRequest("the checksum part is too long")
        yield chunk


class _HashingReader:
    """A readable stream over an iterator of byte chunks, hashing what it hands out."""

    def __init__(self, chunks: Iterator[bytes], algorithm: str):
        self._chunks = chunks
        self._buf = b""
        self.hash = hashlib.new(algorithm)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._buf += chunk
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        self.hash.update(out)
        return out

    def drain(self) -> None:
        while self.read(ARCHIVE_CHUNK_BYTES):
            pass

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class Transfers:
    """The node's transfers in both directions, and the Panel calls that end them.

    Attributes: ``outgoing`` / ``incoming`` (server uuid -> ``OutgoingTransfer`` /
    ``IncomingTransfer``). Methods for the caller: ``start_outgoing(server, url, token)``,
    ``check_token(authorization)`` -> server uuid, ``report(uuid, successful)``.
    """

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.outgoing: dict[str, OutgoingTransfer] = {}
        self.incoming: dict[str, IncomingTransfer] = {}
        self.lock = threading.Lock()

    def start_outgoing(self, server: Any, url: str, token: str) -> OutgoingTransfer:
        with self.lock:
            if server.transferring or server.uuid in self.outgoing:
                raise Conflict("A transfer is already in progress for this server.")
            transfer = OutgoingTransfer(server, url, token)
            self.outgoing[server.uuid] = transfer
            server.transferring = True
        # SFTP writes would change files that are on their way out; websockets stay, so that an
        # admin sees the progress.
        self.daemon.sessions.close_server(
            server.uuid, 0, "server is being transferred", kind="sftp"
        )
        spawn(transfer.run, name=f"wingslite-transfer-{server.uuid[:8]}")
        server.metrics.count("transfer")
        return transfer

    def check_token(self, authorization: str) -> str:
        """The server uuid a destination may receive, from ``Authorization: Bearer <JWT>``.

        The JWT is the Panel's transfer token (NodeJWTService: HS256 with this node's token,
        ``sub`` = server uuid, no user claims). Refused (401 without a Bearer token, 403
        otherwise): malformed, another key, expired, another kind of token, used before.
        """
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token.strip():
            raise WingsliteError(
                "The required authorization heads were not present in the request.", 401
            )
        try:
            claims = decode_jwt(token.strip(), self.daemon.config.token)
        except JwtError as exc:
            raise WingsliteError(f"the transfer token is not valid: {exc}", 403) from None
        sub = claims.get("sub")
        scope = claims.get("scope")
        if not isinstance(sub, str) or not _UUID_RE.match(sub):
            raise WingsliteError("the transfer token names no server (sub)", 403)
        if (scope is not None and scope != "transfer") or "user_uuid" in claims:
            raise WingsliteError("the token was not issued for a transfer", 403)
        once = claims.get("unique_id") or f"{claims.get('jti')}:{claims.get('iat')}"
        if not self.daemon.signed_urls.first_use(f"transfer:{once}", claims["exp"]):
            raise WingsliteError("the transfer token was used before", 403)
        return sub.lower()

    def report(self, uuid: str, successful: bool) -> None:
        """Tell the Panel how a transfer ended (retried as every Panel call; failure only
        logged)."""
        outcome = "success" if successful else "failure"
        try:
            self.daemon.panel.request("POST", f"/servers/{uuid}/transfer/{outcome}")
        except PanelError as exc:
            LOG.error(
                "server %s: could not tell the Panel the transfer's %s: %s", uuid, outcome, exc
            )
            if successful:
                raise

    def begin_incoming(self, uuid: str, content_type: str) -> tuple[IncomingTransfer, bytes]:
        """Everything a ``POST /api/transfers`` checks before it reads a byte of the body: the
        content type, the Panel's document, a server this node does not have yet (409)."""
        boundary = multipart_boundary(content_type)
        if boundary is None:
            raise BadRequest(
                f'invalid content type "{content_type.split(";")[0]}", '
                'expected "multipart/form-data"'
            )
        transfer = IncomingTransfer(self.daemon.receive_server(uuid))
        with self.lock:
            self.incoming[uuid] = transfer
        return transfer, boundary

    def receive(
        self,
        transfer: IncomingTransfer,
        body: Callable[[], Callable[[int], bytes]],
        boundary: bytes,
    ) -> None:
        """The rest of the destination's side: extract ``body()``, tell the Panel, keep the server;
        on any failure forget it and everything that arrived, and tell the Panel that too."""
        server, ok = transfer.server, False
        try:
            transfer.receive(body(), boundary)
            self.daemon.adopt_received(server)
            self.report(server.uuid, successful=True)
            ok = True
            server.transferring = False
            server.events.publish("transfer status", "success")
            LOG.info("server %s: transfer received", server.uuid)
        finally:
            with self.lock:
                self.incoming.pop(server.uuid, None)
            if not ok:
                server.events.publish("transfer status", "failure")
                self.daemon.drop_received(server)
                self.report(server.uuid, successful=False)


class TransferRoutes:
    """``route_*`` methods of the transfer routes, mixed into ``ApiHandler``."""

    def route_start_transfer(self, server: Any) -> tuple[int, Any]:
        body = self.read_json()
        target = body.get("server") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("url"), str)
            or not body["url"]
            or not isinstance(body.get("token"), str)
            or not body["token"]
            or (target is not None and not isinstance(target, dict))
        ):
            raise WingsliteError("The data provided in the request could not be validated.", 422)
        if not re.match(r"https?://[^\s/]+", body["url"]):
            raise WingsliteError(f"the transfer URL {body['url']!r} is not an http(s) URL", 422)
        self.server.daemon.transfers.start_outgoing(server, body["url"], body["token"])
        return 202, None

    def route_cancel_transfer(self, server: Any) -> tuple[int, Any]:
        transfer = self.server.daemon.transfers.outgoing.get(server.uuid)
        if not server.transferring or transfer is None:
            raise Conflict(TRANSFER_NOT_RUNNING)
        transfer.cancel()
        return 202, None

    def route_receive_transfer(self) -> tuple[int, Any]:
        transfers = self.server.daemon.transfers
        uuid = transfers.check_token(self.headers.get("Authorization", ""))
        # Refusals up to here leave the body unread, so that the answer reaches a client that is
        # still sending (the dispatcher drains a small body; closing on unread bytes resets).
        transfer, boundary = transfers.begin_incoming(uuid, self.headers.get("Content-Type", ""))
        try:
            transfers.receive(transfer, self._transfer_body, boundary)
        except BaseException:
            self.close_connection = True  # the rest of the body is not read
            raise
        return 200, None

    def _transfer_body(self) -> Callable[[int], bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.body_read = True
            return chunked_reader(self.rfile)
        return self._body_reader()[0]

    def route_cancel_incoming_transfer(self, server: Any) -> tuple[int, Any]:
        transfer = self.server.daemon.transfers.incoming.get(server.uuid)
        if not server.transferring or transfer is None:
            raise Conflict(TRANSFER_NOT_RUNNING)
        transfer.cancel()
        return 202, None


TRANSFER_ROUTES = (
    ("POST", r"/api/transfers", "receive_transfer", False),  # authenticated by the JWT inside
    ("DELETE", r"/api/transfers/(?P<server>[^/]+)", "cancel_incoming_transfer", True),
    ("POST", r"/api/servers/(?P<server>[^/]+)/transfer", "start_transfer", True),
    ("DELETE", r"/api/servers/(?P<server>[^/]+)/transfer", "cancel_transfer", True),
)


def chunked_reader(rfile: Any, max_line_bytes: int = 4096) -> Callable[[int], bytes]:
    """``read(n)`` over a request body in chunked transfer coding (RFC 9112 section 7.1).

    Go's HTTP client (Wings sending a transfer) streams bodies of unknown length this way.
    Chunk extensions are ignored, trailers read and dropped; a size line that is not hex, too
    long, or a body that ends early is a ``BadRequest``.
    """
    state = {"left": 0, "done": False}

    def line() -> bytes:
        raw = rfile.readline(max_line_bytes + 1)
        if len(raw) > max_line_bytes or not raw.endswith(b"\n"):
            raise BadRequest("malformed chunked request body")
        return raw.rstrip(b"\r\n")

    def read(n: int) -> bytes:
        if state["done"]:
            return b""
        if state["left"] == 0:
            size = line().split(b";", 1)[0].strip()
            if not size or not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size):
                raise BadRequest("malformed chunked request body")
            state["left"] = int(size, 16)
            if state["left"] == 0:
                while line():  # trailer fields, then the empty line
                    pass
                state["done"] = True
                return b""
        data = rfile.read(min(n, state["left"]))
        if not data:
            raise BadRequest("the request body ended early")
        state["left"] -= len(data)
        if state["left"] == 0 and rfile.read(2) != b"\r\n":
            raise BadRequest("malformed chunked request body")
        return data

    return read


# metrics ##########################################################################################
#
# ``GET /metrics``: the node's figures in Prometheus' text exposition format (version 0.0.4),
# written by hand -- it is a few lines of text. Wings has no such endpoint; it sits behind the
# node token, or ``wingslite.metrics_token`` so that a scraper need not hold the node's token.
# This section sits before the HTTP API because its route mix-in is one of ``ApiHandler``'s bases.

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Counters of one server for ``GET /metrics`` (``Server.metrics``).

    Methods for the caller: ``timed_sync()`` (a context manager around one sync: counted, timed,
    a failure when it raises), ``count(operation)`` (one more ``install``, ``backup``,
    ``transfer``... of this server; any name is exported).
    """

    operations = ("install", "backup", "transfer")  # always exported, 0 until one happens

    def __init__(self) -> None:
        self.syncs = 0
        self.sync_failures = 0
        self.sync_seconds = Histogram()
        self.counts = dict.fromkeys(self.operations, 0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timed_sync(self) -> Iterator[None]:
        started = time.monotonic()
        failed = True
        try:
            yield
            failed = False
        finally:
            with self._lock:
                self.syncs += 1
                self.sync_failures += failed
            self.sync_seconds.observe(time.monotonic() - started)

    def count(self, operation: str) -> None:
        with self._lock:
            self.counts[operation] = self.counts.get(operation, 0) + 1


def _metric_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _metric_labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    escaped = (
        (k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for k, v in labels.items()
    )
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped) + "}"


class MetricsText:
    """Builds one exposition: each family's ``# HELP`` and ``# TYPE`` once, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_metric_labels(labels)} {_metric_value(value)}")

    def histogram(
        self, name: str, help_text: str, items: Iterable[tuple[dict[str, Any], Histogram]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, histogram in items:
            buckets, count, total = histogram.snapshot()
            for bound, cumulative in buckets:
                le = {**labels, "le": _metric_value(bound)}
                self.lines.append(f"{name}_bucket{_metric_labels(le)} {cumulative}")
            self.lines.append(f"{name}_sum{_metric_labels(labels)} {_metric_value(total)}")
            self.lines.append(f"{name}_count{_metric_labels(labels)} {count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(daemon: Any) -> str:
    """The exposition of a node (``daemon`` as ``Daemon``): its servers, then the node itself."""
    out = MetricsText()
    _server_metrics(out, daemon)
    _node_metrics(out, daemon)
    return out.text()


def _network(key: str) -> Callable[[Any, dict[str, Any], Any], float]:
    return lambda s, u, d: (u.get("network") or {}).get(key) or 0


# (name, type, help, the value of one server from (server, its utilization, daemon)), exported in
# this order, one sample per server.
_SERVER_FAMILIES: tuple[tuple[str, str, str, Callable[[Any, dict[str, Any], Any], float]], ...] = (
    ("suspended", "gauge", "1 when the Panel suspended the server.", lambda s, u, d: s.suspended),
    (
        "cpu_percent",
        "gauge",
        "CPU use in percent of one core (Wings' cpu_absolute).",
        lambda s, u, d: u.get("cpu_absolute") or 0,
    ),
    (
        "memory_bytes",
        "gauge",
        "Memory used by the server's process.",
        lambda s, u, d: u.get("memory_bytes") or 0,
    ),
    (
        "memory_limit_bytes",
        "gauge",
        "Memory limit of the container.",
        lambda s, u, d: u.get("memory_limit_bytes") or 0,
    ),
    (
        "disk_bytes",
        "gauge",
        "Disk space the server's files use.",
        lambda s, u, d: u.get("disk_bytes") or 0,
    ),
    (
        "disk_limit_bytes",
        "gauge",
        "Disk limit of the server (0: none).",
        lambda s, u, d: s.fs.limit_bytes or 0,
    ),
    (
        "uptime_seconds",
        "gauge",
        "Seconds since the server's process started (0 when offline).",
        lambda s, u, d: (u.get("uptime") or 0) / 1000,
    ),
    (
        "network_receive_bytes_total",
        "counter",
        "Bytes the container received since it started.",
        _network("rx_bytes"),
    ),
    (
        "network_transmit_bytes_total",
        "counter",
        "Bytes the container sent since it started.",
        _network("tx_bytes"),
    ),
    (
        "websocket_sessions",
        "gauge",
        "Open console websockets of the server.",
        lambda s, u, d: d.sessions.count(s.uuid, kind="websocket"),
    ),
    (
        "sftp_sessions",
        "gauge",
        "Open SFTP sessions of the server.",
        lambda s, u, d: d.sessions.count(s.uuid, kind="sftp"),
    ),
)


def _server_metrics(out: MetricsText, daemon: Any) -> None:
    views = [(s, _utilization(s)) for s in sorted(daemon.all_servers(), key=lambda s: s.uuid)]
    out.family(
        "wingslite_server_state",
        "gauge",
        "1 for the state the server is in (offline, starting, running, stopping).",
        [
            ({"server": s.uuid, "state": state}, u["state"] == state)
            for s, u in views
            for state in (OFFLINE, STARTING, RUNNING, STOPPING)
        ],
    )
    for name, kind, help_text, value in _SERVER_FAMILIES:
        samples = [({"server": s.uuid}, value(s, u, daemon)) for s, u in views]
        out.family(f"wingslite_server_{name}", kind, help_text, samples)
    _server_counters(out, [(s.metrics, {"server": s.uuid}) for s, _ in views])


def _utilization(server: Any) -> dict[str, Any]:
    """A server's figures; one whose figures cannot be had shows its state and zeros."""
    try:
        return server.utilization()
    except Exception as exc:  # one server's fault never fails the whole scrape
        LOG.debug("metrics: server %s: %s", server.uuid, exc)
        return {"state": server.state}


def _server_counters(out: MetricsText, items: list[tuple[ServerMetrics, dict[str, Any]]]) -> None:
    out.family(
        "wingslite_server_syncs_total",
        "counter",
        "Syncs the Panel asked for (POST /api/servers/:server/sync).",
        ((lb, m.syncs) for m, lb in items),
    )
    out.family(
        "wingslite_server_sync_failures_total",
        "counter",
        "Syncs that failed or were applied only in part.",
        ((lb, m.sync_failures) for m, lb in items),
    )
    out.histogram(
        "wingslite_server_sync_duration_seconds",
        "Time a sync took: the Panel's document fetched and applied.",
        ((lb, m.sync_seconds) for m, lb in items),
    )
    out.family(
        "wingslite_server_operations_total",
        "counter",
        "Installs, backups and transfers of the server started on this node.",
        [({**lb, "operation": op}, n) for m, lb in items for op, n in sorted(m.counts.items())],
    )


def _queued_activity(daemon: Any) -> float:
    try:
        return daemon.activity.pending()
    except (sqlite3.Error, OSError):  # the figure is missing, not the whole scrape
        return math.nan


def _node_metrics(out: MetricsText, daemon: Any) -> None:
    out.family("wingslite_info", "gauge", "The running wingslite.", [({"version": VERSION}, 1)])
    out.family("wingslite_servers", "gauge", "Servers on this node.", [({}, len(daemon.servers))])
    out.family(
        "wingslite_activity_queued_events",
        "gauge",
        "Activity events waiting to be sent to the Panel.",
        [({}, _queued_activity(daemon))],
    )
    stats = daemon.panel.stats.copy()
    out.family(
        "wingslite_panel_requests_total",
        "counter",
        "Requests to the Panel's remote API by outcome (2xx, 4xx, 5xx, unreachable, invalid).",
        (
            ({"method": m, "path": p, "outcome": o}, n)
            for (m, p, o), n in sorted(stats.requests.items())
        ),
    )
    out.histogram(
        "wingslite_panel_request_duration_seconds",
        "Time one request to the Panel took.",
        (({"method": m, "path": p}, h) for (m, p), h in sorted(stats.latency.items())),
    )
    out.family(
        "wingslite_panel_failures_total",
        "counter",
        "Calls to the Panel that failed for good (after any retries).",
        (({"method": m, "path": p}, n) for (m, p), n in sorted(stats.failures.items())),
    )


class MetricsRoutes:
    """``GET /metrics`` for ``ApiHandler``: the node token or ``wingslite.metrics_token``."""

    def route_metrics(self) -> tuple[int | None, Any]:
        config = self.server.daemon.config
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise WingsliteError(
                "The required authorization heads were not present in the request.", 401
            )
        accepted = [config.token, config.get("wingslite.metrics_token")]
        if not any(t and hmac.compare_digest(token.encode(), t.encode()) for t in accepted):
            raise WingsliteError("You are not authorized to access this endpoint.", 403)
        body = render_metrics(self.server.daemon).encode()
        self._drain_unread_body()
        # The shared plumbing writes the headers (date, CORS, request id); the text follows.
        self._respond(
            200, None, {"Content-Type": METRICS_CONTENT_TYPE, "Content-Length": str(len(body))}
        )
        with contextlib.suppress(OSError):
            self.wfile.write(body)
        return None, None


METRICS_ROUTES = (("GET", r"/metrics", "metrics", False),)  # the token is checked by the route


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
        *FILE_MANAGER_ROUTES,
        *BACKUP_ROUTES,
        *TRANSFER_ROUTES,
        *METRICS_ROUTES,
    )
)

_CORS_HEADERS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET, POST, PATCH, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Accept, Accept-Encoding, Authorization, Cache-Control, Content-Type, Content-Length, "
        "Origin, X-Real-IP, X-CSRF-Token"
    ),
    "Access-Control-Max-Age": "7200",
}


class TlsWrapper:
    """``api.ssl``: wraps accepted connections in TLS, reloading the certificate when it changes.

    Methods for the caller: ``wrap(sock)`` (no I/O: the handshake runs on the connection's own
    thread), ``load()`` (``ConfigError`` naming the file that cannot be read or used). Class
    variables that may be overridden: ``recheck_s``, ``ciphers``.

    The files are checked at most every ``recheck_s`` seconds (their size, inode and mtime); a
    renewed certificate (certbot replaces both files) is used from the next connection on, and
    a renewal that does not load is logged while the last good certificate stays in use.
    """

    recheck_s = 1.0
    # TLS 1.2 limited to forward-secret AEAD suites; TLS 1.3 suites are OpenSSL's (all modern).
    ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20"

    def __init__(self, cert_path: str, key_path: str):
        self.cert_path, self.key_path = cert_path, key_path
        self._context: ssl.SSLContext | None = None
        self._signature: tuple[Any, ...] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def _files_signature(self) -> tuple[Any, ...]:
        marks = []
        for path in (self.cert_path, self.key_path):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                marks.append((st.st_ino, st.st_size, st.st_mtime_ns))
                continue
            marks.append(None)
        return tuple(marks)

    def load(self) -> ssl.SSLContext:
        """Build a context from the files now; ``ConfigError`` names the file that is wrong."""
        signature = self._files_signature()
        for key, path, marker in (
            ("api.ssl.cert", self.cert_path, b"-----BEGIN CERTIFICATE-----"),
            ("api.ssl.key", self.key_path, b"PRIVATE KEY-----"),
        ):
            try:
                pem = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
            if marker not in pem:
                raise ConfigError(f"{key}: {path} holds no PEM {marker.decode().strip('-')}")
            if key == "api.ssl.key" and b"ENCRYPTED" in pem:  # nobody is there to type a password
                raise ConfigError(f"{key}: {path} is encrypted; give the daemon an unencrypted key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(self.ciphers)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        try:
            # A password callback, so that OpenSSL never prompts on a terminal for one.
            context.load_cert_chain(self.cert_path, self.key_path, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"api.ssl: the certificate {self.cert_path} and key {self.key_path} cannot be"
                f" used together: {getattr(exc, 'reason', None) or exc}"
            ) from None
        with self._lock:
            self._context, self._signature = context, signature
            self._checked_at = time.monotonic()
        return context

    def _current(self) -> ssl.SSLContext:
        with self._lock:
            context = self._context
            due = time.monotonic() - self._checked_at >= self.recheck_s
            if due:
                self._checked_at = time.monotonic()
        if context is None:
            return self.load()
        if due and self._files_signature() != self._signature:
            try:
                context = self.load()
                LOG.info("api.ssl: reloaded the certificate %s", self.cert_path)
            except ConfigError as exc:
                with self._lock:  # logged once per change of the files, not per connection
                    self._signature = self._files_signature()
                LOG.error("api.ssl: keeping the previous certificate: %s", exc.message)
        return context

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        return self._current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


class LogOncePerMinute:
    """One log line per kind of event per minute, saying how many were not logged since.

    For what strangers can cause at will (refused, reset and timed-out connections): a line per
    connection would let them fill the disk and bury everything else in the log.
    """

    interval_s = 60.0

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, unlogged = self._last.get(kind, (-math.inf, 0))
            if now - last < self.interval_s:
                self._last[kind] = (last, unlogged + 1)
                return
            self._last[kind] = (now, 0)
        if unlogged:
            message += f" ({unlogged} more in the minute before)"
        LOG.warning(message, *args)


class _Connection:
    """One accepted API connection as ``ApiServer`` accounts for it.

    ``phase`` is ``headers`` (a request line and headers are due by ``deadline``), ``idle`` (a
    kept-alive connection between requests) or ``busy`` (a request is being answered, or the
    connection carries a websocket). ``cut`` says why the server ended it early, if it did.
    """

    __slots__ = ("cut", "deadline", "ip", "phase", "since", "sock")

    def __init__(self, sock: Any, ip: str, deadline: float):
        self.sock, self.ip = sock, ip
        self.phase, self.since, self.deadline = "headers", time.monotonic(), deadline
        self.cut = ""


def default_max_connections(sftp_connections: int) -> int:
    """API connections allowed when ``wingslite.max_connections`` is 0: the process's soft file
    limit less a reserve for the daemon's own files, Docker and SFTP (a socket and some open
    files per SFTP connection), between 16 and 4096 (each connection is a thread)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - 128 - 4 * sftp_connections))


class ApiServer(http.server.ThreadingHTTPServer):
    """The node's HTTP API server: one thread per connection, bound to ``daemon``.

    Connections are accounted for (``admit_connection`` / ``connection_phase`` /
    ``release_connection``): at most ``max_connections`` are open; at the cap a new one closes the
    connection idle the longest (kept-alive first, then one still sending its first request) and,
    when every connection is busy, is answered ``503`` with ``Retry-After``. A request line and its
    headers must arrive within ``header_timeout_s`` of the connection (or of the first byte of a
    kept-alive request), or the connection is answered ``408`` and closed; a kept-alive
    connection is closed after ``ApiHandler.timeout`` without a request. Refusals, timeouts and
    resets are logged once a minute per kind (``notices``), never a traceback each.

    Class variables that may be overridden: ``daemon_threads``, ``allow_reuse_address``,
    ``request_queue_size``, ``handler_class``, ``retry_after_s``, ``reap_interval_s``.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    retry_after_s = 5
    reap_interval_s = 0.25

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
        config = daemon.config
        self.max_connections = config.get("wingslite.max_connections") or default_max_connections(
            config.get("wingslite.sftp_max_connections")
        )
        self.header_timeout_s = float(config.get("wingslite.header_timeout_s"))
        self.websocket_strangers = PerIpCounter(
            config.get("wingslite.websocket_unauthenticated_per_ip")
        )
        self.notices = LogOncePerMinute()
        self._connections: dict[Any, _Connection] = {}
        self._connections_lock = threading.Lock()
        self._next_reap = 0.0
        super().__init__(address, handler_class or ApiHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        ip = client_address[0] if client_address else "?"
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.notices.log("reset", "API connections reset or timed out mid-request (%s)", ip)
            return
        LOG.exception("unhandled error on a connection from %s", ip)

    # -- connection accounting -----------------------------------------------------------------

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection; with ``api.ssl`` it is wrapped in TLS here (no I/O yet)."""
        try:
            sock, address = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.notices.log("accept", "cannot accept API connections: %s", exc.strerror)
                time.sleep(0.1)  # the listener stays readable: without a pause this loop spins
            raise
        tls = getattr(self.daemon, "tls", None)
        if tls is not None:
            try:
                sock = tls.wrap(sock)
            except (OSError, ValueError, ConfigError) as exc:
                sock.close()
                raise OSError(f"TLS is not available: {exc}") from None
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.admit_connection(request, client_address):
            self.refuse_connection(request, client_address)
            return
        super().process_request(request, client_address)

    def admit_connection(self, sock: Any, client_address: Any) -> bool:
        """Account for a new connection; at the cap, close the idlest one to make room."""
        record = _Connection(sock, client_address[0], time.monotonic() + self.header_timeout_s)
        with self._connections_lock:
            if len(self._connections) >= self.max_connections:
                victim = self._idlest_connection()
                if victim is None:
                    return False
                del self._connections[victim.sock]
                victim.cut = "evicted"
            else:
                victim = None
            self._connections[sock] = record
        if victim is not None:
            self.notices.log(
                "evicted",
                "at the cap of %d API connections (wingslite.max_connections): closing the "
                "longest idle to admit new ones",
                self.max_connections,
            )
            with contextlib.suppress(OSError):
                # the plain socket's shutdown, also under TLS: SSLSocket's own would drop its
                # TLS state under the handler thread still using it
                socket.socket.shutdown(victim.sock, socket.SHUT_RDWR)
        return True

    def _idlest_connection(self) -> _Connection | None:
        for phase in ("idle", "headers"):
            waiting = [c for c in self._connections.values() if c.phase == phase]
            if waiting:
                return min(waiting, key=lambda c: c.since)
        return None

    def refuse_connection(self, sock: Any, client_address: Any) -> None:
        """Answer 503 with ``Retry-After`` without waiting for the request, and close (a TLS
        connection is closed without an answer: it has not had its handshake)."""
        if isinstance(sock, ssl.SSLSocket):
            self.notices.log(
                "refused", "refusing API connections: all %d are busy", self.max_connections
            )
            self.shutdown_request(sock)
            return
        request_id = str(uuidlib.uuid4())
        body = json.dumps(
            {
                "error": f"the node is serving its maximum of {self.max_connections} connections; "
                "try again later",
                "request_id": request_id,
            }
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Retry-After: {self.retry_after_s}\r\nX-Request-Id: {request_id}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            sock.send(head.encode() + body, socket.MSG_DONTWAIT)
            sock.recv(65536, socket.MSG_DONTWAIT)  # unread bytes would turn the close into a reset
        self.notices.log(
            "refused",
            "refusing API connections: all %d are busy (wingslite.max_connections); answered 503",
            self.max_connections,
        )
        self.shutdown_request(sock)

    def connection_record(self, sock: Any) -> _Connection | None:
        with self._connections_lock:
            return self._connections.get(sock)

    def connection_phase(self, sock: Any, phase: str) -> bool:
        """Move a connection to ``phase``; False when the server has already cut it."""
        now = time.monotonic()
        with self._connections_lock:
            record = self._connections.get(sock)
            if record is None or record.cut:
                return False
            record.phase, record.since = phase, now
            record.deadline = now + self.header_timeout_s if phase == "headers" else math.inf
            return True

    def release_connection(self, sock: Any) -> None:
        with self._connections_lock:
            self._connections.pop(sock, None)

    def connection_counts(self) -> dict[str, int]:
        """How many connections are in each phase (for tests, benchmarks and the curious)."""
        with self._connections_lock:
            phases = [c.phase for c in self._connections.values()]
        return {phase: phases.count(phase) for phase in ("headers", "idle", "busy")}

    def shutdown_request(self, request: Any) -> None:
        self.release_connection(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between accepts: cut connections late with their headers."""
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + self.reap_interval_s
        with self._connections_lock:
            late = [c for c in self._connections.values() if c.deadline < now and not c.cut]
            for record in late:
                record.cut = "header timeout"
        for record in late:
            self.notices.log(
                "header timeout",
                "closing API connections that did not send their headers within %.0f s "
                "(wingslite.header_timeout_s), e.g. from %s",
                self.header_timeout_s,
                record.ip,
            )
            # The handler still answers 408 on a plain connection; a TLS session does not
            # survive its reader seeing the end of the stream, so it is closed without one.
            how = socket.SHUT_RDWR if isinstance(record.sock, ssl.SSLSocket) else socket.SHUT_RD
            with contextlib.suppress(OSError):
                socket.socket.shutdown(record.sock, how)

    # -- TLS (api.ssl) -------------------------------------------------------------------------

    tls_handshake_timeout_s = 10.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the connection's own thread, so a slow or broken client
        # never holds up the accept loop; a failed handshake is a debug line, not a traceback.
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.tls_handshake_timeout_s)
                request.do_handshake()
            except (OSError, ValueError) as exc:
                LOG.debug("TLS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)


def framing_problem(version: str, headers: http.client.HTTPMessage) -> str | None:
    """Why a request's framing is refused (RFC 9112 §3.2, §5, §6), or ``None``.

    Any reading of a message that a proxy in front could read differently lets a second request
    hide in the first (request smuggling), so every ambiguity is a 400 and the connection closes.
    """
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return f"{version} requests are not served; send HTTP/1.1"
    # The header parser stops at a line it cannot read as a header (a space before the colon) and
    # keeps the rest as a "body"; defects about a multipart Content-Type's missing body are fine.
    malformed = (email.errors.MissingHeaderBodySeparatorDefect, email.errors.InvalidHeaderDefect)
    rest = headers.get_payload()  # a message/* Content-Type makes it a list of sub-messages
    if any(isinstance(d, malformed) for d in headers.defects) or (isinstance(rest, str) and rest):
        return "a header line is malformed (no name, or whitespace before the colon)"
    if any("\n" in value for value in headers.values()):
        return "a header is folded over several lines (obsolete line folding)"
    lengths = headers.get_all("Content-Length") or []
    if any(not re.fullmatch(r"[0-9]+", value) for value in lengths):
        return "the Content-Length header must be plain digits"
    if len(set(lengths)) > 1:
        return "the request has more than one Content-Length, with different values"
    codings = headers.get_all("Transfer-Encoding") or []
    if codings and (len(codings) > 1 or codings[0].strip().lower() != "chunked"):
        return "Transfer-Encoding other than a single chunked is not supported"
    if codings and version == "HTTP/1.0":
        return "Transfer-Encoding is not allowed in an HTTP/1.0 request"
    hosts = headers.get_all("Host") or []
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        return "an HTTP/1.1 request needs exactly one Host header"
    return None


class ApiHandler(
    FileManagerRoutes,
    BackupRoutes,
    TransferRoutes,
    MetricsRoutes,
    http.server.BaseHTTPRequestHandler,
):
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
        self.requests_served = 0

    # -- connection phases (accounted for by ApiServer) -------------------------------------------

    def handle_one_request(self) -> None:
        self.request_id = ""
        if self.requests_served and not self._await_next_request():
            self.close_connection = True
            return
        super().handle_one_request()
        self.requests_served += 1

    def _await_next_request(self) -> bool:
        """Keep-alive: idle (the first to be closed at the cap) until the next request's first
        byte, which starts its header deadline. False: closed, timed out or cut by the server."""
        if not self.server.connection_phase(self.request, "idle"):
            return False
        try:
            first = self.rfile.peek(1)
        except OSError:  # the idle timeout (``timeout``), a reset, or the server's own cut
            return False
        return bool(first) and self.server.connection_phase(self.request, "headers")

    def parse_request(self) -> bool:
        """http.server's parsing, then RFC 9112's framing rules (``framing_problem``); a request
        whose headers came too late is answered 408."""
        parsed = not self._headers_late() and super().parse_request()
        if self._headers_late():
            self.close_connection = True
            self._error(
                408,
                f"the request headers did not arrive within {self.server.header_timeout_s:.0f} s",
            )
            return False
        if not parsed:
            return False
        problem = framing_problem(self.request_version, self.headers)
        if problem is not None:
            self.send_error(400, problem)
            return False
        return self.server.connection_phase(self.request, "busy")

    def _headers_late(self) -> bool:
        record = self.server.connection_record(self.request)
        return record is None or record.cut == "header timeout"

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long) as JSON, never HTML,
        with a request id like every other error."""
        if code == 501 and getattr(self, "command", None):
            # A method with no ``do_`` method: answered as any route answers one it does not
            # take (405 with Allow, or 404), never 501.
            return self._dispatch(self.command)
        self.close_connection = True
        self._error(code, message or http.HTTPStatus(code).phrase)

    def _respond(
        self, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head_only = getattr(self, "command", None) == "HEAD"  # GET's headers, no body
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
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            self.wfile.write(head if head_only else head + payload)
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
        self.request_id = self.request_id or str(uuidlib.uuid4())
        self._respond(status, {"error": message, "request_id": self.request_id})

    def do_OPTIONS(self) -> None:
        self.request_id = str(uuidlib.uuid4())
        self.body_read = False
        # a preflight's body, if any, must not be read as the next request
        self._drain_unread_body()
        self._respond(204)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

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
            routed = "GET" if method == "HEAD" else method  # HEAD: every GET route, no body
            chosen = next(
                ((match, name, auth) for m, match, name, auth in matches if m == routed), None
            )
            if chosen is None or chosen[2]:
                self._authorize()  # as Wings: unknown routes answer 401 to strangers, not 404
            if chosen is None:
                if matches:
                    methods = {m for m, *_ in matches}
                    raise MethodNotAllowed(
                        method, path, methods | ({"HEAD"} if "GET" in methods else set())
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
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else dict(exc.headers)
            self._respond(
                exc.status, {"error": exc.message, "request_id": self.request_id}, headers
            )
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            # Almost always the client going away mid-body: a line a minute, not a traceback each.
            self.server.notices.log(
                "reset",
                "API connections reset or timed out mid-request (%s)",
                self.client_address[0],
            )
            self.close_connection = True
            self._error(500, "the connection was reset or timed out while the request was read")
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
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._drain_chunked(65536)
        elif length < 0 or length > 65536:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _drain_chunked(self, most_bytes: int) -> None:
        """Read a small chunked body to its end, so an error reaches a client still sending it
        (closing with unread bytes would reset the connection and lose the answer)."""
        read, seen = chunked_reader(self.rfile), 0
        try:
            while seen <= most_bytes:
                data = read(65536)
                if not data:
                    return
                seen += len(data)
        except (BadRequest, OSError):
            pass
        self.close_connection = True

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
            or not is_server_uuid(body["uuid"])
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
                "The power action provided was not valid, should be one of "
                '"stop", "start", "restart", "kill"',
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
            "the Panel pushed a node configuration; it is not applied: edit %s and restart "
            "wingslite",
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


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Compiling this file when it runs as a script (about 20 MB of parser memory) and reading the
    Panel's server pages at boot leave the heap large but mostly free; glibc keeps such pages
    until told otherwise, and an idle node would carry them for its whole life.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


def _process_changes(new: ProcessConfig, old: ProcessConfig) -> dict[str, str]:
    """What a changed process configuration leaves for the next start, config files by name
    (they are rewritten by every start: ``Server._update_config_files``)."""
    changes = {}
    if new.configs != old.configs:
        names = ", ".join(dict.fromkeys(cf.file for cf in new.configs)) or "none"
        changes["configs"] = f"egg config files ({names})"
    if dataclasses.replace(new, configs=()) != dataclasses.replace(old, configs=()):
        changes["process"] = "process configuration (stop command, done lines)"
    return changes


class Server:
    """One game server on this node: its configuration, files, process and sessions' owner.

    Methods for the caller: ``sync()`` (fetch from the Panel and apply), ``apply(config)``,
    ``refuse(document_error)`` (record a refused document; the configuration stays),
    ``power(action, wait_s)`` / ``request_power(...)``, ``request_install(reinstall)`` /
    ``install(reinstall)``, ``ensure_file_owner()``, ``send_command(line)``, ``logs(n)``,
    ``api_view()``. ``installing`` is true while an install runs (power actions answer 409).

    Two re-entrant locks with different jobs (different servers never share one):

    ``config_lock``  guards ``config``: held for one sync alone (the Panel GET, validation, save,
                     swap, live limits, closing sessions), by a delete, and by a start for the
                     moments it reads the configuration it creates the container from and then
                     catches up with syncs that landed meanwhile. Never across a stop, a pull or
                     a start's wait, so a sync answers within one Panel round trip.
    ``power_lock``   serialises power actions (start, stop, restart). A sync, a suspension and a
                     delete never wait for it (the Panel gives up after 15 s,
                     ``SuspensionService::toggle`` then rolls a suspension back).
                     ``lock`` is the same object. An install claims the server under it
                     (sets ``installing``) and runs without it, so a suspension can cancel it.
    """

    def __init__(self, daemon: Daemon, config: ServerConfig):
        self.daemon = daemon
        self.uuid = config.uuid
        self.config = config
        self.config_lock = threading.RLock()
        self.power_lock = self.lock = threading.RLock()
        # The configuration a start is creating the container from (set and cleared under
        # ``config_lock``): a sync landing meanwhile knows that limits and a suspension must
        # reach a container that does not exist yet.
        self._start_config: ServerConfig | None = None
        self.events = EventBus()
        self.console = LogRing(daemon.config.get("system.websocket_log_count"))
        self.fs = Filesystem(
            daemon.config.data_dir / config.uuid,
            config.disk_limit_bytes,
            daemon.config.get("system.disk_check_interval"),
            quota=daemon.quota,
            owner=daemon.file_owner,
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
        # Set (under ``config_lock``) when the server leaves this node. A deleted server counts as
        # suspended, as in Wings, so a socket or SFTP login racing the delete is refused, and a
        # sync or power action queued behind the delete does nothing.
        self.deleted = False
        # True while the server's files are on their way to or from another node (transfers):
        # power actions and SFTP logins are refused.
        self.transferring = False
        self._restoring = threading.Lock()  # held while a backup is restored (begin_restore)
        self.events.subscribe(self._on_event)
        self.metrics = ServerMetrics()
        self.env: Environment = daemon.environment_factory(self)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.env.state

    @property
    def suspended(self) -> bool:
        return self.config.suspended or self.deleted

    @property
    def restoring(self) -> bool:
        return self._restoring.locked()

    def begin_restore(self) -> bool:
        """Mark the server restoring (power actions answer 409); False when it already is."""
        return self._restoring.acquire(blocking=False)

    def end_restore(self) -> None:
        self._restoring.release()

    def console_message(self, text: str) -> None:
        """A daemon line on the server's console (seen by websockets and in the log ring)."""
        self.events.publish(
            "console output", daemon_message(text, configured_app_name(self.daemon.config))
        )

    def _on_event(self, event: str, *args: Any) -> None:
        if event == "console output" and args:
            self.console.append(args[0])
        elif event == "status" and args:
            previous, self._last_state = self._last_state, args[0]
            self.daemon.record_state(self.uuid, args[0])
            # Crash detection only counts starting/running -> offline; every intentional stop
            # passes through "stopping" first (Wings server/listeners.go).
            if args[0] == OFFLINE and previous in (STARTING, RUNNING):
                spawn(self._handle_crash, name=f"wingslite-crash-{self.uuid[:8]}")
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
            spawn(self._stop_over_disk_limit, name=f"wingslite-disk-{self.uuid[:8]}")

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
        """Re-read this server from the Panel and make the node match it (README, "The sync, step
        by step").

        Waits for nothing but ``config_lock``: a start or a stop in progress is not waited for.
        """
        with self.config_lock:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            return self.apply(self._fetch_document())

    def _fetch_document(self) -> ServerConfig:
        """The Panel's document for this server, validated. A refusal is recorded; nothing
        changes."""
        try:
            document = self.daemon.panel.get_server(self.uuid)
        except PanelError as exc:
            if exc.http_status == 404:
                raise NotFound(
                    f"the Panel no longer knows server {self.uuid} (it answered 404); "
                    "nothing on this node was changed"
                ) from None
            raise WingsliteError(
                f"could not fetch server {self.uuid} from the Panel: {exc.message}; "
                "nothing on this node was changed"
            ) from None
        try:
            return self.daemon.parse_document(document, expect_uuid=self.uuid)
        except DocumentError as exc:
            self.refuse(exc)
            raise WingsliteError(f"{exc.message}; nothing on this node was changed") from None

    def refuse(self, exc: DocumentError) -> None:
        """Record a Panel document the node refused: the server keeps its last configuration."""
        LOG.error(
            "refused the Panel's document for server %s: %s; keeping its last configuration",
            self.uuid,
            exc.detail,
        )
        self.last_sync = {
            "at": _now_iso(),
            "result": "refused",
            "applied": [],
            "pending": [],
            "failed": [f"refused the Panel's document: {exc.detail}"],
            "notes": ["the server keeps its last configuration"],
            "duration_ms": 0,
        }

    def apply(self, new: ServerConfig) -> dict[str, Any]:
        """Swap in a validated configuration and apply it; the record says what happened.

        One step per phase. A step failing after the swap keeps the new configuration (the Panel
        is the source of truth); the record and the error name what was not applied.
        """
        with self.config_lock:
            started = time.monotonic()
            old = self._swap(new)
            report = LimitReport()
            self._apply_disk(new, old, report)
            self._apply_limits(new, old, report)
            self._note_next_start(new, old, report)
            self._apply_suspension(new, report)
            return self._record(new, report, started)

    def _swap(self, new: ServerConfig) -> ServerConfig:
        """Persist, then swap (so a failed save changes nothing); returns the old configuration."""
        if self.deleted:
            raise NotFound("The requested resource does not exist on this instance.")
        try:
            self.daemon.store.save(new)
        except OSError as exc:
            raise WingsliteError(
                f"could not save the configuration of server {self.uuid}: {exc}; "
                "nothing on this node was changed"
            ) from None
        old, self.config = self.config, new
        return old

    def _apply_disk(self, new: ServerConfig, old: ServerConfig, report: LimitReport) -> None:
        try:
            disk_notes = self.fs.set_limit(new.disk_limit_bytes)
            report.applied.append(
                f"disk limit {new.disk_limit_bytes} bytes"
                if new.disk_limit_bytes
                else "disk limit removed"
            )
            report.applied.extend(disk_notes)  # e.g. usage over the new limit, soft for this server
        except Exception as exc:  # a quota tool failing must not undo the swap
            LOG.exception("server %s: setting the disk limit failed", self.uuid)
            report.failed.append(f"disk limit: {exc}")
        if new.file_denylist != old.file_denylist:
            self.fs.set_denylist(new.file_denylist)

    def _apply_limits(self, new: ServerConfig, old: ServerConfig, report: LimitReport) -> None:
        """Resource limits onto the container now; a container being created gets them later."""
        if new.build == old.build and not self._limits_pending:
            return
        if self._start_config is not None:
            # A start is creating the container from the configuration it read before this sync;
            # ``_finish_start`` applies these limits to it once it exists.
            report.applied.append("resource limits: for the container being started (once made)")
            return
        try:
            limits = self.env.apply_limits(new)
        except Exception as exc:
            LOG.exception("server %s: applying resource limits failed", self.uuid)
            limits = LimitReport(failed=[f"resource limits: {exc}"])
        report.applied += limits.applied
        report.pending += limits.pending
        report.failed += limits.failed
        self._limits_pending = bool(limits.failed or limits.pending)
        if self._limits_pending:
            self.pending_next_start["resource limits"] = "resource limits"

    def _note_next_start(self, new: ServerConfig, old: ServerConfig, report: LimitReport) -> None:
        """What only a new container can carry: stored now, listed as pending until the start."""
        for field, label in _NEXT_START_FIELDS:
            if getattr(new, field) != getattr(old, field):
                self.pending_next_start[field] = label
        self.pending_next_start.update(_process_changes(new.process, old.process))
        report.pending += [
            f"{label} (next start)"
            for label in self.pending_next_start.values()
            if label != "resource limits"
        ]
        if new.crash_detection_enabled != old.crash_detection_enabled:
            report.applied.append(
                f"crash detection {'on' if new.crash_detection_enabled else 'off'} (next exit)"
            )

    def _apply_suspension(self, new: ServerConfig, report: LimitReport) -> None:
        """Close every session before the answer; abandon a start, or stop the process."""
        if not new.suspended:
            return
        closing_started = time.monotonic()
        closed = self.daemon.sessions.close_server(self.uuid, CLOSE_SUSPENDED, "server suspended")
        report.applied.append(f"suspended: {closed} session(s) closed")
        LOG.info(
            "server %s: %d session(s) closed in %.1f ms",
            self.uuid,
            closed,
            (time.monotonic() - closing_started) * 1000,
        )
        if self.installing:
            report.applied.append("suspended: the install is cancelled")
            spawn(self.env.abort_install, name=f"wingslite-abort-install-{self.uuid[:8]}")
        if self._start_config is not None or self.env.state == STARTING:
            report.applied.append("suspended: the start in progress is abandoned")
            target, name = self._abandon_start, "abandon"
        elif self.env.state != OFFLINE:
            report.applied.append("suspended: stopping the process")
            target, name = self._stop_suspended, "suspend"
        else:
            return
        spawn(target, name=f"wingslite-{name}-{self.uuid[:8]}")

    def _record(self, new: ServerConfig, report: LimitReport, started: float) -> dict[str, Any]:
        """Keep and log what the sync did; a step that failed makes the answer a 500."""
        record = {
            "at": _now_iso(),
            "result": "failed" if report.failed else "ok",
            "applied": report.applied,
            "pending": report.pending,
            "failed": report.failed,
            "notes": list(new.notes),
            "duration_ms": round((time.monotonic() - started) * 1000, 2),
        }
        self.last_sync = record
        LOG.info(
            "server %s synced: applied %s; pending %s; failed %s%s",
            self.uuid,
            report.applied,
            report.pending or "nothing",
            report.failed or "nothing",
            f"; notes {list(new.notes)}" if new.notes else "",
        )
        if report.failed:
            raise WingsliteError(
                f"the configuration of server {self.uuid} was updated, but not all of it was "
                f"applied: {'; '.join(report.failed)}"
            )
        return record

    def _stop_suspended(self) -> None:
        """A graceful stop that becomes a kill after ``wingslite.suspend_stop_grace_s``.

        A stop already in progress (its own timeout up to ``wingslite.stop_timeout_s``) is
        escalated the same way: both wait for the same exit, this one kills sooner.
        """
        try:
            self.console_message("Server is suspended: stopping the process.")
            self.env.stop(self.config, self.daemon.config.get("wingslite.suspend_stop_grace_s"))
        except Exception:
            LOG.exception("server %s: stopping the suspended server failed", self.uuid)

    def _abandon_start(self) -> None:
        """Kill the container of a start that a suspension or a delete overtook."""
        try:
            if self.deleted:
                self.env.destroy()
            else:
                self.env.kill()
        except Exception:
            LOG.exception("server %s: abandoning the start failed", self.uuid)

    # -- power ---------------------------------------------------------------------------------

    def request_power(self, action: str, wait_s: float = 0) -> None:
        """The HTTP form: refuse what is refused now, then run the action in the background
        (202)."""
        if action in ("start", "restart") and self.config.suspended:
            raise BadRequest("Cannot start or restart a server that is suspended.")
        if self.installing:
            raise Conflict("server is currently installing")
        if self.transferring:
            raise Conflict("server is currently being transferred")
        if self.restoring:
            raise Conflict("server is currently restoring")
        spawn(self._power_logged, action, wait_s, name=f"wingslite-power-{self.uuid[:8]}")

    def _power_logged(self, action: str, wait_s: float) -> None:
        try:
            self.power(action, wait_s)
        except WingsliteError as exc:
            LOG.error("server %s: power action %s failed: %s", self.uuid, action, exc.message)
        except Exception:
            LOG.exception("server %s: power action %s failed", self.uuid, action)

    def power(self, action: str, wait_s: float = 0) -> None:
        """Run a power action now under ``power_lock``. ``wait_s`` 0 tries the lock once (as
        Wings); kill never waits."""
        if self.installing:  # kill too, as Wings (server/power.go)
            raise Conflict("server is currently installing")
        if self.transferring:  # Wings power.go: even a kill is refused
            raise Conflict("server is currently being transferred")
        if self.restoring:  # Wings server/power.go: every action is refused while restoring
            raise Conflict("server is currently restoring")
        if action == "kill":
            self.env.kill()
            return
        if action not in ("start", "stop", "restart"):
            raise WingsliteError(f"attempting to handle unknown power action {action!r}", 422)
        if action == "start" and not self.config.suspended and self.env.state == OFFLINE:
            # The slow part of a start (pulling the image) runs before the lock is taken, so that
            # the next power action is not kept waiting behind a download.
            try:
                self.env.prepare(self.config)
            except Exception as exc:  # the start itself, under the lock, reports what is wrong
                LOG.debug("server %s: preparing the start failed: %s", self.uuid, exc)
        lock = self.power_lock
        acquired = lock.acquire(timeout=wait_s) if wait_s > 0 else lock.acquire(blocking=False)
        if not acquired:
            raise Conflict(
                "another power action is currently being processed for this server, "
                "please try again later"
            )
        try:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            if self.installing:  # an install claimed the server while this waited for the lock
                raise Conflict("server is currently installing")
            if self.transferring:
                raise Conflict("server is currently being transferred")
            if action in ("stop", "restart"):
                self.env.stop(self.config, self.daemon.config.get("wingslite.stop_timeout_s"))
            if action in ("start", "restart"):
                self._start()
        finally:
            lock.release()

    def _start(self) -> None:
        """Sync, check the disk, create and start the container from the configuration read under
        ``config_lock``, then let syncs that landed meanwhile reach it (``_finish_start``)."""
        if self.env.state != OFFLINE:
            raise Conflict("the server is already running")
        self._sync_for_start()
        self._check_disk_for_start()
        config = self._claim_start()
        try:
            self._update_config_files(config)
            if self.daemon.config.get("system.check_permissions_on_boot"):
                self.ensure_file_owner()
            self.env.start(config)
        except BaseException:
            self._finish_start(config, started=False)
            raise
        overtaken = self._finish_start(config, started=True)
        if overtaken:
            raise Conflict(f"the start was abandoned: the server was {overtaken} meanwhile")

    def _sync_for_start(self) -> None:
        try:
            self.sync()  # every start runs the sync first: the Panel is the source of truth
        except WingsliteError as exc:
            self.console_message(
                f"Unable to sync server data from the Panel, the start was aborted: {exc.message}"
            )
            raise WingsliteError(
                f"unable to sync server data from Panel instance: {exc.message}", exc.status
            ) from None
        self.fs.ensure()  # before Docker would make the directory itself (not as a quota subvolume)

    def _check_disk_for_start(self) -> None:
        if not self.fs.limit_bytes:
            return
        self.console_message("Checking server disk space usage, this could take a few seconds...")
        # A kernel quota's own figure is cheap and exact; otherwise walk now (not the cached
        # figure).
        if self.fs.quota.enforced(self.fs.root):
            over = not self.fs.has_space()
        else:
            over = self.fs.recalculate() > self.fs.limit_bytes
        if over:
            self.console_message("Not enough disk space is available to start this server.")
            raise WingsliteError(
                "There is not enough disk space available to perform that action.", 400
            )

    def _claim_start(self) -> ServerConfig:
        """The configuration the container is created from, read under ``config_lock``."""
        with self.config_lock:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            if self.config.suspended:
                self.console_message("This server is suspended and cannot be started.")
                raise BadRequest("server is currently in a suspended state")
            self._start_config = self.config
            return self.config

    def _finish_start(self, started_with: ServerConfig, started: bool) -> str:
        """Catch up with syncs that landed while the container was made; ``"suspended"`` or
        ``"deleted"`` when one of those overtook the start (its container is then killed)."""
        with self.config_lock:
            self._start_config = None
            overtaken = "deleted" if self.deleted else "suspended" if self.config.suspended else ""
            if started and not overtaken:
                self._catch_up(started_with, self.config)
        if overtaken:
            self._abandon_start()
            if self.deleted:  # a directory the start made again after the delete removed it
                _remove_tree(self.fs.root)
        return overtaken

    def _catch_up(self, started_with: ServerConfig, current: ServerConfig) -> None:
        """Under ``config_lock``: the new container carries ``started_with``; bring it to
        ``current`` and list what only a later start can carry."""
        self.pending_next_start = {
            field: label
            for field, label in _NEXT_START_FIELDS
            if getattr(current, field) != getattr(started_with, field)
        }
        self.pending_next_start.update(_process_changes(current.process, started_with.process))
        self._limits_pending = False
        if current.build == started_with.build:
            return
        try:
            report = self.env.apply_limits(current)
        except Exception as exc:
            report = LimitReport(failed=[f"resource limits: {exc}"])
        LOG.info(
            "server %s: limits synced during its start, applied to the new container: %s%s",
            self.uuid,
            report.applied,
            f"; failed {report.failed}" if report.failed else "",
        )
        if report.failed or report.pending:
            self._limits_pending = True
            self.pending_next_start["resource limits"] = "resource limits"

    def _update_config_files(self, config: ServerConfig) -> None:
        """Write the Panel's values into the egg's config files (Wings server/config_parser.go).

        A file that cannot be updated is reported on the console; the start goes on, as in Wings.
        """
        self.console_message("Updating process configuration files...")
        if not config.process.configs:
            return
        with Jail(self.fs.root, owner=self.fs.owner) as jail:
            writer = ConfigFileWriter(
                jail,
                self.daemon.placeholders,
                self.fs,
                owner=self.fs.owner,
            )
            writer.apply(config.process.configs, self.console_message)

    def _handle_crash(self) -> None:
        """Restart a crashed server once per ``crash_detection.timeout`` window (Wings
        server/crash.go)."""
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

    chown_budget_s = 60.0  # a tree bigger than this walk is left partly unchanged (and logged)

    def ensure_file_owner(self) -> None:
        """Give the server's files to the node user (before a start and after an install)."""
        if self.fs.owner is None:
            return  # a daemon that is not root cannot give files away
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

    # -- installation ----------------------------------------------------------------------------

    def request_install(self, reinstall: bool = False, *, start_after: bool = False) -> None:
        """Claim the server for an install and run it in the background (create, ``/install``,
        ``/reinstall``). 409 while a power action holds the lock or another install runs.

        A reinstall first stops the process (10 s, then killed) and syncs, as Wings ``Reinstall``.
        """
        if not self.power_lock.acquire(blocking=False):
            raise Conflict(
                "Cannot execute server reinstall event while another power action is running."
            )
        try:
            if self.deleted:
                raise NotFound("The requested resource does not exist on this instance.")
            if self.installing:
                raise Conflict("server is currently installing")
            if self.restoring:
                raise Conflict("server is currently restoring")
            if self.transferring:
                raise Conflict("server is currently being transferred")
            self.installing = True
        finally:
            self.power_lock.release()
        spawn(
            self._install_in_background,
            reinstall,
            start_after,
            name=f"wingslite-install-{self.uuid[:8]}",
        )

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
        self.metrics.count("install")
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
        except Exception as exc:  # e.g. the directory cannot be made: the Panel is still told
            LOG.exception("server %s: the installation failed", self.uuid)
            error = f"{type(exc).__name__}: {exc}"
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
        exit_code = self.env.install(
            self.config,
            script,
            on_output,
            log_path,
            cancelled=lambda: self.deleted or self.config.suspended,
        )
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

    def record_activity(
        self, event: str, user_uuid: str | None, ip: str | None, metadata: Any = None
    ) -> None:
        """Queue an activity event of this server for the Panel (``ActivityLog.record``)."""
        self.daemon.activity.record(self.uuid, event, user_uuid, ip, metadata)

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
        self.backups = Backups(self)
        self.placeholders = NodePlaceholders(config)
        self.transfers = Transfers(self)
        self.signed_urls = SignedUrls(lambda: self.config.token, self.revocations)
        self.pulls = Pulls()
        self.store = ConfigStore(config.root_dir / "wingslite" / "servers")
        self.installs = InstallRecords(config.root_dir / "wingslite" / "installs")
        self.node_user = resolve_node_user(config)
        # Only root can give files away; a daemon run as the node user itself owns them anyway.
        user = self.node_user
        can_chown = os.geteuid() == 0 or user.uid == os.geteuid()
        self.file_owner: tuple[int, int] | None = (user.uid, user.gid) if can_chown else None
        self.activity = ActivityLog(
            config.root_dir / "wingslite" / "activity.db",
            self.panel,
            config.get("system.activity_send_interval"),
            config.get("system.activity_send_count"),
        )
        self.http: ApiServer | None = None
        self.tls: TlsWrapper | None = None
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
        if self.config.get("api.ssl.enabled"):
            self.tls = TlsWrapper(self.config.get("api.ssl.cert"), self.config.get("api.ssl.key"))
            self.tls.load()  # a certificate that cannot be used stops the start, naming the file
        self.http = ApiServer((host, port), self)
        self._spawn(lambda: self.http.serve_forever(poll_interval=0.1), "wingslite-http")
        LOG.info(
            "wingslite %s serving the API on %s://%s:%d",
            VERSION,
            "https" if self.tls else "http",
            host,
            self.http.server_address[1],
        )
        user = self.node_user
        # One line at every start, not a warning: a node without the user works, as Wings does
        # in a container.
        LOG.info(
            "servers' files belong to %d:%d (%s)%s",
            user.uid,
            user.gid,
            user.note,
            ""
            if user.exists
            else f"; no user with uid {user.uid} exists on this host: "
            f"files and containers use {user.uid}:{user.gid} as numbers",
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
        self.activity.start()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        self._threads.append(spawn(target, name=name))

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
        self.activity.stop()
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
        for uuid, document in self.store.load_all():
            try:
                config = self.parse_document(document, expect_uuid=uuid)
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
                    "could not load the servers from the Panel (%s); serving the last saved "
                    "configurations, retrying in %.0fs",
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
        try:
            self.backups.recover()  # backups a restart interrupted: files removed, Panel told
        except Exception:
            LOG.exception("cleaning up interrupted backups failed")
        release_free_heap()
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
        seen = set()
        for item in items:
            uuid = self._load_listed(item)
            if uuid:
                seen.add(uuid)
        # Only a server absent from the list is dropped; one whose document was refused is listed.
        for uuid in (known_before & set(self.servers)) - seen:
            LOG.warning(
                "server %s is no longer on this node according to the Panel; dropping it", uuid
            )
            server = self.servers[uuid]
            with server.config_lock:  # as a delete: sessions end, nothing queued brings it back
                server.deleted = True
                self.sessions.close_server(uuid, CLOSE_GOING_AWAY, "server removed from this node")
                self._forget(server)

    def _load_listed(self, item: Any) -> str:
        """Add or update one server of the Panel's list; its uuid ("" when it has none).

        A document the node refuses leaves a known server on its last configuration.
        """
        listed = item.get("uuid") if isinstance(item, dict) else None
        settings = item.get("settings") if isinstance(item, dict) else None
        if isinstance(settings, dict) and isinstance(settings.get("uuid"), str):
            listed = settings["uuid"]
        listed = listed if isinstance(listed, str) and is_server_uuid(listed) else ""
        existing = self.servers.get(listed) if listed else None
        try:
            if not isinstance(item, dict):
                raise DocumentError("a list item is not an object")
            document = {
                "settings": settings,
                "process_configuration": item.get("process_configuration"),
            }
            config = self.parse_document(document)
        except DocumentError as exc:
            if existing is not None:
                existing.refuse(exc)
            else:
                LOG.error("skipping a server the Panel listed: %s", exc.message)
            return listed
        try:
            if existing is None:
                self.store.save(config)
                self._add(Server(self, config))
            elif config.document != existing.config.document:
                existing.apply(config)
        except Exception as exc:  # one server's fault never stops the boot
            LOG.error("server %s: could not be loaded: %s", config.uuid, exc)
        return config.uuid

    def parse_document(self, document: Any, expect_uuid: str | None = None) -> ServerConfig:
        """``parse_server_document`` with this node's defaults (crash detection, host CPUs)."""
        return parse_server_document(
            document,
            expect_uuid=expect_uuid,
            crash_detection_default=self.config.get("system.crash_detection.enabled"),
            host_cpus=os.cpu_count() or 1,
        )

    def _add(self, server: Server) -> None:
        with self._servers_lock:  # one created meanwhile (POST /api/servers) is the one kept
            self.servers.setdefault(server.uuid, server)

    def _forget(self, server: Server) -> None:
        """Take a server (marked deleted, its config lock held) off the node: no object, no saved
        configuration."""
        with self._servers_lock:
            self.servers.pop(server.uuid, None)
        self.pulls.cancel(server.uuid)
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
        """``POST /api/servers/:server/sync``: waits for the server's configuration lock only
        (a sync before it, one Panel round trip), never for a power action."""
        if not server.config_lock.acquire(timeout=self._config_lock_wait_s()):
            raise Conflict("another sync is still running on this server; try again")
        try:
            with server.metrics.timed_sync():
                return server.sync()
        finally:
            server.config_lock.release()

    def _config_lock_wait_s(self) -> float:
        # Whoever holds a configuration lock holds it for at most one Panel call.
        return max(1.0, float(self.config.get("remote_query.timeout")))

    def create_server(self, uuid: str, start_on_completion: bool = False) -> Server:
        """``POST /api/servers``: fetch the configuration, make the directory, register the server,
        then install it in the background (and start it after, when asked).

        For a server the node already has, this is a sync (Wings answers 202 too): the Panel
        force-deletes a server whose create call fails, so a 409 here would lose it. It is
        installed only if no install of it ever succeeded and none runs now.
        """
        existing = self.servers.get(uuid)
        if existing is not None:
            self.sync_server(existing)
            self._install_unless_installed(existing, start_on_completion)
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
            config = self.parse_document(document, expect_uuid=uuid)
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
            # A create (or the boot's list) that raced this one won: it is the same server.
            raced = self.servers.setdefault(uuid, server)
        if raced is server:
            LOG.info("server %s created", uuid)
        self._install_unless_installed(raced, start_on_completion)
        return raced

    def _install_unless_installed(self, server: Server, start_on_completion: bool) -> None:
        """Install a server no install ever succeeded for (never over an installed server's
        files)."""
        if self.installs.installed(server.uuid) or server.installing:
            return
        try:
            server.request_install(start_after=start_on_completion)
        except Conflict as exc:  # an install or a power action got there first: it stands
            LOG.info("server %s: not installed now: %s", server.uuid, exc.message)

    def receive_server(self, uuid: str) -> Server:
        """A server arriving by transfer: its configuration from the Panel, marked transferring.

        Registered (so that ``DELETE /api/transfers/:server`` finds it) but not saved until
        ``adopt_received``; a node that has the server already refuses it (409).
        """
        if uuid in self.servers:
            raise Conflict(f"server {uuid} already exists on this node; the transfer is refused")
        server = Server(self, self._fetch_config(uuid))
        server.transferring = True
        with self._servers_lock:
            if uuid in self.servers:
                raise Conflict(
                    f"server {uuid} already exists on this node; the transfer is refused"
                )
            self.servers[uuid] = server
        return server

    def adopt_received(self, server: Server) -> None:
        """Keep a server whose files arrived whole: its configuration is saved like a create's.
        It counts as installed: a later ``POST /api/servers`` never reinstalls over its files."""
        self.store.save(server.config)
        self.installs.write(server.uuid, "installed", False)

    def drop_received(self, server: Server) -> None:
        """Forget a server whose transfer failed, and every byte of it that arrived."""
        with server.lock:
            server.deleted = True
            self.sessions.close_server(server.uuid, CLOSE_GOING_AWAY, "transfer failed")
            self._forget(server)
        _remove_tree(server.fs.root)

    def _fetch_config(self, uuid: str) -> ServerConfig:
        try:
            document = self.panel.get_server(uuid)
        except PanelError as exc:
            if exc.http_status == 404:
                raise NotFound(f"the Panel does not know server {uuid}") from None
            raise WingsliteError(
                f"could not fetch server {uuid} from the Panel: {exc.message}"
            ) from None
        try:
            return self.parse_document(document, expect_uuid=uuid)
        except DocumentError as exc:
            raise WingsliteError(exc.message) from None

    def delete_server(self, server: Server) -> None:
        """``DELETE /api/servers/:server``: close its sessions, remove its container, files, config.

        Takes the configuration lock, never the power lock: a stop or a start in progress ends
        when its container is removed, and recreates nothing (``Server._finish_start``).
        """
        if not server.config_lock.acquire(timeout=self._config_lock_wait_s()):
            raise Conflict("a sync is still running on this server; try again")
        try:
            if server.deleted:  # a second DELETE that waited behind the first
                raise NotFound("The requested resource does not exist on this instance.")
            server.deleted = (
                True  # before closing: a socket registering now sees it and closes itself
            )
            self.sessions.close_server(server.uuid, CLOSE_GOING_AWAY, "server deleted")
            server.env.abort_install()  # before the files go: the installer writes into them
            if (
                server.transferring
            ):  # the Panel deletes a transferred server here (Wings: "completed")
                server.events.publish("transfer status", "completed")
            try:
                server.env.destroy()
            except Exception:
                # as Wings: the server stays on the node when its container cannot be removed
                server.deleted = False
                raise
            self._forget(server)
        finally:
            server.config_lock.release()
        spawn(_remove_tree, server.fs.root, name="wingslite-rm")
        LOG.info("server %s deleted", server.uuid)

    def deauthorize_user(self, user_uuid: str, server_uuids: list[str] | None = None) -> int:
        """Close a user's websockets and SFTP sessions now and refuse their older tokens."""
        self.revocations.revoke_user(user_uuid, server_uuids)
        return self.sessions.close_user(
            user_uuid, server_uuids, CLOSE_UNAUTHORIZED, "access revoked"
        )

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


# Panel stand-in ###################################################################################

_DEMO_EGG_PROCESS = {
    "startup": {"done": ["Server ready"], "user_interaction": [], "strip_ansi": False},
    "stop": {"type": "command", "value": "stop"},
    "configs": [],
}


def demo_document(
    uuid: str, name: str, memory_mb: int, image: str = "wingslite-test:latest"
) -> dict[str, Any]:
    """A server document shaped as the Panel builds it (Panel:
    ``ServerConfigurationStructureService`` and ``EggConfigurationService``), running a shell
    loop that answers ``stop``."""
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


class PanelRequest(NamedTuple):
    """One request the stand-in received. ``body`` is the parsed JSON (None when empty or not
    JSON); ``raw`` the bytes as sent."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    raw: bytes


class PanelRoute(NamedTuple):
    """``method`` and a ``path`` regex (matched whole; named groups become keyword arguments) ->
    the stand-in's ``route_<name>(handler, request, **groups)``; ``auth`` routes need the node's
    Bearer token and are subject to the failure switches."""

    method: str
    path: str
    name: str
    auth: bool = True


class PanelStandInHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP exchange with a ``PanelStandIn``, reached as ``self.server.panel``."""

    protocol_version = "HTTP/1.1"
    server: _PanelStandInServer

    def setup(self) -> None:
        super().setup()
        # Answers are small and written at once: without NODELAY, Nagle's algorithm and the
        # client's delayed ACK can hold an answer back for 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.panel.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.panel.handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.panel.handle(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.panel.handle(self, "DELETE")

    def send_json(
        self, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer ``status`` with ``body`` as the Panel encodes it (no body when None)."""
        if body is None:
            return self.send_bytes(status, b"", None, headers)
        self.send_bytes(status, self.server.panel.encode(body), "application/json", headers)

    def send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str | None = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer in one write (status line, headers and body together)."""
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        if content_type:
            head.append(f"Content-Type: {content_type}")
        head.append(f"Content-Length: {len(data)}")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)


class _PanelStandInServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a booting node fetches many pages at once

    def __init__(self, address: tuple[str, int], panel: PanelStandIn):
        self.panel = panel
        super().__init__(address, PanelStandInHandler)


def _panel_error(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The Panel's error envelope (Panel: ``app/Exceptions/Handler.php``): status is a string."""
    return {"errors": [{"code": code, "status": str(status), "detail": detail, **extra}]}


_ANY_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")  # Laravel's uuid


def _is_ip(text: Any) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _invalid(field: str, rule: str, detail: str) -> tuple[int, dict[str, Any]]:
    """A Laravel validation failure: 422 with one entry naming the field and the rule."""
    meta = {"source_field": field, "rule": rule}
    return 422, _panel_error(422, "ValidationException", detail, meta=meta)


# The Panel's answers to SFTP logins of servers in a state that forbids them (Panel:
# ``Server::validateCurrentState()``), by ``servers.status``.
_STATE_CONFLICTS = {
    "suspended": "This server is currently suspended and the functionality requested is "
    "unavailable.",
    "installing": "This server has not yet completed its installation process, please try "
    "again later.",
    "install_failed": "This server has not yet completed its installation process, please try "
    "again later.",
    "restoring_backup": "This server is currently restoring from a backup, please try again later.",
    "transferring": "This server is currently being transferred to a new machine, please try "
    "again later.",
}
_SERVER = r"/api/remote/servers/(?P<ident>[^/]+)"
_BACKUP = r"/api/remote/backups/(?P<backup>[^/]+)"


class PanelStandIn:
    """The Panel's remote API on loopback (Panel: ``routes/api-remote.php``), for the demo, the
    tests and the benchmarks: every route Wings calls, answering as the Panel's controllers do.

    State, all public and mutable under ``lock``: ``servers`` (uuid -> document as ``GET
    /servers/{uuid}`` sends it), ``status`` (uuid -> the Panel's ``servers.status``:
    ``installing``, ``install_failed``, ``reinstall_failed``, ``restoring_backup``),
    ``sftp_users`` ((username, password) -> permissions), ``install_scripts`` (uuid -> the
    ``GET /servers/{uuid}/install`` document; ``default_install_script`` otherwise),
    ``backups`` (uuid -> {"server", "successful", ...}; see ``add_backup``), ``transfers``
    (uuid -> None while active, then True/False), ``container_states``, ``activity`` (accepted
    activity entries), ``uploads`` ((backup, part) -> bytes PUT to a presigned part URL).

    What it saw: ``requests`` (every ``PanelRequest``; set ``keep_requests = False`` to keep none)
    and ``calls`` (path -> count). Failure switches for authenticated routes:
    ``fail[path_prefix] = [status, ...]`` answers those statuses first; ``garbage`` (path prefixes
    answered 200 with a body that is not JSON); ``hang_s`` (path prefix -> seconds to sleep
    first); ``down`` (every request 500).

    Extend it by subclassing: add ``PanelRoute`` entries to ``ROUTES`` with a ``route_<name>``
    method, or override ``route()`` (every request after auth and failures) or ``page()``.
    Outside the Panel's API it serves ``POST /demo/servers/{uuid}`` (merge a JSON object into
    ``settings``, as an admin's edit would) and ``PUT /s3/{backup}/{part}`` (the presigned part
    URLs it hands out), both without auth.
    """

    ROUTES: tuple[PanelRoute, ...] = (
        PanelRoute("POST", r"/api/remote/sftp/auth", "sftp_auth"),
        PanelRoute("GET", r"/api/remote/servers", "servers"),
        PanelRoute("POST", r"/api/remote/servers/reset", "reset"),
        PanelRoute("POST", r"/api/remote/activity", "activity"),
        PanelRoute("GET", _SERVER, "server"),
        PanelRoute("GET", _SERVER + "/install", "install_script"),
        PanelRoute("POST", _SERVER + "/install", "install_status"),
        PanelRoute("POST", _SERVER + "/container/status", "container_status"),
        PanelRoute("GET", _SERVER + "/transfer/(?P<outcome>success|failure)", "transfer"),
        PanelRoute("POST", _SERVER + "/transfer/(?P<outcome>success|failure)", "transfer"),
        PanelRoute("GET", _BACKUP, "backup_upload"),
        PanelRoute("POST", _BACKUP, "backup_status"),
        PanelRoute("POST", _BACKUP + "/restore", "backup_restore"),
        PanelRoute("POST", r"/demo/servers/(?P<ident>[^/]+)", "merge_settings", auth=False),
        PanelRoute("PUT", r"/s3/(?P<backup>[^/]+)/(?P<part>\d+)", "s3_part", auth=False),
    )
    json_indent: int | None = None
    default_install_script: dict[str, Any] = {
        "container_image": "wingslite-test:latest",
        "entrypoint": "ash",
        "script": "#!/bin/ash\necho installed > /mnt/server/installed.txt\n",
    }
    backup_part_size = 5 << 30  # the Panel's backups.max_part_size default

    def __init__(
        self,
        token_id: str,
        token: str,
        documents: Iterable[dict[str, Any]] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.token_id, self.token = token_id, token
        self.lock = threading.Lock()
        self.servers: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str | None] = {}
        self.sftp_users: dict[tuple[str, str], list[str]] = {}
        self.user_uuid = "c0ffee00-1111-4222-8333-444455556666"
        self.install_scripts: dict[str, dict[str, Any]] = {}
        self.backups: dict[str, dict[str, Any]] = {}
        self.transfers: dict[str, bool | None] = {}
        # Servers answered by GET /servers/{uuid} but left out of the node's list: one arriving
        # by transfer is on the old node until the transfer succeeds.
        self.unlisted: set[str] = set()
        self.container_states: dict[str, str] = {}
        self.activity: list[dict[str, Any]] = []
        self.uploads: dict[tuple[str, int], bytes] = {}
        self.keep_requests = True
        self.requests: list[PanelRequest] = []
        self.calls: dict[str, int] = {}
        self.fail: dict[str, list[int]] = {}
        self.garbage: set[str] = set()
        self.hang_s: dict[str, float] = {}
        self.down = False
        self._routes = [(r, re.compile(r.path)) for r in self.ROUTES]
        for doc in documents:
            self.add(doc)
        self.httpd = _PanelStandInServer((host, port), self)
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # -- methods for the caller

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = spawn(self.httpd.serve_forever, 0.05, name="wingslite-panel-stand-in")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    stop = close

    def add(self, doc: dict[str, Any]) -> str:
        """Put a server document on this node; returns its uuid."""
        uuid = doc["settings"]["uuid"]
        with self.lock:
            self.servers[uuid] = doc
        return uuid

    def add_backup(self, server: str, backup: str | None = None) -> str:
        """Create a backup row for ``server`` (the Panel does before it asks the node)."""
        backup = backup or str(uuidlib.uuid4())
        with self.lock:
            self.backups[backup] = {"server": server, "successful": None}
        return backup

    def merge_settings(self, ident: str, changes: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge ``changes`` into a server's ``settings`` one level deep (``{"build": {...}}``
        changes only the keys given); returns the document, None for an unknown server."""
        with self.lock:
            uuid = self.find(ident)
            if uuid is None:
                return None
            settings = self.servers[uuid]["settings"]
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(settings.get(key), dict):
                    settings[key].update(value)
                else:
                    settings[key] = value
            return copy.deepcopy(self.servers[uuid])

    def find(self, ident: str) -> str | None:
        """The uuid of the server named by its uuid or 8-character short uuid, as the Panel's
        ``ServerRepository::getByUuid()`` matches either."""
        if ident in self.servers:
            return ident
        return next((u for u in self.servers if u[:8] == ident), None)

    def encode(self, body: Any) -> bytes:
        # PHP's json_encode escapes "/" (Laravel's JsonResponse default flags).
        return json.dumps(body, indent=self.json_indent).replace("/", "\\/").encode()

    # -- one request: record, faults, auth, route

    def handle(self, h: PanelStandInHandler, method: str) -> None:
        parts = urllib.parse.urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        req = PanelRequest(method, parts.path, dict(h.headers), query, body, raw)
        status = self._record(req)
        matched = [r for r, rx in self._routes if rx.fullmatch(req.path)]
        if not matched or any(r.auth for r in matched):
            for prefix, seconds in list(self.hang_s.items()):
                if req.path.startswith(prefix):
                    time.sleep(seconds)
            refusal = self.authenticate(h.headers.get("Authorization"))
            if refusal:
                return h.send_json(*refusal)
            if self.down or status:
                status = status or 500
                detail = (
                    "An unexpected error was encountered while processing this request, "
                    "please try again."
                )
                return h.send_json(status, _panel_error(status, "HttpException", detail))
            if any(req.path.startswith(g) for g in self.garbage):
                return h.send_bytes(200, b"<html>502 Bad Gateway</html>", None)
        self.route(h, req)

    def _record(self, req: PanelRequest) -> int | None:
        """Count and keep the request; the next failure status queued for its path, if any."""
        with self.lock:
            self.calls[req.path] = self.calls.get(req.path, 0) + 1
            if self.keep_requests:
                self.requests.append(req)
            queued = next((v for k, v in self.fail.items() if req.path.startswith(k) and v), None)
            return queued.pop(0) if queued else None

    def authenticate(self, header: str | None) -> tuple[int, dict, dict] | None:
        """Panel: ``DaemonAuthenticate``: the error answer, or None when the token is the node's."""
        if not header or not header.lower().startswith("bearer "):
            detail = "Access to this endpoint must include an Authorization header."
            return 401, _panel_error(401, "HttpException", detail), {"WWW-Authenticate": "Bearer"}
        parts = header[7:].split(",")[0].strip().split(".")
        if len(parts) != 2 or not all(parts):
            detail = "The Authorization header provided was not in a valid format."
            return 400, _panel_error(400, "BadRequestHttpException", detail), {}
        id_ok = parts[0].lower() == self.token_id.lower()  # MySQL's collation ignores case
        if not (id_ok and hmac.compare_digest(parts[1], self.token)):
            detail = "You are not authorized to access this resource."
            return 403, _panel_error(403, "AccessDeniedHttpException", detail), {}
        return None

    def route(self, h: PanelStandInHandler, req: PanelRequest) -> None:
        """Answer one request that passed auth and the failure switches. Override to intercept."""
        allowed = []
        for route, rx in self._routes:
            match = rx.fullmatch(req.path)
            if match and route.method == req.method:
                return getattr(self, "route_" + route.name)(h, req, **match.groupdict())
            if match:
                allowed.append(route.method)
        if allowed:
            detail = (
                f"The {req.method} method is not supported for route {req.path.lstrip('/')}. "
                f"Supported methods: {', '.join(allowed)}."
            )
            error = _panel_error(405, "MethodNotAllowedHttpException", detail)
            return h.send_json(405, error, {"Allow": ", ".join(allowed)})
        detail = f"The route {req.path.lstrip('/')} could not be found."
        h.send_json(404, _panel_error(404, "NotFoundHttpException", detail))

    def _server_or_404(self, h: PanelStandInHandler, ident: str) -> str | None:
        with self.lock:
            uuid = self.find(ident)
        if uuid is None:
            h.send_json(404, _panel_error(404, "RecordNotFoundException", ""))
        return uuid

    def _backup_or_404(self, h: PanelStandInHandler, backup: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.backups.get(backup)
        if row is None:
            detail = "The requested resource could not be found on the server."
            h.send_json(404, _panel_error(404, "NotFoundHttpException", detail))
        return row

    @staticmethod
    def _validate(body: Any, rules: Mapping[str, str]) -> tuple[int, dict[str, Any]] | None:
        """Laravel's validation of a JSON object: ``rules`` maps field -> ``required`` /
        ``present`` / ``nullable`` / ``boolean`` / ``string`` / ``array`` / ``uuid`` / ``ip``
        joined by ``|``; the first failure."""
        body = body if isinstance(body, dict) else {}
        for field, rule in rules.items():
            value, words = body.get(field), rule.split("|")
            name = field.replace("_", " ")
            if "present" in words and field not in body:
                return _invalid(field, "present", f"The {name} field must be present.")
            if "required" in words and value in (None, "", [], {}):
                return _invalid(field, "required", f"The {name} field is required.")
            if field not in body or (value is None and "nullable" in words):
                continue
            if "boolean" in words and not isinstance(value, bool):
                return _invalid(field, "boolean", f"The {name} field must be true or false.")
            if "string" in words and not isinstance(value, str):
                return _invalid(field, "string", f"The {name} field must be a string.")
            if "array" in words and not isinstance(value, (dict, list)):
                return _invalid(field, "array", f"The {name} field must be an array.")
            if "uuid" in words and not (isinstance(value, str) and _ANY_UUID_RE.match(value)):
                return _invalid(field, "uuid", f"The {name} field must be a valid UUID.")
            if "ip" in words and not _is_ip(value):
                return _invalid(field, "ip", f"The {name} field must be a valid IP address.")
        return None

    # -- the Panel's remote routes (Panel: app/Http/Controllers/Api/Remote/)

    def route_servers(self, h: PanelStandInHandler, req: PanelRequest) -> None:
        h.send_json(200, self.page(req.query))

    def page(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Laravel's paginated resource (``ServerConfigurationCollection``): anything but an int
        >= 1 (Wings starts at page 0) means page 1; ``per_page`` 0 means 15."""
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        try:
            per_page = int(query.get("per_page", "50")) or 15
        except ValueError:
            per_page = 15
        with self.lock:
            items = [(u, d) for u, d in self.servers.items() if u not in self.unlisted]
        total, first = len(items), (page - 1) * per_page
        last = max(1, -(-total // per_page))
        chunk = items[first : first + per_page]
        base = f"{self.url}/api/remote/servers"
        return {
            "data": [
                {
                    "uuid": u,
                    "settings": d["settings"],
                    "process_configuration": d["process_configuration"],
                }
                for u, d in chunk
            ],
            "links": {
                "first": f"{base}?page=1",
                "last": f"{base}?page={last}",
                "prev": f"{base}?page={page - 1}" if page > 1 else None,
                "next": f"{base}?page={page + 1}" if page < last else None,
            },
            "meta": {
                "current_page": page,
                "from": first + 1 if chunk else None,
                "last_page": last,
                "links": [],
                "path": base,
                "per_page": per_page,
                "to": first + len(chunk) if chunk else None,
                "total": total,
            },
        }

    def route_server(self, h: PanelStandInHandler, req: PanelRequest, ident: str) -> None:
        with self.lock:  # encoded under the lock: a test may be changing the document
            uuid = self.find(ident)
            data = self.encode(self.servers[uuid]) if uuid else None
        if data is None:
            return h.send_json(404, _panel_error(404, "RecordNotFoundException", ""))
        h.send_bytes(200, data)

    def route_reset(self, h: PanelStandInHandler, req: PanelRequest) -> None:
        with self.lock:
            for uuid, state in list(self.status.items()):
                if state in ("installing", "restoring_backup"):
                    self.status[uuid] = None
        h.send_json(204)

    def route_sftp_auth(self, h: PanelStandInHandler, req: PanelRequest) -> None:
        """Panel: ``SftpAuthenticationController``: ``user.server`` split at the last dot."""
        invalid = self._validate(req.body, {"username": "required|string", "password": "required"})
        if invalid:
            return h.send_json(*invalid)
        user, _, ident = str(req.body["username"]).rpartition(".")
        if not ident:
            detail = "No valid server identifier was included in the request."
            return h.send_json(400, _panel_error(400, "BadRequestHttpException", detail))
        with self.lock:
            uuid = self.find(ident)
            perms = self.sftp_users.get((user, req.body["password"]))
            conflict = self._state_conflict(uuid) if uuid else None
        if uuid is None or perms is None:
            detail = "Authorization credentials were not correct, please try again."
            return h.send_json(403, _panel_error(403, "HttpForbiddenException", detail))
        if conflict:
            return h.send_json(409, _panel_error(409, "ServerStateConflictException", conflict))
        h.send_json(200, {"server": uuid, "user": self.user_uuid, "permissions": perms})

    def _state_conflict(self, uuid: str) -> str | None:
        if self.servers[uuid]["settings"].get("suspended"):
            return _STATE_CONFLICTS["suspended"]
        if uuid in self.transfers and self.transfers[uuid] is None:
            return _STATE_CONFLICTS["transferring"]
        return _STATE_CONFLICTS.get(self.status.get(uuid) or "")

    def route_install_script(self, h: PanelStandInHandler, req: PanelRequest, ident: str) -> None:
        uuid = self._server_or_404(h, ident)
        if uuid:
            with self.lock:
                doc = copy.deepcopy(self.install_scripts.get(uuid, self.default_install_script))
            h.send_json(200, doc)

    def route_install_status(self, h: PanelStandInHandler, req: PanelRequest, ident: str) -> None:
        """Panel: ``ServerInstallController@store``: a suspended server stays suspended."""
        uuid = self._server_or_404(h, ident)
        if not uuid:
            return
        invalid = self._validate(
            req.body, {"successful": "present|boolean", "reinstall": "boolean"}
        )
        if invalid:
            return h.send_json(*invalid)
        if req.body["successful"]:
            state = None
        else:
            state = "reinstall_failed" if req.body.get("reinstall") else "install_failed"
        with self.lock:
            self.status[uuid] = state
        h.send_json(204)

    def route_container_status(self, h: PanelStandInHandler, req: PanelRequest, ident: str) -> None:
        """Pelican's ``POST /servers/{uuid}/container/status`` (``data.new_state``)."""
        uuid = self._server_or_404(h, ident)
        if uuid:
            data = req.body.get("data") if isinstance(req.body, dict) else None
            state = data.get("new_state") if isinstance(data, dict) else None
            if not isinstance(state, str):
                return h.send_json(
                    *_invalid("data.new_state", "required", "The data.new state field is required.")
                )
            with self.lock:
                self.container_states[uuid] = state
            h.send_json(204)

    def route_transfer(
        self, h: PanelStandInHandler, req: PanelRequest, ident: str, outcome: str
    ) -> None:
        """Panel: ``ServerTransferController``: 409 unless a transfer of the server is active."""
        uuid = self._server_or_404(h, ident)
        if not uuid:
            return
        with self.lock:
            active = uuid in self.transfers and self.transfers[uuid] is None
            if active:
                self.transfers[uuid] = outcome == "success"
        if not active:
            detail = "Server is not being transferred."
            return h.send_json(409, _panel_error(409, "ConflictHttpException", detail))
        h.send_json(204)

    def route_activity(self, h: PanelStandInHandler, req: PanelRequest) -> None:
        """Panel: ``ActivityProcessingController``: items of other servers, or whose event is
        not ``server:*``, are dropped silently; the answer is 200 with an empty body."""
        data = req.body.get("data") if isinstance(req.body, dict) else None
        if not isinstance(data, list):
            return h.send_json(*_invalid("data", "required", "The data field is required."))
        rules = {
            "server": "required|uuid",
            "event": "required|string",
            "metadata": "present|nullable|array",
            "timestamp": "required|string",
            "user": "nullable|uuid",
            "ip": "nullable|ip",
        }
        for item in data:
            invalid = self._validate(item, rules)
            if invalid:
                return h.send_json(*invalid)
        with self.lock:
            for item in data:
                if item["server"] in self.servers and item["event"].startswith("server:"):
                    self.activity.append(item)
        h.send_bytes(200, b"", "text/html; charset=UTF-8")

    def route_backup_upload(self, h: PanelStandInHandler, req: PanelRequest, backup: str) -> None:
        """Panel: ``BackupRemoteUploadController``: presigned part URLs for an S3 upload."""
        try:
            size = int(req.query.get("size", "0"))
        except ValueError:
            size = 0
        if size <= 0:
            detail = 'A non-empty "size" query parameter must be provided.'
            return h.send_json(400, _panel_error(400, "BadRequestHttpException", detail))
        row = self._backup_or_404(h, backup)
        if row is None:
            return
        if row.get("successful"):
            detail = "This backup is already in a completed state."
            return h.send_json(409, _panel_error(409, "ConflictHttpException", detail))
        count = -(-size // self.backup_part_size)
        parts = [self.presign(backup, n) for n in range(1, count + 1)]
        h.send_json(200, {"parts": parts, "part_size": self.backup_part_size})

    def presign(self, backup: str, part: int) -> str:
        """The URL one part of an S3 upload goes to (override to point elsewhere)."""
        return f"{self.url}/s3/{backup}/{part}"

    def route_s3_part(
        self, h: PanelStandInHandler, req: PanelRequest, backup: str, part: str
    ) -> None:
        with self.lock:
            self.uploads[(backup, int(part))] = req.raw
        h.send_bytes(200, b"", None, {"ETag": f'"{hashlib.md5(req.raw).hexdigest()}"'})

    def route_backup_status(self, h: PanelStandInHandler, req: PanelRequest, backup: str) -> None:
        """Panel: ``BackupStatusController@index``: a failed backup may be reported again."""
        row = self._backup_or_404(h, backup)
        if row is None:
            return
        invalid = self._validate(req.body, {"successful": "present|boolean"})
        if not invalid and req.body["successful"]:
            rules = {
                "checksum": "required|string",
                "checksum_type": "required|string",
                "size": "required",
            }
            invalid = self._validate(req.body, rules)
        if invalid:
            return h.send_json(*invalid)
        if row.get("successful"):
            detail = "Cannot update the status of a backup that is already marked as completed."
            return h.send_json(400, _panel_error(400, "BadRequestHttpException", detail))
        with self.lock:
            row.update(req.body)
        h.send_json(204)

    def route_backup_restore(self, h: PanelStandInHandler, req: PanelRequest, backup: str) -> None:
        """Panel: ``BackupStatusController@restore``: the server leaves ``restoring_backup``."""
        row = self._backup_or_404(h, backup)
        if row is None:
            return
        invalid = self._validate(req.body, {"successful": "present|boolean"})
        if invalid:
            return h.send_json(*invalid)
        with self.lock:
            row["restored"] = req.body["successful"]
            self.status[row["server"]] = None
        h.send_json(204)

    def route_merge_settings(self, h: PanelStandInHandler, req: PanelRequest, ident: str) -> None:
        if not isinstance(req.body, dict):
            return h.send_json(400, _panel_error(400, "BadRequestHttpException", "a JSON object"))
        doc = self.merge_settings(ident, req.body)
        if doc is None:
            return h.send_json(404, _panel_error(404, "RecordNotFoundException", ""))
        h.send_json(200, doc)


# CLI ##############################################################################################


_DEMO_INSTALL_SCRIPT = """#!/bin/sh
# An egg install script: runs in <uuid>_installer with the server's files at /mnt/server.
echo "Installing $SERVER_NAME..."
for step in 1 2 3; do echo "downloading part $step/3"; sleep 1; done
echo "eula=true" > /mnt/server/eula.txt
echo "installed $(date -u)" > /mnt/server/installed.txt
echo "Install complete."
"""


def _demo_installing_server(panel: PanelStandIn) -> dict[str, Any]:
    """The demo's third server: the Panel has an install script for it (the test image, ``sh``)."""
    doc = demo_document(str(uuidlib.uuid4()), "Demo Modded", 1024)
    doc["settings"]["environment"]["SERVER_NAME"] = "Demo Modded"
    doc["settings"]["allocations"]["default"]["port"] = 25567
    doc["settings"]["allocations"]["mappings"] = {"127.0.0.1": [25567]}
    panel.install_scripts[doc["settings"]["uuid"]] = {
        "container_image": doc["settings"]["container"]["image"],
        "entrypoint": "sh",
        "script": _DEMO_INSTALL_SCRIPT,
    }
    return doc


def _demo(args: Any) -> int:
    import secrets
    import tempfile

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a service manager stops it with SIGTERM
        signal.signal(sig, lambda *_: stop.set())
    token_id, token = secrets.token_hex(8), secrets.token_hex(32)
    servers = [
        demo_document(str(uuidlib.uuid4()), "Demo Survival", 1024),
        demo_document(str(uuidlib.uuid4()), "Demo Creative", 2048),
    ]
    panel = PanelStandIn(token_id, token, servers)
    panel.sftp_users[("demo", "demo")] = ["*"]
    panel.start()
    modded = _demo_installing_server(panel)
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
            "log_directory": str(root / "logs"),
            "tmp_directory": str(root / "tmp"),
            "sftp": {"bind_address": "127.0.0.1", "bind_port": args.sftp_port},
        },
        "remote_query": {"timeout": 5},
    }
    daemon = Daemon(Config(raw, "--demo"))
    try:
        daemon.start()
    except OSError as exc:  # e.g. the port is taken
        panel.stop()
        shutil.rmtree(root, ignore_errors=True)
        print(f"wingslite: cannot start: {exc}", file=sys.stderr)
        return 1
    daemon.wait_booted(10)
    base = f"http://127.0.0.1:{daemon.port}"
    # The Panel creates a server: it lists it, then calls POST /api/servers (which installs it).
    panel.add(modded)
    third = modded["settings"]["uuid"]
    create = urllib.request.Request(
        f"{base}/api/servers",
        data=json.dumps({"uuid": third, "start_on_completion": True}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with contextlib.suppress(OSError):
        urllib.request.urlopen(create, timeout=10).close()
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
  curl -s -X POST -d '{{"build": {{"memory_limit": 4096, "disk_space": 2048}}}}' \\
    {panel.url}/demo/servers/{first} >/dev/null
  curl -si -X POST {auth} {base}/api/servers/{first}/sync
  curl -s {auth} {base}/api/servers/{first} | python3 -m json.tool
  # suspend it (every websocket and SFTP session of the server is closed by the sync):
  curl -s -X POST -d '{{"suspended": true}}' {panel.url}/demo/servers/{first} >/dev/null
  curl -si -X POST {auth} {base}/api/servers/{first}/sync
  # a third server was just created and installs from its egg's script, then starts:
  cat {root}/logs/install/{third}.log; ls -ln {root}/volumes/{third}
  curl -si -X POST {auth} {base}/api/servers/{third}/reinstall

Press Ctrl-C to stop.""",
        flush=True,
    )
    try:
        while not stop.wait(1):
            pass
        print("\nstopping", flush=True)
    finally:
        _demo_remove_containers(daemon)
        daemon.stop()
        panel.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _demo_remove_containers(daemon: Daemon, wait_s: float = 10.0) -> None:
    """The demo's files go when it ends, so its containers go too (an install is cancelled)."""
    servers = daemon.all_servers()
    for server in servers:
        server.deleted = True  # an install between two steps stops at the next one
        with contextlib.suppress(Exception):
            server.env.abort_install()
        with contextlib.suppress(Exception):
            server.env.destroy()
    deadline = time.monotonic() + wait_s
    while any(s.installing for s in servers) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- operator commands: configure, diagnostics ----------------------------------------------------


def _configure(args: Any) -> int:
    """``wingslite.py configure``: fetch this node's config.yml from the Panel, as ``wings
    configure``.

    ``GET /api/application/nodes/{id}/configuration`` with an application API key answers the
    node's configuration as JSON (the Panel's ``Node::getConfiguration()``); it is checked as a
    config file and written as YAML, atomically and with mode 0600 because it holds the node's
    token.
    """
    import sys

    path = Path(args.config or "/etc/pterodactyl/config.yml")
    try:
        if not re.fullmatch(r"[0-9]+", args.node):
            raise ConfigError(f"--node: expected the node's numeric id, got {args.node!r}")
        if path.exists() and not args.override:
            raise ConfigError(f"{path} already exists; pass --override to replace it")
        raw = fetch_node_configuration(
            args.panel_url, args.token, args.node, verify_tls=not args.allow_insecure
        )
        Config(raw, f"the Panel's configuration of node {args.node}")  # refuses a broken one
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, yaml.safe_dump(raw, sort_keys=False).encode(), mode=0o600)
        os.chmod(path, 0o600)  # also when an umask narrowed the create mode
    except (ConfigError, PanelError) as exc:
        print(f"wingslite configure: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"wingslite configure: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"wrote the configuration of node {args.node} from {args.panel_url} to {path} (mode 0600);"
        f" start the daemon with: python3 wingslite.py --config {path}"
    )
    return 0


def fetch_node_configuration(
    panel_url: str, api_key: str, node_id: str, *, verify_tls: bool = True, timeout_s: float = 30
) -> dict[str, Any]:
    """The Panel's JSON configuration of a node; ``PanelError`` says why it could not be had."""
    url = f"{panel_url.rstrip('/')}/api/application/nodes/{node_id}/configuration"
    what = f"GET {url}"
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", panel_url):
        raise ConfigError(f"--panel-url: expected the Panel's http(s) URL, got {panel_url!r}")
    request = urllib.request.Request(
        url,
        headers={
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/vnd.pterodactyl.v1+json",
            "User-Agent": f"wingslite/{VERSION} configure",
        },
    )
    context = ssl.create_default_context()
    if not verify_tls:  # --allow-insecure: a Panel with a self-signed certificate
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        code, detail = _panel_error_body(exc.read(65536))
        hints = {
            401: "the API key was not accepted",
            403: "the API key may not read nodes (r_nodes)",
        }
        hint = hints.get(exc.code) or ("no such node" if exc.code == 404 else "")
        raise PanelError(exc.code, code, hint or detail, what) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise PanelError(0, "_Unreachable", f"could not reach the Panel: {reason}", what) from None
    try:
        document = json.loads(raw)
    except ValueError:
        raise PanelError(200, "_InvalidJSON", "the answer is not JSON", what) from None
    if not isinstance(document, dict):
        raise PanelError(200, "_BadShape", "the answer is not a JSON object", what)
    return document


_SECRET_KEY_RE = re.compile(r"token|secret|password|passphrase", re.IGNORECASE)


def redacted(value: Any) -> Any:
    """A copy of a config tree with every token, secret and password replaced."""
    if isinstance(value, Mapping):
        return {
            k: "[redacted]" if _SECRET_KEY_RE.search(str(k)) and v else redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def diagnostics_report(config: Config, log_lines: int = 200) -> str:
    """What ``wingslite.py diagnostics`` prints: versions, the redacted config, quota, log,
    servers."""
    parts = [
        ("versions", _diagnostics_versions(config)),
        ("configuration (" + config.source + ", secrets redacted)", _diagnostics_config(config)),
        ("disk quota", _diagnostics_quota(config)),
        ("servers", _diagnostics_servers(config)),
        ("log", _diagnostics_log(config, log_lines)),
    ]
    text = "\n".join(f"== {title} ==\n{body.rstrip()}\n" for title, body in parts)
    for secret in (config.token, config.token_id, config.get("wingslite.metrics_token")):
        if secret:  # belt and braces: a secret that reached a log line or an error text
            text = text.replace(secret, "[redacted]")
    return text


def _diagnostics_versions(config: Config) -> str:
    import importlib.metadata

    lines = [f"wingslite       {VERSION}", f"python          {platform.python_version()}"]
    for package in ("docker", "pyyaml", "paramiko"):
        try:
            lines.append(f"{package:<15} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{package:<15} not installed")
    lines.append(f"kernel          {platform.release()} ({platform.machine()})")
    cgroup_root = Path(config.get("wingslite.cgroup_root"))
    cgroup = "v2" if (cgroup_root / "cgroup.controllers").exists() else "v1"
    try:
        info = docker_client(config).info()
        lines.append(f"docker engine   {info.get('ServerVersion', '?')}")
        cgroup += (
            f", driver {info.get('CgroupDriver', '?')} (engine: v{info.get('CgroupVersion', '?')})"
        )
    except Exception as exc:  # the report is most useful exactly when the engine is broken
        lines.append(f"docker engine   not reachable: {exc}")
    lines.append(f"cgroups         {cgroup}")
    return "\n".join(lines)


def _diagnostics_config(config: Config) -> str:
    return yaml.safe_dump(redacted(config.raw), sort_keys=False)


def _diagnostics_quota(config: Config) -> str:
    try:
        backend = select_quota_backend(config.get("wingslite.disk_quota"), config.data_dir)
    except (WingsliteError, OSError) as exc:
        return f"configured {config.get('wingslite.disk_quota')}: cannot be selected: {exc}"
    return (
        f"configured {config.get('wingslite.disk_quota')}, backend {backend.name}\n{backend.reason}"
    )


def _diagnostics_servers(config: Config) -> str:
    """Each server's state, from the running daemon's API, else from what it last recorded."""
    scheme = "https" if config.get("api.ssl.enabled") else "http"
    host = config.get("api.host")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    request = urllib.request.Request(
        f"{scheme}://{host}:{config.get('api.port')}/api/servers",
        headers={"Authorization": f"Bearer {config.token}", "Accept": "application/json"},
    )
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own daemon
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            servers = json.loads(resp.read())
        rows = [
            f"{s['configuration']['uuid']}  {s['state']:<9}"
            f"{'  suspended' if s.get('is_suspended') else ''}"
            for s in servers
        ]
        return "from the running daemon:\n" + ("\n".join(rows) or "(no servers)")
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as exc:
        states_path = config.root_dir / "states.json"
        try:
            states = json.loads(states_path.read_text())
        except (OSError, ValueError):
            states = {}
        rows = [f"{uuid}  {state}" for uuid, state in sorted(states.items())]
        return f"the daemon's API did not answer ({exc}); last recorded in {states_path}:\n" + (
            "\n".join(rows) or "(nothing recorded)"
        )


def _diagnostics_log(config: Config, lines: int) -> str:
    path = config.get("wingslite.log_file")
    if not path:
        return "no log file configured (wingslite.log_file); under systemd: journalctl -u wingslite"
    try:
        with open(path, "rb") as fh:
            tail = deque(fh, maxlen=lines)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    return f"last {len(tail)} lines of {path}:\n" + b"".join(tail).decode("utf-8", "replace")


def _diagnostics(args: Any) -> int:
    import sys

    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"wingslite diagnostics: {exc.message}", file=sys.stderr)
        return 2
    print(diagnostics_report(config), end="")
    return 0


def _add_operator_commands(parser: Any) -> None:
    import argparse

    commands = parser.add_subparsers(dest="command", metavar="{configure,diagnostics}")
    configure = commands.add_parser(
        "configure", help="fetch this node's config.yml from the Panel (as wings configure)"
    )
    configure.add_argument("--panel-url", required=True, help="the Panel's URL")
    configure.add_argument(
        "--token", required=True, help="an application API key that may read nodes"
    )
    configure.add_argument("--node", required=True, help="the node's id in the Panel")
    configure.add_argument(
        "--config",
        default=argparse.SUPPRESS,  # else it would hide a --config given before the command
        help="where to write it (default: /etc/pterodactyl/config.yml)",
    )
    configure.add_argument("--override", action="store_true", help="replace an existing file")
    configure.add_argument(
        "--allow-insecure", action="store_true", help="do not verify the Panel's TLS certificate"
    )
    diagnostics = commands.add_parser(
        "diagnostics", help="print a report for a support request (secrets redacted)"
    )
    diagnostics.add_argument("--config", default=argparse.SUPPRESS, help="the node's config.yml")


def _config_path(given: str | None) -> str:
    return given or next(
        (p for p in ("/etc/pterodactyl/config.yml", "wingslite.yml") if Path(p).exists()),
        "/etc/pterodactyl/config.yml",
    )


def main(argv: list[str] | None = None) -> int:
    """The command line: ``wingslite.py [--config PATH] [--demo] [--debug] [--version]`` runs the
    daemon; ``wingslite.py configure ...`` and ``wingslite.py diagnostics`` are the operator's."""
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
    _add_operator_commands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "configure":
        return _configure(args)
    if args.command == "diagnostics":
        return _diagnostics(args)
    if args.demo:
        return _demo(args)
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"wingslite: {exc.message}", file=sys.stderr)
        return 2
    if config.get("debug"):
        logging.getLogger().setLevel(logging.DEBUG)
    if config.get("wingslite.log_file"):
        try:
            handler = logging.FileHandler(config.get("wingslite.log_file"), encoding="utf-8")
        except OSError as exc:
            print(f"wingslite: wingslite.log_file: cannot open: {exc}", file=sys.stderr)
            return 2
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    daemon = Daemon(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        daemon.start()
    except ConfigError as exc:
        print(f"wingslite: cannot start: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"wingslite: cannot start: {exc}", file=sys.stderr)
        return 1
    while not stop.wait(1):
        pass
    LOG.info("shutting down")
    daemon.stop()
    return 0


def _exec_as_module() -> None:
    """Replace this process (same pid, same interpreter options) with one that imports this
    file as the module ``wingslite`` and runs ``main()``; returns only if that cannot be done.

    CPython keeps a script's syntax tree until the script has finished running (the parser's
    arena is freed after ``run_mod``), which for a daemon is its whole life: about 20 MB for
    this file. A module's tree is freed as soon as it is compiled.
    """
    path = os.path.abspath(__file__)
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]
    code = (
        "import sys, importlib.machinery as m, importlib.util as u; "
        f"loader = m.SourceFileLoader('wingslite', {path!r}); "
        "module = u.module_from_spec(u.spec_from_loader('wingslite', loader)); "
        "sys.modules['wingslite'] = module; loader.exec_module(module); "
        "raise SystemExit(module.main())"
    )
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [sys.executable, *options, "-c", code, *sys.argv[1:]])


if __name__ == "__main__":
    if __spec__ is None:  # run as a script, not with -m (which compiles it as a module already)
        _exec_as_module()
    raise SystemExit(main())
