"""TLS terminated by the proxy on the request fast path: the inspected tunnel's side.

An inspected CONNECT (a rule with `methods`, `paths` or `credential`) is answered by the tunnel
fast path like any allowed one; its ClientHello, already read (the SNI was checked against the
CONNECT), is fed to a TLS server end made here: Python's `ssl` over two memory BIOs, so the
bytes read before the handshake are not lost and the same code serves asyncio's and uvloop's
transports. The certificate comes from mitmproxy's certificate store (one CA, one cache with
mitmproxy's own path), made for the name the CONNECT named; its key is handed to `ssl` through
an anonymous memory file and never touches a disk. Only HTTP/1.1 is offered by ALPN: a client
that offers h2 alone is mitmproxy's (addons/fastpath.py hands it over before the handshake).

`DecryptedTransport` is what the request fast path (addons/requestpath.py) reads and writes:
an asyncio transport of the plaintext, with flow control passed through to the client's socket.
Upstream, the origin's certificate is verified as mitmproxy verifies it (`--upstream-ca`, else
the bundle mitmproxy uses), for the name, sent as SNI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

CONTEXTS_KEPT = 1024  # server contexts by name: each holds a certificate and its key
HANDSHAKE_SECONDS = 20.0  # as long as a request head may take (addons/limits.py)
_READ = 1 << 16
ALPN = ["http/1.1"]


class Certificates:
    """Server-side TLS contexts for names, with certificates from mitmproxy's store."""

    def __init__(self, certstore: Callable[[], Any]) -> None:
        """`certstore`: mitmproxy's CertStore, asked for when the first context is made (the
        TlsConfig addon loads it when it is configured)."""
        self.certstore = certstore
        self.contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def context(self, name: str) -> ssl.SSLContext:
        context = self.contexts.get(name)
        if context is not None:
            self.contexts.move_to_end(name)
            return context
        context = self.contexts[name] = self._make(name)
        if len(self.contexts) > CONTEXTS_KEPT:
            self.contexts.popitem(last=False)
        return context

    def _make(self, name: str) -> ssl.SSLContext:
        try:
            san: x509.GeneralName = x509.IPAddress(ip_address(name.strip("[]")))
        except ValueError:
            san = x509.DNSName(name)
        entry = self.certstore().get_cert(name, [san])
        key = entry.privatekey.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        chain = b"".join(cert.to_pem() for cert in [entry.cert, *entry.chain_certs])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(ALPN)
        # the key goes to OpenSSL through a memory file: no copy of it on any disk
        memory = os.memfd_create("agent-egress-leaf", os.MFD_CLOEXEC)
        try:
            os.write(memory, key + chain)
            context.load_cert_chain(f"/proc/self/fd/{memory}")
        finally:
            os.close(memory)
        return context


@dataclass(frozen=True)
class Inspection:
    """What the fast path needs to inspect a tunnel: certificates for the client's side, the
    context for the origin's."""

    certificates: Certificates
    upstream_tls: ssl.SSLContext


def upstream_context(upstream_ca: Path | None) -> ssl.SSLContext:
    """For connections to origins: verified against `--upstream-ca`, else the CA bundle
    mitmproxy verifies against, as mitmproxy's path does."""
    context = ssl.create_default_context(cafile=str(upstream_ca or certifi.where()))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    return context


