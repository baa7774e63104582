"""More proxy processes on the explicit listener (`--workers N`).

mitmproxy runs on one core. The first process starts N-1 workers beside itself, each accepting
on its own SO_REUSEPORT socket bound to the same address, and the kernel spreads new
connections between them. Workers load the same policy file and watch it themselves. They
append to the same audit file (one `write()` per batch on O_APPEND: lines never interleave) or,
when the log is standard output, pass their lines through a pipe to the first process, which
writes them between its own. Their counters are added into the first process's /metrics. The
resolver, the metrics endpoint and the transparent listener stay in the first process.

A worker talks to the first process over a socket pair, one JSON document per line: it says
`{"ready": true}` (or `{"error": ...}`) once listening, answers `metrics` with its counter
samples, and stops when the pair closes, so no worker outlives the first process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from .audit import AuditLog

if TYPE_CHECKING:
    from .runner import RunConfig

log = logging.getLogger(__name__)

# Counters a worker keeps for what it serves, summed into /metrics. The others (policy reloads,
# build info, exposed listeners, process figures) describe the first process or the machine.
SUMMED = frozenset({"agent_egress_decisions", "agent_egress_decision_seconds",
                    "agent_egress_active_connections", "agent_egress_bytes",
                    "agent_egress_audit_events", "agent_egress_audit_write_errors",
                    "agent_egress_credentials_injected", "agent_egress_credential_leaks"})
AUDIT_COUNTS = frozenset({"agent_egress_audit_events", "agent_egress_audit_write_errors"})
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_LINE_LIMIT = 1 << 20


def bind_shared(address: tuple[str, int], count: int) -> list[socket.socket]:
    """`count` listening sockets on one address; port 0 picks a free port for all of them.
    Raises OSError if the address is taken."""
    sockets: list[socket.socket] = []
    host, port = address
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Worker:
    def __init__(self, number: int, process: asyncio.subprocess.Process,
                 control: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.number = number
        self.process = process
        self.reader, self.writer = control
        self.lock = asyncio.Lock()

    async def request(self, line: bytes) -> Any:
        async with self.lock:
            self.writer.write(line)
            await self.writer.drain()
            return json.loads(await self.reader.readline())


class WorkerPool:
    """The workers beside this process: started, restarted if one dies, stopped."""

    def __init__(self, config: RunConfig, audit: AuditLog) -> None:
        self.config = config
        self.audit = audit
        self.relay = config.audit_log is None  # workers' lines come through this process
        self.workers: dict[int, _Worker] = {}
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._supervisors: set[asyncio.Task[None]] = set()
        self._pipes: dict[int, bytearray] = {}
        self.address: tuple[str, int] = ("", 0)

    async def start(self, sockets: list[socket.socket]) -> None:
        """One worker per socket (each socket is closed here once its worker has it).
        Raises RuntimeError with the worker's reason if one cannot start."""
        self.address = sockets[0].getsockname()[:2]
        try:
            started = await asyncio.gather(
                *(self._spawn(n, sock) for n, sock in enumerate(sockets, start=1)))
        finally:
            for sock in sockets:
                sock.close()
        for worker in started:
            self._supervise(worker)

    def signal(self, signum: int) -> None:
        for worker in self.workers.values():
            # not Process.send_signal: it polls, reaping the exit status that asyncio's child
            # watcher then fails to find. Unreaped, the pid cannot have been reused.
            if worker.process.returncode is None:
                os.kill(worker.process.pid, signum)

    async def stop(self) -> None:
        """Stops every worker (each writes its queued audit events first) and writes what
        they passed through."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        self.signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("proxy worker %d (pid %d) did not stop in %.0f s: killed",
                          worker.number, worker.process.pid, STOP_TIMEOUT)
                worker.process.kill()
                await worker.process.wait()
            worker.writer.close()
        for fd in list(self._pipes):
            self._loop.remove_reader(fd)
            while self._pass_through(fd):
                pass

    def samples(self) -> list[list[Any]]:
        """Every worker's summed counters as [family, sample, labels, value]; called from
        the metrics server's thread."""
        future = asyncio.run_coroutine_threadsafe(self._samples(), self._loop)
        return future.result(timeout=10)

    async def _samples(self) -> list[list[Any]]:
        async def ask(worker: _Worker) -> list[list[Any]]:
            try:
                result: list[list[Any]] = await asyncio.wait_for(
                    worker.request(b"metrics\n"), 5)
                return result
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
                log.warning("no metrics from proxy worker %d: %r", worker.number, e)
                return []
        answers = await asyncio.gather(*(ask(w) for w in self.workers.values()))
        return [sample for answer in answers for sample in answer]

    async def _spawn(self, number: int, sock: socket.socket) -> _Worker:
        ours, theirs = socket.socketpair()
        pipe_out = None
        if self.relay:
            pipe_in, pipe_out = os.pipe()
            os.set_blocking(pipe_in, False)
            self._pipes[pipe_in] = bytearray()
            self._loop.add_reader(pipe_in, self._pass_through, pipe_in)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent_egress.worker", self.config.to_json(),
                str(sock.fileno()), str(theirs.fileno()),
                stdin=subprocess.DEVNULL, stdout=pipe_out,
                pass_fds=(sock.fileno(), theirs.fileno()))
        finally:
            theirs.close()
            if pipe_out is not None:
                os.close(pipe_out)
        worker = _Worker(number, process,
                         await asyncio.open_connection(sock=ours, limit=_LINE_LIMIT))
        try:
            hello = json.loads(await asyncio.wait_for(worker.reader.readline(), READY_TIMEOUT))
        except (ValueError, TimeoutError) as e:
            process.kill()
            raise RuntimeError(f"proxy worker {number} did not start: {e!r}") from None
        if not hello.get("ready"):
            await process.wait()
            raise RuntimeError(f"proxy worker {number}: {hello.get('error')}")
        self.workers[number] = worker
        return worker

    def _supervise(self, worker: _Worker) -> None:
        task = asyncio.create_task(self._restart_when_gone(worker))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)

    async def _restart_when_gone(self, worker: _Worker) -> None:
        """A worker that dies takes its socket with it (the kernel sends its share of new
        connections to the others); a new one gets a new socket on the same address."""
        code = await worker.process.wait()
        worker.writer.close()
        while not self._stopping:
            log.error("proxy worker %d (pid %d) exited with %s; starting another",
                      worker.number, worker.process.pid, code)
            await asyncio.sleep(1)
            try:
                [sock] = bind_shared(self.address, 1)
                try:
                    replacement = await self._spawn(worker.number, sock)
                finally:
                    sock.close()
                self._supervise(replacement)
                log.warning("proxy worker %d started again (pid %d)", worker.number,
                            replacement.process.pid)
                return
            except (OSError, RuntimeError) as e:
                log.error("cannot restart proxy worker %d: %s", worker.number, e)

    def _pass_through(self, fd: int) -> bool:
        """Moves complete lines from a worker's pipe to the audit log; False at the end."""
        buffer = self._pipes[fd]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if data:
            buffer += data
            end = buffer.rfind(b"\n") + 1
            if end:
                self.audit.append_lines(bytes(buffer[:end]))
                del buffer[:end]
            return True
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._pipes[fd]
        if buffer:
            log.error("a proxy worker's last audit line was cut short: %d bytes", len(buffer))
        return False


