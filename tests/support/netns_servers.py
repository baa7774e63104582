"""The far side of the transparent-mode tests, run as root inside the namespace that holds its
addresses (documentation ranges, plus the metadata and private-range addresses an attacker
would aim at): DNS for the test names, HTTP and HTTPS origins, git smart-HTTP, a package
index, raw TCP and UDP echo servers. Prints `ready` and serves until killed.
Usage: python netns_servers.py DIRECTORY (the test CA's certificate is written there)"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from support.dnsserver import TestDNS, Zone  # noqa: E402
from support.origins import (  # noqa: E402
    Origin,
    TestCA,
    _hello,
    git_handler,
    git_repository,
    package_files,
    package_index_handler,
)

ORIGIN = "203.0.113.10"
SSH = "203.0.113.22"  # an SSH-like server: answers the client's first line
GIT = "203.0.113.30"
INDEX = "203.0.113.40"
NAMESERVER = "203.0.113.53"
FOREIGN = "203.0.113.99"
ORIGIN6 = "2001:db8::10"
METADATA = "169.254.169.254"  # a cloud metadata service
PRIVATE = "10.20.30.40"  # an internal service: HTTP, and a database on 5432
FAR_SIDE = (ORIGIN, SSH, GIT, INDEX, NAMESERVER, FOREIGN, ORIGIN6, METADATA, PRIVATE)
NAMES = {"web.test": [ORIGIN], "secure.test": [ORIGIN], "denied.test": [ORIGIN],
         "inspect.test": [ORIGIN], "ssh.test": [SSH], "other.test": [FOREIGN],
         "git.test": [GIT], "index.test": [INDEX],
         "dual.test": [ORIGIN, ORIGIN6], "v6only.test": [ORIGIN6],
         "metadata.test": [METADATA], "intranet.test": [PRIVATE],
         "mirror.test": [SSH], "lure.test": [SSH]}
# lure.test's server also answers for a name nobody asked about, at the foreign address
EXTRAS = {"lure.test": [f"answer other.test. 60 A {FOREIGN}"]}


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(4096)
        self.request.sendall(b"echo: " + data)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(b"echo: " + data, self.client_address)


def _hello_or_headers(request: BaseHTTPRequestHandler) -> None:
    """`/headers/...` answers with the header lines the origin received (what the proxy sent
    on), anything else with hello."""
    if not request.path.startswith("/headers/"):
        _hello(request)
        return
    body = "".join(f"{name}: {value}\n" for name, value in request.headers.items()).encode()
    request.send_response(200)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


class _Tcp6(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6


def main() -> None:
    directory = Path(sys.argv[1])
    ca = TestCA(directory, list(NAMES))
    served = directory / "served"
    servers = [TestDNS(Zone(NAMES, EXTRAS), NAMESERVER, 53),
               TestDNS(Zone(NAMES, EXTRAS), ORIGIN6, 53)]
    origins = [Origin(_hello_or_headers, host=host, port=80)
               for host in (ORIGIN, FOREIGN, ORIGIN6, METADATA, PRIVATE)]
    origins += [Origin(_hello_or_headers, tls=ca.server_context(), host=host, port=443)
                for host in (ORIGIN, FOREIGN, ORIGIN6)]
    origins += [Origin(git_handler(git_repository(served / "git")), tls=ca.server_context(),
                       host=GIT, port=443),
                Origin(package_index_handler(package_files(served / "index")),
                       tls=ca.server_context(), host=INDEX, port=443)]
    echoes: list[socketserver.BaseServer] = [
        socketserver.ThreadingTCPServer((address, port), _Echo)
        for address, port in ((SSH, 22), (FOREIGN, 22), (PRIVATE, 5432))]
    echoes += [_Tcp6((ORIGIN6, 22), _Echo),
               socketserver.ThreadingUDPServer((ORIGIN, 443), _UdpEcho)]
    for echo in echoes:
        threading.Thread(target=echo.serve_forever, daemon=True).start()
    running = (servers, origins, echoes)
    print(f"ready: {sum(len(group) for group in running)} servers", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
