"""Who is on the other end of a proxy connection: the kernel's word on the socket's owner (uid,
user), the source address, and in the background the process that holds the socket."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .identity import Process, SocketOwner, SocketOwners, find_process, user_name
from .rules import Address, Identity, Name, host_text, normalize_host

if TYPE_CHECKING:
    from .connections import Tunnel

MAX_PENDING_LOOKUPS = 16
KNOWN_SOCKETS = 1024  # lookups kept by socket: a client asks again on the same socket


@dataclass(eq=False)
class Client:
    """A client connection as the gate knows it."""

    address: str  # ip:port, as the audit log spells it
    identity: Identity
    original: tuple[Address, int] | None = None  # transparent mode: where the client dialled
    process: Future[Process | None] | None = None
    tunnel: Tunnel | None = None  # the connection it asked for (CONNECT, transparent)
    pinned: dict[tuple[str, int], Address] = field(default_factory=dict)  # (name, port) -> ip
    promised: int = 0  # audit room for the request just decided, until begin_exchange takes it
    # the last request's (host, port, target authority, Host header) and the gate's check of
    # them (Gate._target_refusal): a kept-alive connection sends the same ones each time
    last_target: tuple[tuple[str, int, str, str | None], str | None] | None = None

    def known_process(self) -> Process | None:
        """The process, if the background lookup has found it by now."""
        process = self.process
        if process is None or not process.done() or process.cancelled():
            return None
        return process.result()


class ClientIdentifier:
    def __init__(self, owners: SocketOwners | None,
                 secrets: Callable[[], Collection[str]] = tuple) -> None:
        """`secrets`: the configured credentials' values now, kept out of command lines."""
        self.owners = owners
        self.secrets = secrets
        # One thread: scanning /proc is slow, and best effort is enough for who-ran-what.
        self._lookups = ThreadPoolExecutor(1, thread_name_prefix="process-lookup")
        self._pending = 0
        self._by_socket: OrderedDict[int, Future[Process | None]] = OrderedDict()

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def identify(self, peername: tuple[str, int], sockname: tuple[str, int],
                 transparent: bool = False) -> Client:
        """For a transparent connection `sockname` is where the client dialled (mitmproxy put
        SO_ORIGINAL_DST there)."""
        peer_ip, peer_port = peername[:2]
        source = _address(peer_ip)
        client = Client(f"{host_text(source)}:{peer_port}", Identity(source=source))
        if transparent:
            client.original = (_address(sockname[0]), sockname[1])
        if self.owners is None:
            return client
        # None for a remote client; a redirected one is found by conntrack's original tuple
        owner = (self.owners.redirected_owner(peername[:2], sockname[:2]) if transparent
                 else self.owners.owner(peername[:2], sockname[:2]))
        if owner is not None:
            client.identity = Identity(uid=owner.uid, user=user_name(owner.uid), source=source)
            client.process = self.process_of(owner)
        return client

    def process_of(self, owner: SocketOwner) -> Future[Process | None] | None:
        """The process holding `owner`'s socket, looked up in the background (once per
        socket); None when unknown or too many lookups are waiting."""
        if not owner.inode:
            return None
        known = self._by_socket.get(owner.inode)
        if known is not None:
            return known
        if self._pending >= MAX_PENDING_LOOKUPS:
            return None
        self._pending += 1
        lookup = self._lookups.submit(find_process, owner.inode, owner.uid, self.secrets())
        lookup.add_done_callback(self._lookup_done)
        self._by_socket[owner.inode] = lookup
        if len(self._by_socket) > KNOWN_SOCKETS:
            self._by_socket.popitem(last=False)
        return lookup

    def _lookup_done(self, _: Future[Process | None]) -> None:
        self._pending -= 1


def _address(text: str) -> Address:
    host = normalize_host(text)
    if isinstance(host, Name):
        raise ValueError(f"not an address: {text!r}")
    return host