def summed_samples(registry: CollectorRegistry, relayed: bool) -> list[list[Any]]:
    """A worker's answer to `metrics`; without the audit counts when its lines are relayed
    (the first process counts them as it writes them)."""
    names = SUMMED - AUDIT_COUNTS if relayed else SUMMED
    return [[metric.name, sample.name, sample.labels, sample.value]
            for metric in registry.collect() if metric.name in names
            for sample in metric.samples]


class WithWorkers(Collector):
    """This process's metrics with the workers' counters added in."""

    def __init__(self, registry: CollectorRegistry, pool: WorkerPool) -> None:
        self.registry = registry
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        added: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = (
            defaultdict(dict))
        for family, name, labels, value in self.pool.samples():
            key = name, tuple(sorted(labels.items()))
            added[family][key] = added[family].get(key, 0.0) + value
        for metric in self.registry.collect():
            extra = added.pop(metric.name, None)
            if extra:
                samples = [sample._replace(value=sample.value + extra.pop(
                    (sample.name, tuple(sorted(sample.labels.items()))), 0.0))
                    for sample in metric.samples]
                # series only a worker has seen so far (an account this process has not served)
                samples += [Sample(name, dict(labels), value)
                            for (name, labels), value in extra.items()]
                metric.samples = samples
            yield metric
