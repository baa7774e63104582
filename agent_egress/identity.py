"""Who is on the other end of a loopback connection: the kernel's answer, not the client's.

The owner's uid comes from netlink sock_diag with an exact socket lookup (one request, one
answer, whatever the number of sockets on the machine; `bench/bench_identity.py` measures it
against reading /proc/net/tcp). The process behind the socket is found by scanning /proc for the
socket's inode: slow, so it is best effort, cached, and done off the event loop.

A connection that nftables redirected to the transparent listener reaches it from whatever
address NAT left it: when the redirected addresses would clash with another connection's, NAT
gives the client another port, and nothing on this machine is bound there. conntrack keeps the
client's original addresses; one netlink query for the connection as the listener sees it gives
them back, and the socket look-up is exact again (`SocketOwners.redirected_owner`).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from .redact import redact_cmdline

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
TCP_TIME_WAIT = 6
TCP_LISTEN = 10
_LIVE_STATES = ~((1 << TCP_TIME_WAIT) | (1 << TCP_LISTEN)) & 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_NO_COOKIE = (0xFFFFFFFF, 0xFFFFFFFF)
_HEADER = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI")
_MESSAGE = struct.Struct("=BBBB48sIIIII")
# ctnetlink (linux/netfilter/nfnetlink_conntrack.h): a GET by one direction's tuple answers
# with the whole entry
NETLINK_NETFILTER = 12
_CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET
_NFGENMSG = struct.Struct("=BBH")
_ATTRIBUTE = struct.Struct("=HH")
_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

log = logging.getLogger(__name__)

Address = tuple[IPv4Address | IPv6Address, int]


@dataclass(frozen=True, slots=True)
class SocketOwner:
    uid: int
    inode: int


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    exe: str | None
    cmdline: str | None
    ancestry: tuple[str, ...] = ()  # EXE[PID], this process first, then its parents


class _Netlink:
    """One netlink socket asked one question at a time, from any thread."""

    def __init__(self, protocol: int) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                     protocol)
        self._lock = threading.Lock()
        self._sequence = 0

    def close(self) -> None:
        self._socket.close()

    def ask(self, message_type: int, request: bytes) -> tuple[int | None, bytes]:
        """The kernel's reply to one request, and its error: None for an answer, else the
        errno of an error message (0 for a bare acknowledgement, which answers nothing)."""
        with self._lock:
            self._sequence = (self._sequence + 1) & 0xFFFFFFFF
            self._socket.send(_HEADER.pack(_HEADER.size + len(request), message_type,
                                           NLM_F_REQUEST, self._sequence, 0) + request)
            reply = self._socket.recv(65536)
        _length, kind, _flags, _seq, _pid = _HEADER.unpack_from(reply)
        if kind != NLMSG_ERROR:
            return None, reply
        (code,) = struct.unpack_from("=i", reply, _HEADER.size)
        return -code, reply


class SocketOwners:
    """Finds the owner of the local end of a TCP or UDP connection, by its two addresses.
    `transparent_port`: the port of the listener that nftables redirects TCP to."""

    def __init__(self, transparent_port: int | None = None) -> None:
        self._diag = _Netlink(NETLINK_SOCK_DIAG)
        self.transparent_port = transparent_port
        self.conntrack = Conntrack()

    def close(self) -> None:
        self._diag.close()
        self.conntrack.close()

    def redirected_owner(self, peer: tuple[str, int],
                         original_dst: tuple[str, int]) -> SocketOwner | None:
        """The owner of a client that nftables redirected to the transparent listener: `peer`
        is its address as the listener sees it, `original_dst` where it was going
        (SO_ORIGINAL_DST). conntrack names the client's own address, which NAT may have
        changed on the way, and the socket there is looked up exactly. None when conntrack
        does not hold the connection, or holds it as going elsewhere. Without CAP_NET_ADMIN
        (or without `transparent_port`) conntrack cannot be asked: the socket at `peer` is
        taken unless it is this process's own, so a client whose port NAT changed goes
        unidentified (denied, unless a `default` account takes it), unless another socket
        happens to have the addresses NAT gave it."""
        peer_ip, destination = _unmap(peer[0]), (_unmap(original_dst[0]), original_dst[1])
        if self.transparent_port is not None and self.conntrack.readable:
            loopback = ip_address("127.0.0.1" if peer_ip.version == 4 else "::1")
            original = self.conntrack.original(
                (loopback, self.transparent_port), (peer_ip, peer[1]), socket.IPPROTO_TCP)
            if self.conntrack.readable:  # it answered (refused, it falls back below)
                if original is None or original[1] != destination:
                    return None
                source = original[0]
                return self.owner((str(source[0]), source[1]), original_dst)
        owner = self.owner(peer, original_dst)
        return None if owner is not None and owner.inode and owner.uid == os.geteuid() \
            else owner

    def resolver_client_owner(self, client: tuple[str, int], server: tuple[str, int],
                              protocol: int) -> SocketOwner | None:
        """The owner of a query to the resolver at `server` from `client`. A query nftables
        redirected here comes from a socket whose peer is the server it asked for, not this
        one, and NAT may have moved its port: conntrack names its real addresses. Without
        conntrack, the socket bound at `client` is taken, whoever its peer."""
        owner = self.owner(client, server, protocol)
        if owner is not None:
            return owner
        if self.conntrack.readable:
            original = self.conntrack.original((_unmap(server[0]), server[1]),
                                               (_unmap(client[0]), client[1]), protocol)
            if self.conntrack.readable:  # it answered
                if original is None:
                    return None
                source, destination = original
                return self.owner((str(source[0]), source[1]),
                                  (str(destination[0]), destination[1]), protocol)
        return self.owner_of_local(client, protocol)

    def owner_of_local(self, local: tuple[str, int], protocol: int) -> SocketOwner | None:
        """The socket bound to `local`, whoever its peer: for a client whose connection was
        redirected here (nftables), so that the peer it asked for is not this server. Scans
        the protocol's sockets, so it is kept off the proxy's path."""
        address = _unmap(local[0])
        for entry in dump_sockets(protocol):
            if entry.local == (address, local[1]) or (
                    entry.local[1] == local[1] and entry.local[0].is_unspecified
                    and entry.local[0].version == address.version):
                return SocketOwner(entry.uid, entry.inode)
        return None

    def owner(self, local: tuple[str, int], remote: tuple[str, int],
              protocol: int = socket.IPPROTO_TCP) -> SocketOwner | None:
        """The socket whose own address is `local` and whose peer is `remote`."""
        if protocol == socket.IPPROTO_UDP:
            # The kernel looks UDP sockets up as the receiver of a datagram from `src` to
            # `dst` (so unconnected sockets are found too): the client is the receiver.
            local, remote = remote, local
        local_ip, remote_ip = _unmap(local[0]), _unmap(remote[0])
        if local_ip.version != remote_ip.version:
            return None
        family = socket.AF_INET if local_ip.version == 4 else socket.AF_INET6
        sockid = struct.pack("!HH16s16s", local[1], remote[1], local_ip.packed.ljust(16, b"\0"),
                             remote_ip.packed.ljust(16, b"\0"))
        sockid += struct.pack("=III", 0, *_NO_COOKIE)
        request = _REQUEST.pack(family, protocol, 0, 0, _ALL_STATES) + sockid
        error, reply = self._diag.ask(SOCK_DIAG_BY_FAMILY, request)
        if error in (errno.ENOENT, 0):
            return None
        if error is not None:
            raise OSError(error, os.strerror(error))
        fields = _MESSAGE.unpack_from(reply, _HEADER.size)
        if fields[1] == TCP_TIME_WAIT and protocol == socket.IPPROTO_TCP:
            # A closed connection's TIME_WAIT entry, which has no owner, can share its
            # addresses with a new one that reused the port (tcp_tw_reuse); the kernel's exact
            # look-up may give the old one. The new one is found among the live sockets.
            return next((SocketOwner(entry.uid, entry.inode)
                         for entry in dump_sockets(protocol, _LIVE_STATES, family)
                         if entry.local == (local_ip, local[1])
                         and entry.remote == (remote_ip, remote[1])), None)
        return SocketOwner(uid=fields[8], inode=fields[9])


class Conntrack:
    """conntrack's entries, asked over ctnetlink. The kernel answers only a caller with
    CAP_NET_ADMIN; without it `readable` turns False at the first query (logged once)."""

    def __init__(self) -> None:
        self._netlink = _Netlink(NETLINK_NETFILTER)
        self.readable = True

    def close(self) -> None:
        self._netlink.close()

    def original(self, reply_source: Address, reply_destination: Address,
                 protocol: int) -> tuple[Address, Address] | None:
        """The original direction's (source, destination) of the entry whose reply
        direction goes from `reply_source` to `reply_destination`: for a connection that
        NAT redirected, where its client really is and where it was really going. None if
        there is no such entry, or conntrack cannot be read (see `readable`)."""
        family = socket.AF_INET if reply_source[0].version == 4 else socket.AF_INET6
        request = _NFGENMSG.pack(family, 0, 0) + _attribute(
            CTA_TUPLE_REPLY | _NESTED, _tuple(reply_source, reply_destination, protocol))
        error, reply = self._netlink.ask(_CT_GET, request)
        if error in (errno.ENOENT, 0):
            return None
        if error == errno.EPERM:
            if self.readable:
                log.warning("conntrack cannot be read (CAP_NET_ADMIN is needed): a "
                            "redirected client whose port NAT changed goes unidentified")
            self.readable = False
            return None
        if error is not None:
            raise OSError(error, os.strerror(error))
        length = _HEADER.unpack_from(reply)[0]
        attributes = _attributes(reply[_HEADER.size + _NFGENMSG.size:length])
        if CTA_TUPLE_ORIG not in attributes:
            return None
        return _parse_tuple(attributes[CTA_TUPLE_ORIG])


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _ATTRIBUTE.size + len(payload)
    return _ATTRIBUTE.pack(length, kind) + payload + bytes(-length % 4)


def _attributes(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + _ATTRIBUTE.size <= len(data):
        length, kind = _ATTRIBUTE.unpack_from(data, offset)
        if length < _ATTRIBUTE.size:
            break
        found[kind & ~_NESTED] = data[offset + _ATTRIBUTE.size:offset + length]
        offset += (length + 3) & ~3
    return found


def _tuple(source: Address, destination: Address, protocol: int) -> bytes:
    v6 = source[0].version == 6
    addresses = (_attribute(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, source[0].packed)
                 + _attribute(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, destination[0].packed))
    ports = (_attribute(CTA_PROTO_NUM, bytes([protocol]))
             + _attribute(CTA_PROTO_SRC_PORT, struct.pack("!H", source[1]))
             + _attribute(CTA_PROTO_DST_PORT, struct.pack("!H", destination[1])))
    return (_attribute(CTA_TUPLE_IP | _NESTED, addresses)
            + _attribute(CTA_TUPLE_PROTO | _NESTED, ports))


def _parse_tuple(data: bytes) -> tuple[Address, Address] | None:
    parts = _attributes(data)
    addresses = _attributes(parts.get(CTA_TUPLE_IP, b""))
    ports = _attributes(parts.get(CTA_TUPLE_PROTO, b""))
    source = addresses.get(CTA_IP_V4_SRC) or addresses.get(CTA_IP_V6_SRC)
    destination = addresses.get(CTA_IP_V4_DST) or addresses.get(CTA_IP_V6_DST)
    if not source or not destination or CTA_PROTO_SRC_PORT not in ports \
            or CTA_PROTO_DST_PORT not in ports:
        return None
    (source_port,) = struct.unpack("!H", ports[CTA_PROTO_SRC_PORT][:2])
    (destination_port,) = struct.unpack("!H", ports[CTA_PROTO_DST_PORT][:2])
    return ((ip_address(source), source_port), (ip_address(destination), destination_port))


@dataclass(frozen=True, slots=True)
class SocketEntry:
    local: tuple[IPv4Address | IPv6Address, int]
    remote: tuple[IPv4Address | IPv6Address, int]
    uid: int
    inode: int


def dump_sockets(protocol: int, states: int = _ALL_STATES,
                 *families: int) -> list[SocketEntry]:
    """Every socket of `protocol` in `states` (a bit mask of TCP states), of `families`
    (default IPv4 and IPv6)."""
    entries = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as diag:
        for family in families or (socket.AF_INET, socket.AF_INET6):
            request = _REQUEST.pack(family, protocol, 0, 0, states) + bytes(48)
            diag.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
            entries += _read_dump(diag, family)
    return entries


def _read_dump(diag: socket.socket, family: int) -> list[SocketEntry]:
    entries: list[SocketEntry] = []
    while True:
        data = diag.recv(1 << 16)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
            if kind in (NLMSG_DONE, NLMSG_ERROR):
                return entries
            fields = _MESSAGE.unpack_from(data, offset + _HEADER.size)
            sockid = fields[4]
            local_port, remote_port = struct.unpack_from("!HH", sockid)
            size = 4 if family == socket.AF_INET else 16
            local, remote = sockid[4:4 + size], sockid[20:20 + size]
            entries.append(SocketEntry((ip_address(local), local_port),
                                       (ip_address(remote), remote_port), fields[8], fields[9]))
            offset += (length + 3) & ~3


def _unmap(text: str) -> IPv4Address | IPv6Address:
    address = ip_address(text.partition("%")[0])
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def find_process(inode: int, uid: int, secrets: Collection[str] = ()) -> Process | None:
    """The process holding socket `inode`, among `uid`'s processes. Reading another user's
    /proc/PID/fd needs root or CAP_SYS_PTRACE; without it this finds nothing. `secrets`: values
    (configured credentials) hidden in its command line besides what redact.py finds by
    itself. Called from one thread only."""
    if (known := _socket_owners.pop(inode, None)) is not None and known[1] == uid:
        return known[0]
    last = _last_process.get(uid)
    names = itertools.chain([str(last)] if last else [], (e.name for e in os.scandir("/proc")))
    for name in names:
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            sockets = _sockets_of(name)
        except OSError:
            continue
        if inode in sockets:
            process = _describe(int(name), secrets, uid)
            _last_process[uid] = process.pid
            # A client opening connections at once has its next ones' sockets open already:
            # this scan finds them, so their own lookups need not read /proc again.
            if len(_socket_owners) > _MAX_SOCKET_OWNERS:
                _socket_owners.clear()
            _socket_owners.update(dict.fromkeys(sockets - {inode}, (process, uid)))
            return process
    return None


def _sockets_of(pid: str) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


_last_process: dict[int, int] = {}  # uid -> the pid found last: clients reconnect
# socket inode -> (process, uid) seen in the last scans; inodes are not reused while the socket is
# open, and one that was looked up or closed is dropped with the rest when the map fills up
_socket_owners: dict[int, tuple[Process, int]] = {}
_MAX_SOCKET_OWNERS = 4096


def _describe(pid: int, secrets: Collection[str] = (), uid: int | None = None) -> Process:
    exe = _exe(pid)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read(MAX_CMDLINE + 1)
        cmdline: str | None = describe_cmdline(data, secrets)
    except OSError:
        cmdline = None
    return Process(pid, exe, cmdline, ancestry(pid, uid, exe))


MAX_CMDLINE = 4096
MAX_ANCESTRY = 8


def ancestry(pid: int, uid: int | None, exe: str | None = None) -> tuple[str, ...]:
    """`pid` and its ancestors as `EXE[PID]`, nearest first, up to (not including) the first
    process of another uid than `uid` (its own, if None), at most MAX_ANCESTRY: for an agent,
    `curl[…]`, `bash[…]`, `codex[…]`. A process whose executable cannot be read (gone, or
    another user's without the privilege) is named by its command name; the chain ends at
    a process that has gone."""
    chain: list[str] = []
    current: int | None = pid
    while current and len(chain) < MAX_ANCESTRY:
        try:
            owner = os.stat(f"/proc/{current}").st_uid
            with open(f"/proc/{current}/stat", "rb") as f:
                stat = f.read(4096)
        except OSError:
            break
        if uid is None:
            uid = owner
        elif owner != uid:
            break
        command, _, rest = stat.rpartition(b")")
        fields = rest.split()
        name = os.path.basename(exe or _exe(current) or "")
        if not name:
            name = command.partition(b"(")[2].decode(errors="replace")
        chain.append(f"{name}[{current}]")
        exe = None
        current = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return tuple(chain)


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def describe_cmdline(data: bytes, secrets: Collection[str] = ()) -> str:
    """/proc/PID/cmdline as the audit log shows it: secrets redacted (redact.py). When it is
    longer than MAX_CMDLINE, the argument cut in two is dropped, not kept in part: a token's
    first half matches no token shape, and a configured secret's first half is not the
    secret."""
    truncated = len(data) > MAX_CMDLINE
    argv = data[:MAX_CMDLINE].rstrip(b"\0").decode(errors="replace").split("\0")
    if truncated:
        argv = argv[:-1]
    text = " ".join(redact_cmdline(argv, secrets))
    return f"{text} [truncated]" if truncated else text
