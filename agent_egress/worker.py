"""A proxy worker process, started by `agent-egress run --workers N` (see workerpool.py):
`python -m agent_egress.worker CONFIG_JSON LISTEN_FD CONTROL_FD`."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace

from prometheus_client import CollectorRegistry

from . import ocsf
from .addons.enforce import Enforcer
from .audit import AuditLog
from .gate import Gate
from .rules import PolicyError
from .runner import (
    Listening,
    RunConfig,
    master_for,
    run_loop,
    runtime_for,
    settle_heap,
    stop_proxy,
)
from .runtime import PolicyHolder
from .workerpool import summed_samples


async def serve_worker(config: RunConfig, listener: socket.socket,
                       control: socket.socket) -> int:
    reader, writer = await asyncio.open_connection(sock=control)

    def say(message: object) -> None:
        writer.write(json.dumps(message).encode() + b"\n")

    try:
        policies = PolicyHolder(config.policy)
    except PolicyError as e:  # the first process loaded it a moment ago: say why, and stop
        say({"error": f"cannot load the policy: {e}"})
        await writer.drain()
        return 1
    audit = AuditLog(config.audit_log, ocsf.formatter(config.audit_format))
    runtime = runtime_for(config, policies, audit)
    enforcer = Enforcer(Gate(runtime))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, policies.request_reload)
    loop.add_signal_handler(signal.SIGUSR1, audit.reopen)
    watcher = asyncio.create_task(policies.watch())
    listening = Listening()
    master = master_for(replace(config, transparent=None), config.state_dir / "mitmproxy",
                        enforcer, listening, listener)
    proxy_task = asyncio.create_task(master.run())
    try:
        if not await listening.addresses:
            say({"error": "cannot listen on the shared socket"})
            return 1
        say({"ready": True})
        settle_heap()
        requests = asyncio.create_task(_answer(reader, say, runtime.metrics.registry,
                                               relayed=config.audit_log is None))
        await asyncio.wait([requests, proxy_task, asyncio.create_task(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        requests.cancel()
        return 0
    finally:
        watcher.cancel()
        await stop_proxy(master, proxy_task)
        audit.close()
        if runtime.owners is not None:
            runtime.owners.close()
        enforcer.done()
        writer.close()


async def _answer(reader: asyncio.StreamReader, say: Callable[[object], None],
                  registry: CollectorRegistry, relayed: bool) -> None:
    """Answers the first process until it closes the pair (it has gone)."""
    while line := await reader.readline():
        if line.strip() == b"metrics":
            say(summed_samples(registry, relayed))


def main() -> int:
    config_json, listen_fd, control_fd = sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="agent-egress worker: %(levelname)s "
                                                   "%(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    listener = socket.socket(fileno=int(listen_fd))
    listener.setblocking(False)
    control = socket.socket(fileno=int(control_fd))
    config = RunConfig.from_json(config_json)
    return run_loop(serve_worker(config, listener, control), config.loop)


if __name__ == "__main__":
    sys.exit(main())
