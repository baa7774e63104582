"""The import contracts of pyproject.toml (`scripts/layout.py lint-imports`) fail when a layer is
crossed: each case plants one forbidden import in a copy of the tree and names the contract that
must break."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = ("agent_egress", "addons", "dns", "rules")


def copy_tree(destination: Path) -> Path:
    for name in SOURCES:
        shutil.copytree(ROOT / name, destination / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "scripts").mkdir()
    shutil.copyfile(ROOT / "scripts" / "layout.py", destination / "scripts" / "layout.py")
    shutil.copyfile(ROOT / "pyproject.toml", destination / "pyproject.toml")
    return destination


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(root / "scripts" / "layout.py"), "lint-imports"],
                          capture_output=True, text=True, timeout=120, check=False)


def verdicts(output: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from the summary (long names wrap over two lines)."""
    summary = output.split("-------------------------------------", 1)[-1]
    summary = summary.split("Contracts:", 1)[0].replace("\n", " ")
    found = {}
    for part in summary.replace(" KEPT", " KEPT\n").replace(" BROKEN", " BROKEN\n").splitlines():
        name, _, verdict = part.strip().rpartition(" ")
        if verdict in ("KEPT", "BROKEN"):
            found[name] = verdict
    return found


def test_the_tree_keeps_every_contract(tmp_path):
    done = lint_imports(copy_tree(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    found = verdicts(done.stdout)
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    assert len(found) == len(contracts) and set(found.values()) == {"KEPT"}, done.stdout


@pytest.mark.parametrize(("path", "planted", "contract"), [
    ("rules/engine.py", "import mitmproxy", "rules/ imports nothing of the project"),
    ("rules/hosts.py", "from agent_egress import upstream", "rules/ imports nothing"),
    ("agent_egress/audit.py", "import dnslib", "the audit log is written and read without"),
    ("agent_egress/runtime.py", "import agent_egress.dns.resolver", "runner and cli compose"),
    ("dns/wire.py", "from agent_egress.addons import denial", "runner and cli compose"),
    ("agent_egress/learn.py", "import agent_egress.dns.signals", "the offline tools read logs"),
    ("agent_egress/metrics.py", "from agent_egress.runtime import PolicyHolder", "no module-level"),
    ("agent_egress/gate.py", "import mitmproxy", "the gate and what it is made of"),
    ("agent_egress/checks.py", "from agent_egress.addons import denial", "the gate and what"),
    ("agent_egress/pinning.py", "import dnslib", "the gate and what it is made of"),
])
def test_a_crossed_layer_breaks_its_contract(tmp_path, path, planted, contract):
    root = copy_tree(tmp_path)
    with (root / path).open("a") as source:
        source.write(f"\n{planted}  # planted by the test\n")
    done = lint_imports(root)
    assert done.returncode != 0, done.stdout
    broken = [name for name, verdict in verdicts(done.stdout).items() if verdict == "BROKEN"]
    assert [name for name in broken if name.startswith(contract)], done.stdout


def test_an_import_for_typing_only_is_not_a_layer_crossing(tmp_path):
    root = copy_tree(tmp_path)
    with (root / "agent_egress" / "metrics.py").open("a") as source:
        source.write("\nif TYPE_CHECKING:\n    from agent_egress.runner import RunConfig\n")
    done = lint_imports(root)
    assert done.returncode == 0, done.stdout + done.stderr
