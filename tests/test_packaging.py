"""The built wheel installs beside dnspython without claiming its `dns` name (or any other
generic top-level name)."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("agent_egress-*.whl")
    return path


def test_wheel_has_only_the_agent_egress_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"agent_egress"}
    for data in ("agent_egress/rules/policy.schema.json", "agent_egress/rules/presets/github.yaml",
                 "agent_egress/py.typed"):
        assert data in names


def test_installs_beside_dnspython(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "dnspython", str(wheel)], check=True, capture_output=True)
    probe = ("import dns.resolver, dns.name, agent_egress.rules, agent_egress.dns; "
             "assert dns.name.from_text('a.test').to_text() == 'a.test.'; "
             "print(agent_egress.rules.Policy.__name__)")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Policy"
