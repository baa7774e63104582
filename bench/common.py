"""Helpers shared by bench_proxy.py and bench_identity.py: the machine's description, ports,
child processes that are always stopped, percentiles and markdown tables."""

from __future__ import annotations

import math
import os
import platform
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path


def machine() -> str:
    """CPU model, cores, kernel, Python and the load average, for a results header."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{date.today()}, {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"CPython {platform.python_version()}, load average {load}")


def free_port() -> int:
    """A loopback TCP port free right now (for servers that cannot report the one they got)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raises RLIMIT_NOFILE to at least `wanted` (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of unsorted values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class CpuWatch:
    """CPU time the machine spent on processes other than ours: this one, the `pids` given and
    their children (proxy workers), and the children it waited for (the load generators),
    between start() and stop(). On a shared
    machine it says whether a figure was taken while something else ran."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = (0.0, 0.0, 0.0)

    @staticmethod
    def _machine_busy() -> float:
        user, nice, system = (int(x) for x in Path("/proc/stat").read_text().split()[1:4])
        return (user + nice + system) / os.sysconf("SC_CLK_TCK")

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids + [child for parent in self.pids for child in _children(parent)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def start(self) -> None:
        self._start = (time.monotonic(), self._machine_busy(), self._ours())

    def wait_quiet(self, cores: float = 0.1, timeout: float = 20) -> float:
        """Waits (1 s at least, `timeout` at most) until the others use under `cores`."""
        deadline = time.monotonic() + timeout
        while True:
            self.start()
            time.sleep(1)
            others = self.stop()
            if others < cores or time.monotonic() > deadline:
                return others

    def stop(self) -> float:
        """Cores' worth of CPU the others used (0.5: half a core) since start()."""
        elapsed = time.monotonic() - self._start[0]
        others = (self._machine_busy() - self._start[1]) - (self._ours() - self._start[2])
        return max(0.0, others / elapsed) if elapsed > 0 else 0.0


class Service:
    """A child process in its own process group, stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self, name: str, command: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        self.pid = self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n"
                                   f"{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} does not listen on {port}:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
