from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from support.dnsserver import TestDNS, Zone
from support.netns import system_user
from support.origins import (
    Origin,
    TestCA,
    git_handler,
    git_repository,
    package_files,
    package_index_handler,
)
from support.prometheus import prometheus_config
from support.prometheus import start_prometheus as start
from support.proxy import Process

# No deadlines: a test's speed is measured in bench/, never asserted, and a loaded CI machine
# would fail a property test for taking 250 ms on one example.
settings.register_profile("agent-egress", deadline=None)
settings.load_profile("agent-egress")

ROOT = Path(__file__).resolve().parent.parent
# The names the tests' DNS server answers; every origin listens on 127.0.0.1.
NAMES = ["web.test", "secure.test", "other.test", "git.test", "index.test", "denied.test",
         "inspect.test"]
INTERNAL_NAMES = {"metadata.test": "169.254.169.254", "intranet.test": "10.1.2.3"}
PUBLIC_NAMES = {"public.test": "203.0.113.5"}  # answers only: nothing is ever sent there


@pytest.fixture(scope="session")
def cli() -> str:
    """The installed console command, as a user runs it."""
    path = shutil.which("agent-egress", path=str(ROOT / ".venv" / "bin")) or shutil.which(
        "agent-egress")
    assert path, "agent-egress is not installed; run scripts/test"
    return path


@pytest.fixture(scope="session")
def two_users() -> list[str]:
    """Two local Unix users (created if missing) that tests run clients as."""
    if os.getuid() != 0:
        pytest.skip("creating users and running clients as them needs root")
    names = ["egress-test-a", "egress-test-b"]
    for name in names:
        system_user(name)
    return names


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"), NAMES)


@pytest.fixture(scope="session")
def dns() -> Iterator[TestDNS]:
    records = {name: ["127.0.0.1"] for name in NAMES}
    records.update({name: [address] for name, address in INTERNAL_NAMES.items()})
    records.update({name: [address] for name, address in PUBLIC_NAMES.items()})
    server = TestDNS(Zone(records))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def web() -> Iterator[Origin]:
    origin = Origin()
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def secure(test_ca: TestCA) -> Iterator[Origin]:
    origin = Origin(tls=test_ca.server_context())
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def git_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare repository with one commit, served as /repo.git."""
    return git_repository(tmp_path_factory.mktemp("git"))


@pytest.fixture(scope="session")
def git_origin(git_repo: Path, test_ca: TestCA) -> Iterator[Origin]:
    origin = Origin(git_handler(git_repo), tls=test_ca.server_context())
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def package_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages a PEP 503 index serves: one wheel, built here."""
    return package_files(tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="session")
def package_index(package_root: Path) -> Iterator[Origin]:
    """A PEP 503 index serving one wheel, over plain HTTP."""
    origin = Origin(package_index_handler(package_root))
    yield origin
    origin.stop()


# Fixtures that start real processes or servers: a test using any of them is end to end; so is
# every test of a module that builds and installs the package, runs import-linter over a copy of
# the tree, or drives the deployment's tools (promtool, systemd-analyze, nft, rsyslogd, ...).
_END_TO_END_FIXTURES = frozenset({"cli", "dns", "web", "secure", "git_origin", "package_index"})
_END_TO_END_MODULES = frozenset({"test_packaging.py", "test_layers.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the end-to-end tests `e2e`, so that `scripts/test -m "not e2e"` runs the fast,
    in-process rest."""
    for item in items:
        path = Path(str(item.path))
        if (_END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ()))
                or path.name in _END_TO_END_MODULES or path.parent.name == "deploy"):
            item.add_marker(pytest.mark.e2e)


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
