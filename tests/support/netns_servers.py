"""The far side of the transparent-mode tests, run inside their network namespace as root:
DNS for the test names, HTTP and HTTPS origins, raw TCP and UDP echo servers. Prints `ready`
and serves until killed. Usage: python netns_servers.py CA_DIR"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from support.dnsserver import TestDNS, Zone  # noqa: E402
from support.origins import Origin, TestCA  # noqa: E402

ORIGIN = "203.0.113.10"  # documentation addresses, on a dummy interface in the namespace
SSH = "203.0.113.22"
FOREIGN = "203.0.113.99"
NAMESERVER = "203.0.113.53"
NAMES = {"web.test": ORIGIN, "secure.test": ORIGIN, "denied.test": ORIGIN, "ssh.test": SSH,
         "other.test": FOREIGN, "mirror.test": SSH, "lure.test": SSH}
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


def main() -> None:
    ca = TestCA(Path(sys.argv[1]), list(NAMES))
    servers = [TestDNS(Zone({name: [address] for name, address in NAMES.items()}, EXTRAS),
                       NAMESERVER, 53)]
    origins = [Origin(host=ORIGIN, port=80), Origin(tls=ca.server_context(), host=ORIGIN,
                                                     port=443),
               Origin(host=FOREIGN, port=80), Origin(tls=ca.server_context(), host=FOREIGN,
                                                      port=443)]
    echoes: list[socketserver.BaseServer] = [
        socketserver.ThreadingTCPServer((address, 22), _Echo) for address in (SSH, FOREIGN)]
    echoes.append(socketserver.ThreadingUDPServer((ORIGIN, 443), _UdpEcho))
    for echo in echoes:
        threading.Thread(target=echo.serve_forever, daemon=True).start()
    running = (servers, origins, echoes)
    print(f"ready: {sum(len(group) for group in running)} servers", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
