"""The processes a run needs beside aegisd: nginx (the fast upstream), the Node SSE upstream and the
baseline forwarder. Each starts on a free loopback port and is stopped by its own pid.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SMALL_BODY = '{"id":"bench-1","object":"thing","ok":true,"items":[1,2,3]}'
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location = /small {{ default_type application/json; return 200 '{small}'; }}
        location = /upload {{
            client_max_body_size 1m;
            client_body_buffer_size 128k;
            default_type application/json;
            return 200 '{{"ok":true}}';
        }}
        location = /echo-auth {{ default_type text/plain; return 200 "seen: $http_authorization"; }}
    }}
}}
"""


class ServiceError(Exception):
    """A helper process could not start; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited {proc.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise ServiceError(f"{what} did not listen on port {port} within {timeout:g}s")


def find_nginx() -> str | None:
    """nginx lives in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


class Service:
    """One helper process, stopped by SIGTERM to its own pid (never by name)."""

    def __init__(self, name: str, args: list[str], port: int, log: Path) -> None:
        self.name = name
        self.port = port
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        try:
            wait_port(port, self.proc, name)
        except ServiceError:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_nginx(root: Path) -> Service:
    nginx = find_nginx()
    if nginx is None:
        raise ServiceError("nginx is not installed (Debian: apt-get install nginx-light; `make bench` does it)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, small=SMALL_BODY))
    return Service("nginx", [nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "nginx-error.log")], port,
                   root / "nginx.log")


def start_sse_upstream(root: Path) -> Service | None:
    """The Node SSE server, or None when node is not installed (the SSE scenario is then skipped)."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        return None
    port = free_port()
    return Service("sse-upstream", [node, str(HERE / "sse_upstream.js"), str(port)], port, root / "sse.log")


def start_baseline(root: Path, upstream_url: str) -> Service:
    port = free_port()
    return Service("baseline", [sys.executable, str(HERE / "baseline_forwarder.py"), str(port), upstream_url], port,
                   root / "baseline.log")
