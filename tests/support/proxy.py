"""`agent-egress run` (or mitmdump) as a user starts it: a subprocess on an ephemeral loopback
port, its output collected by a thread so that a test can wait for a line without hanging."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class Process:
    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.output: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.output.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self) -> str:
        return "".join(self.output)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = re.search(pattern, self.log())
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._reader.is_alive() and
                                      self.process.poll() is not None):
                    raise RuntimeError(f"no {pattern!r} in the output:\n{self.log()}")
                self._changed.wait(min(remaining, 0.5))

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    """Polls `condition` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# Plain HTTP through the request fast path (the default), and through mitmproxy alone: the tests
# of what may reach an origin run both ways (addons/requestpath.py)
REQUEST_PATHS: dict[str, dict[str, str]] = {
    "fast-requests": {},
    "mitmproxy-requests": {"AGENT_EGRESS_FAST_REQUESTS": "0"},
}

EPHEMERAL = ("--proxy", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--metrics", "127.0.0.1:0")


class RunningProxy(Process):
    def __init__(self, cli: str, directory: Path, policy: str | None, *args: str,
                 env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                 listen: tuple[str, ...] = EPHEMERAL) -> None:
        """`prefix` runs it under another command (`ip netns exec NS`); `listen` sets its
        listeners (by default each on an ephemeral loopback port)."""
        self.directory = directory
        self.audit_log = directory / "audit.jsonl"
        self.policy_file = directory / "policy.yaml"
        command = [*prefix, cli, "run", *listen, "--state-dir", str(directory / "state"),
                   "--audit-log", str(self.audit_log), *args]
        if "--control" not in args:  # not the machine's default socket, which another test or
            command += ["--control", "off"]  # a proxy of the machine's own may hold
        if policy is not None:
            self.policy_file.write_text(policy)
            command += ["--policy", str(self.policy_file)]
        super().__init__(command, env)
        try:
            self.port = int(self.wait_for(r"proxy listening on \S+:(\d+)").group(1))
            self.dns_port = int(self.wait_for(r"resolver listening on \S+:(\d+)").group(1))
            self.metrics_url = self.wait_for(r"metrics on (\S+)").group(1)
        except RuntimeError:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        lines = self.audit_log.read_text().split("\n")
        return [json.loads(line) for line in lines[:-1]]  # the last may be half-written

    def wait_for_events(self, predicate: Any, timeout: float = 10,
                        settle: float = 0.6) -> list[dict[str, Any]]:
        """Events are written by a background thread, in batches, and a line may wait (briefly)
        for its client's process: wait until one matches, then until no more have come for
        `settle` seconds, so that a test sees every line of what it did."""
        deadline = time.monotonic() + timeout
        matching: list[dict[str, Any]] = []
        steady_since = time.monotonic()
        while True:
            now = [e for e in self.events() if predicate(e)]
            if len(now) != len(matching):
                matching, steady_since = now, time.monotonic()
            if matching and time.monotonic() - steady_since >= settle or \
                    time.monotonic() > deadline:
                return matching
            time.sleep(0.05)