class TlsServerEnd(asyncio.Protocol):
    """The client's socket: TLS records in and out; the plaintext to and from `inner`, the
    protocol of a DecryptedTransport."""

    def __init__(self, transport: asyncio.Transport, context: ssl.SSLContext,
                 handshaken: Callable[[DecryptedTransport], None],
                 failed: Callable[[str, bool], None],
                 gone: Callable[[], None]) -> None:
        """`handshaken` is called with the plaintext transport once the handshake is done
        (its protocol then takes the connection's end too), `failed` with the reason when
        the handshake fails, and whether the client broke it off (an alert, or closing: most
        often it does not trust the certificate); `gone` when the socket closed before a
        protocol took the plaintext."""
        self.raw = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaken = handshaken
        self.failed = failed
        self.gone = gone
        self.decrypted: DecryptedTransport | None = None
        self.inner: asyncio.Protocol | None = None
        self.failure: str | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def start(self, received: bytes) -> None:
        """Takes over the client's socket, beginning with what it sent already."""
        self.raw.set_protocol(self)
        self.deadline = asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, self._too_slow)
        self.data_received(received)
        self.raw.resume_reading()

    def close(self) -> None:
        """Closes the client's socket before the handshake is done (the listener closing)."""
        self._fail("the proxy closed the connection before the TLS handshake was done",
                   by_client=False)

    def _too_slow(self) -> None:
        self.deadline = None
        self._fail(f"no TLS handshake within {HANDSHAKE_SECONDS:.0f} s", by_client=False)

    def _fail(self, reason: str, by_client: bool = True) -> None:
        if self.failure is None:
            self.failure = reason
            self.raw.close()
            self.failed(reason, by_client)

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return  # refused: closing
        self.incoming.write(data)
        if self.decrypted is None:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.flush()
                return
            except ssl.SSLError as e:
                self.flush()  # the alert, if any
                self._fail(e.reason or str(e))
                return
            self.flush()
            if self.deadline is not None:
                self.deadline.cancel()
            self.decrypted = DecryptedTransport(self)
            self.handshaken(self.decrypted)
        self._read()

    def _read(self) -> None:
        chunks = []
        closed = False
        while True:
            try:
                chunk = self.tls.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            except ssl.SSLError as e:
                log.info("TLS from the client broke off: %s", e)
                self.flush()
                self.raw.abort()
                return
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            if not self.incoming.pending and not self.tls.pending():
                break  # all read: asking again would only raise SSLWantReadError (1 µs)
        self.flush()  # session tickets, key updates
        if chunks and self.inner is not None:
            self.inner.data_received(b"".join(chunks))
        # the client's close_notify: it sends no more; closed now unless a response is due
        if closed and not self.eof_received() and self.decrypted is not None:
            self.decrypted.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        written = self.tls.write(data) if data else 0
        if written < len(data):  # a partial write: the rest follows
            view = memoryview(data)[written:]
            while view:
                view = view[self.tls.write(view):]
        self.flush()

    def flush(self) -> None:
        out = self.outgoing.read()
        if out and not self.raw.is_closing():
            self.raw.write(out)

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # the peer's close_notify is not awaited
        self.flush()

    # The client's socket

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def eof_received(self) -> bool:
        if self.inner is None:
            return False
        return bool(self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.inner is not None:
            self.inner.connection_lost(exc)
            return
        if self.decrypted is None:
            self._fail(str(exc) if exc else "the client closed the connection during the TLS "
                       "handshake")
        self.gone()


class DecryptedTransport(asyncio.Transport):
    """The plaintext of a TLS connection the proxy terminated, as an asyncio transport."""

    def __init__(self, end: TlsServerEnd) -> None:
        super().__init__()
        self.end = end
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.end.raw.get_extra_info(name, default)  # peername, sockname: mitmproxy's

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.end.inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self.end.inner)

    def is_closing(self) -> bool:
        return self.closing or self.end.raw.is_closing()

    def close(self) -> None:
        if not self.is_closing():
            self.end.close_notify()
        self.closing = True
        self.end.raw.close()

    def abort(self) -> None:
        self.closing = True
        self.end.raw.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.is_closing():
            self.end.write(data)

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close: close_notify ends both directions

    def write_eof(self) -> None:
        """What mitmproxy does to a connection it half-closes (without asking
        can_write_eof): TLS's nearest, close_notify, after which nothing more is written."""
        if not self.is_closing():
            self.end.close_notify()
        self.closing = True

    def pause_reading(self) -> None:
        self.end.raw.pause_reading()

    def resume_reading(self) -> None:
        self.end.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.end.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.end.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.end.raw.set_write_buffer_limits(high, low)
