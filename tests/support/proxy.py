"""`agent-egress run` as a user starts it: a subprocess on an ephemeral loopback port."""

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

_LISTENING = re.compile(r"proxy listening on (\S+):(\d+)")


class RunningProxy:
    def __init__(self, cli: str, directory: Path, policy: str | None, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.audit_log = directory / "audit.jsonl"
        self.policy_file = directory / "policy.yaml"
        command = [cli, "run", "--proxy", "127.0.0.1:0", "--state-dir", str(directory / "state"),
                   "--audit-log", str(self.audit_log), *args]
        if policy is not None:
            self.policy_file.write_text(policy)
            command += ["--policy", str(self.policy_file)]
        self.output: list[str] = []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **(env or {})})
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        found = threading.Event()
        port: list[int] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                match = _LISTENING.search(line)
                if match and not port:
                    port.append(int(match.group(2)))
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        found.wait(30)
        if not port:
            self.stop()
            raise RuntimeError("proxy did not start:\n" + "".join(self.output))
        return port[0]

    def log(self) -> str:
        return "".join(self.output)

    def events(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def wait_for_events(self, predicate: Any, timeout: float = 10) -> list[dict[str, Any]]:
        """Events are written by a background thread: wait until one matches."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [e for e in self.events() if predicate(e)]
            if matching or time.monotonic() > deadline:
                return matching
            time.sleep(0.05)

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
