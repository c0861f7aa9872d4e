#!/usr/bin/env python3
"""Transfer throughput: wingslite to wingslite against ``tar czf - | tar xzf -`` over loopback.

    python3 bench/transfer.py [--mib 200] [--rounds 3] [--out bench/transfer.json]

The same directory (half random bytes, half text, in files of 1-16 MiB) is moved three ways, each
over a loopback TCP socket, and timed from the first byte to the last file on disk:

  baseline  ``tar -I "gzip -1" -cf -`` piped into a socket, ``tar xzf -`` reading it (gzip level 1,
            as wingslite's archives are written)
  wingslite ``POST /api/servers/:server/transfer`` on a source daemon to a destination daemon, both
            in this process, each with its own Panel stand-in; until the destination reports success

The figure is the ratio wingslite / baseline of the median times (machines are noisy: only the
ratio within one run means anything), and the peak RSS growth of this process during a transfer.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import hmac
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wingslite as w  # noqa: E402

SRC_TOKEN_ID, SRC_TOKEN = "benchsrc00000001", "s" * 64
DST_TOKEN_ID, DST_TOKEN = "benchdst00000001", "d" * 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_tree(root: Path, mib: int) -> None:
    rnd = os.urandom(1 << 20)
    text = b"".join(b"line %08d of a log a game writes\n" % i for i in range(30_000))[: 1 << 20]
    written, n = 0, 0
    while written < mib:
        size = min(1 + n % 16, mib - written)
        sub = root / f"dir{n % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f"f{n}.bin", "wb") as fh:
            for i in range(size):
                fh.write(rnd if (n + i) % 2 else text)
        written += size
        n += 1


def baseline(src: Path, dst: Path) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            subprocess.run(
                ["tar", "xzf", "-", "-C", str(dst)], stdin=conn.makefile("rb"), check=True
            )

    receiver = threading.Thread(target=receive)
    t0 = time.perf_counter()
    receiver.start()
    with socket.create_connection(("127.0.0.1", port)) as out:
        subprocess.run(
            ["tar", "-I", "gzip -1", "-cf", "-", "-C", str(src), "."],
            stdout=out.makefile("wb"),
            check=True,
        )
        out.shutdown(socket.SHUT_WR)
    receiver.join()
    listener.close()
    return time.perf_counter() - t0


def transfer_token(uuid: str) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iat": now,
        "nbf": now - 300,
        "exp": now + 900,
        "sub": uuid,
        "jti": hashlib.sha256(uuid.encode()).hexdigest(),
        "unique_id": uuidlib.uuid4().hex,
    }
    signing = b64(json.dumps({"typ": "JWT", "alg": "HS256", "sub": uuid}).encode()) + "."
    signing += b64(json.dumps(claims).encode())
    return signing + "." + b64(hmac.new(DST_TOKEN.encode(), signing.encode(), "sha256").digest())


def node(root: Path, panel: w.PanelStandIn, token_id: str, token: str) -> w.Daemon:
    raw = {
        "uuid": str(uuidlib.uuid4()),
        "token_id": token_id,
        "token": token,
        "remote": panel.url,
        "api": {"host": "127.0.0.1", "port": 0},
        "system": {"root_directory": str(root / "root"), "data": str(root / "volumes")},
        "wingslite": {"sftp_enabled": False, "disk_quota": "soft"},
    }
    daemon = w.Daemon(w.Config(raw, "bench"))
    daemon.start()
    assert daemon.wait_booted(30)
    return daemon


def wingslite_round(work: Path, tree: Path) -> tuple[float, int]:
    uuid = str(uuidlib.uuid4())
    doc = w.demo_document(uuid, "bench transfer", 1024)
    src_panel = w.PanelStandIn(SRC_TOKEN_ID, SRC_TOKEN, [doc])
    dst_panel = w.PanelStandIn(DST_TOKEN_ID, DST_TOKEN, [copy.deepcopy(doc)])
    dst_panel.unlisted.add(uuid)
    dst_panel.transfers[uuid] = None
    src_panel.start()
    dst_panel.start()
    source = node(work / "src", src_panel, SRC_TOKEN_ID, SRC_TOKEN)
    destination = node(work / "dst", dst_panel, DST_TOKEN_ID, DST_TOKEN)
    try:
        shutil.copytree(tree, source.get_server(uuid).fs.root, dirs_exist_ok=True)
        body = json.dumps(
            {
                "url": f"http://127.0.0.1:{destination.port}/api/transfers",
                "token": "Bearer " + transfer_token(uuid),
                "server": {"uuid": uuid, "start_on_completion": False},
            }
        )
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        conn = __import__("http.client").client.HTTPConnection("127.0.0.1", source.port)
        conn.request(
            "POST",
            f"/api/servers/{uuid}/transfer",
            body,
            {"Authorization": f"Bearer {SRC_TOKEN}", "Content-Type": "application/json"},
        )
        assert conn.getresponse().status == 202
        while dst_panel.transfers.get(uuid) is None:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        done.set()
        assert dst_panel.transfers[uuid] is True, "the transfer failed"
        return elapsed, peak[0] - base
    finally:
        for d in (source, destination):
            d.stop()
        src_panel.close()
        dst_panel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("transfer.json")))
    args = parser.parse_args()
    w.LOG.setLevel("WARNING")
    with tempfile.TemporaryDirectory(prefix="wingslite-bench-transfer-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        make_tree(tree, args.mib)
        base_s, ours_s, growth = [], [], []
        for i in range(args.rounds):
            dst = work / f"base{i}"
            dst.mkdir()
            base_s.append(baseline(tree, dst))
            shutil.rmtree(dst)
            elapsed, grew = wingslite_round(work / f"round{i}", tree)
            ours_s.append(elapsed)
            growth.append(grew)
            shutil.rmtree(work / f"round{i}", ignore_errors=True)
    result = {
        "mib": args.mib,
        "rounds": args.rounds,
        "baseline_tar_s_median": round(statistics.median(base_s), 3),
        "wingslite_s_median": round(statistics.median(ours_s), 3),
        "baseline_mib_per_s": round(args.mib / statistics.median(base_s), 1),
        "wingslite_mib_per_s": round(args.mib / statistics.median(ours_s), 1),
        "ratio_wingslite_over_baseline": round(
            statistics.median(ours_s) / statistics.median(base_s), 2
        ),
        "rss_growth_mib_max": round(max(growth) / 1048576, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
