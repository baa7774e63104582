"""Origin servers on loopback: plain HTTP, HTTPS with a test CA, git smart-HTTP and a PEP 503
package index. Each records the requests it served, so a test can tell what got through."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # the listen backlog: socketserver's 5 drops bursts of clients


class _Server6(_Server):
    address_family = socket.AF_INET6


class Origin:
    """An HTTP(S) server answering every path; `/bytes/N` sends N bytes."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None] | None = None,
                 tls: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.requests: list[tuple[str, str, str]] = []  # (method, Host, path)
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _any(self) -> None:
                origin.requests.append((self.command, self.headers.get("Host", ""), self.path))
                (handle or _hello)(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _any

        server = _Server6 if ":" in host else _Server
        self.server = server((host, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hello(request: BaseHTTPRequestHandler) -> None:
    length = int(request.headers.get("Content-Length") or 0)
    if length:
        request.rfile.read(length)
    if request.path.startswith("/bytes/"):
        size = int(request.path.split("/")[2])
        request.send_response(200)
        request.send_header("Content-Length", str(size))
        request.end_headers()
        chunk = b"x" * 65536
        while size > 0:
            request.wfile.write(chunk[:size])
            size -= len(chunk)
        return
    body = f"hello from {request.headers.get('Host')} {request.command} {request.path}\n".encode()
    request.send_response(200)
    request.send_header("Content-Type", "text/plain")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


class TestCA:
    """A CA the tests trust for their HTTPS origins, with one certificate for all names."""

    def __init__(self, directory: Path, names: list[str]) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*names)
        self.ca_file = directory / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(context)
        return context


def git_repository(root: Path) -> Path:
    """A bare repository with one commit under `root`, as `served/repo.git`; returns what
    `git_handler` serves (`root/served`)."""
    work = root / "work"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test",
           "HOME": str(root), "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "README").write_text("hello\n")
    subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "first"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "served" / "repo.git")],
                   check=True, env=env)
    subprocess.run(["git", "-C", str(root / "served" / "repo.git"), "config",
                    "http.receivepack", "true"], check=True, env=env)
    return root / "served"


def package_files(root: Path) -> Path:
    """What `package_index_handler` serves: one wheel, `egress-probe` 1.0, built here."""
    (root / "egress-probe").mkdir(parents=True)
    wheel = root / "egress-probe" / "egress_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("egress_probe.py", "MESSAGE = 'installed through agent-egress'\n")
        info = "egress_probe-1.0.dist-info"
        archive.writestr(f"{info}/METADATA",
                         "Metadata-Version: 2.1\nName: egress-probe\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\n"
                                          "Root-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"egress_probe.py,,\n{info}/METADATA,,\n"
                                           f"{info}/WHEEL,,\n{info}/RECORD,,\n")
    return root


def git_handler(project_root: Path) -> Callable[[BaseHTTPRequestHandler], None]:
    """Serves the repositories under `project_root` through `git http-backend` (CGI)."""
    backend = shutil.which("git")
    assert backend, "git is needed"

    def handle(request: BaseHTTPRequestHandler) -> None:
        path, _, query = request.path.partition("?")
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else _read_chunked(request)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(project_root), "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": request.command, "PATH_INFO": path, "QUERY_STRING": query,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "tester",
            "REMOTE_ADDR": "127.0.0.1", "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if request.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        done = subprocess.run([backend, "http-backend"], input=body, env=env,
                              capture_output=True, timeout=60)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(": ")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value))
        request.send_response(status)
        for key, value in headers:
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    return handle


def _read_chunked(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return b""
    data = b""
    while True:
        size = int(request.rfile.readline().strip(), 16)
        if size == 0:
            request.rfile.readline()
            return data
        data += request.rfile.read(size)
        request.rfile.readline()


def package_index_handler(root: Path) -> Callable[[BaseHTTPRequestHandler], None]:
    """A PEP 503 simple index: /simple/NAME/ lists the wheels under root/NAME/."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        parts = [p for p in request.path.split("?")[0].split("/") if p]
        if parts[:1] == ["simple"] and len(parts) == 2 and (root / parts[1]).is_dir():
            links = "".join(f'<a href="/files/{parts[1]}/{f.name}">{f.name}</a>\n'
                            for f in sorted((root / parts[1]).iterdir()))
            body = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
            content_type = "text/html"
        elif parts[:1] == ["files"] and len(parts) == 3 and (root / parts[1] / parts[2]).is_file():
            body = (root / parts[1] / parts[2]).read_bytes()
            content_type = "application/octet-stream"
        else:
            request.send_response(404)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        request.send_response(200)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


class TcpOrigin:
    """A TCP server on loopback that gives each connection to `serve`, in a thread of its
    own: for origins that must do what no HTTP server library would."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class ResettingOrigin(TcpOrigin):
    """Answers every request with a body announced longer than what it sends, then resets the
    connection (RST, not FIN): an origin that breaks off mid-transfer."""

    def __init__(self, framing: str, sent: int, tls: ssl.SSLContext | None = None) -> None:
        assert framing in ("length", "chunked")
        self.framing, self.sent, self.tls = framing, sent, tls
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:
                request += client.recv(4096) or b"\r\n\r\n"
            body = b"x" * self.sent
            if self.framing == "length":
                head = f"Content-Length: {self.sent * 2}"
            else:
                head = "Transfer-Encoding: chunked"
                body = f"{self.sent:x}\r\n".encode() + body + b"\r\n"
            client.sendall(f"HTTP/1.1 200 OK\r\n{head}\r\n\r\n".encode() + body)
            time.sleep(0.2)  # let it reach the client before the reset can overtake it
        except OSError:
            pass
        finally:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
