from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support.prometheus import prometheus_config
from support.prometheus import start_prometheus as start
from support.proxy import Process


@pytest.fixture
def start_prometheus(tmp_path) -> Iterator[Callable[..., tuple[str, Process]]]:
    """Starts Prometheus scraping a target (and sending alerts to an Alertmanager, if given);
    returns its URL and process, stopped afterwards."""
    started: list[Process] = []

    def run(target: str, alertmanager: str | None = None) -> tuple[str, Process]:
        directory = tmp_path / "prometheus"
        directory.mkdir()
        return start(directory, prometheus_config(directory, target, alertmanager), started)

    yield run
    for process in started:
        process.stop()
