"""The built wheel installs beside dnspython without claiming its `dns` name (or any other
generic top-level name), and each source file has one path: addons/, dns/ and rules/ at the top
of the repository, agent_egress/addons/... only once installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import agent_egress.dns.resolver
import agent_egress.rules

ROOT = Path(__file__).parents[1]


def load_layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layout", ROOT / "scripts" / "layout.py")
    assert spec is not None and spec.loader is not None
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    return layout


layout = load_layout()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Through the sdist, as `python -m build` does by default: the wheel is built from a clean
    # unpacked tree, so files left in the repository's build/ by an earlier build (a module
    # since moved) cannot slip in, and the sdist is shown to carry everything.
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                    str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("agent_egress-*.whl")
    return path


def test_wheel_has_only_the_agent_egress_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"agent_egress"}
    for data in ("agent_egress/rules/policy.schema.json", "agent_egress/rules/presets/github.yaml",
                 "agent_egress/py.typed", "agent_egress/default-policy.yaml"):
        assert data in names
    presets = {p.name for p in (ROOT / "rules" / "presets").glob("*.yaml")}
    assert presets and {f"agent_egress/rules/presets/{p}" for p in presets} <= set(names)


def test_wheel_holds_each_module_once_where_layout_says(wheel):
    """The mapping that mypy and import-linter are shown (scripts/layout.py) is the one
    setuptools builds: every source file lands in the wheel at its installed name, nothing
    else does."""
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = sorted(n for n in names if n.endswith(".py"))
    expected = sorted("/".join(module.split(".")) + ("/__init__.py" if path.stem == "__init__"
                                                      else ".py")
                      for module, path in layout.modules())
    assert in_wheel == expected
    assert "agent_egress/rules/engine.py" in in_wheel
    assert "agent_egress/dns/resolver.py" in in_wheel
    assert "agent_egress/addons/enforce.py" in in_wheel
    for module, path in layout.modules():
        source = path.read_bytes()
        installed = "/".join(module.split(".")) + ("/__init__.py" if path.stem == "__init__"
                                                   else ".py")
        assert zipfile.ZipFile(wheel).read(installed) == source, installed


def test_every_package_directory_is_listed_in_pyproject():
    assert layout.unlisted_packages() == []


def test_one_path_per_file():
    """No symlinks in the source tree: addons/, dns/ and rules/ exist once, at the top."""
    links = [Path(d, f) for top in ("agent_egress", "addons", "dns", "rules", "tests", "bench")
             for d, dirs, files in os.walk(ROOT / top) for f in [*dirs, *files]
             if Path(d, f).is_symlink()]
    assert links == []
    assert not (ROOT / "agent_egress" / "rules").exists()
    # The editable install maps the installed names onto those single paths.
    assert Path(agent_egress.rules.__file__ or "") == ROOT / "rules" / "__init__.py"
    assert Path(agent_egress.dns.resolver.__file__ or "") == ROOT / "dns" / "resolver.py"


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
