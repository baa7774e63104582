"""Runs mypy and import-linter on the agent_egress package as it installs.

addons/, dns/ and rules/ sit at the top of the repository but install as agent_egress.addons,
agent_egress.dns and agent_egress.rules (pyproject's `[tool.setuptools] packages` and
`package-dir`). Python follows that mapping through setuptools' import hook; mypy and
import-linter find modules by walking directories and would see `rules.engine`, or nothing.
This script reads the mapping from pyproject.toml and hands each tool every module under its
installed name, each file once:

    scripts/layout.py mypy [MYPY ARGS] [PATHS]   # strict type check, errors name the real paths
    scripts/layout.py lint-imports [ARGS]        # the import contracts in pyproject.toml
    scripts/layout.py modules                    # MODULE PATH, one a line
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Each package of the distribution and the directory that holds its files."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped: dict[str, str] = setuptools.get("package-dir", {})
    dirs = {}
    for package in setuptools["packages"]:
        # The longest mapped prefix wins, as in setuptools; the rest of the name is directories.
        prefix = max((p for p in mapped if package == p or package.startswith(p + ".")),
                     key=len, default="")
        rest = package.removeprefix(prefix).strip(".").split(".") if package != prefix else []
        base = root / mapped[prefix] if prefix else root
        dirs[package] = base.joinpath(*[p for p in rest if p])
    return dirs


def modules(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    """Every module of the package: its installed name and its one file."""
    for package, directory in sorted(package_dirs(root).items()):
        for path in sorted(directory.glob("*.py")):
            yield (package if path.stem == "__init__" else f"{package}.{path.stem}"), path


def unlisted_packages(root: Path = ROOT) -> list[Path]:
    """Directories with an __init__.py below a package that pyproject does not list: setuptools
    would leave them out of the wheel and the tools here would not check them."""
    listed = set(package_dirs(root).values())
    found = []
    for directory in {d for d in listed if (d / "__init__.py").exists()}:
        for init in directory.rglob("__init__.py"):
            if init.parent not in listed:
                found.append(init.parent)
    return sorted(found)


def run_mypy(args: list[str]) -> int:
    """mypy over the package (and over whatever ARGS name besides, e.g. tests/), each package
    module under its installed name. mypy has no option that maps a file to a module name, so
    the sources are built here and handed to its build with the options of pyproject.toml and
    ARGS."""
    from mypy.fscache import FileSystemCache
    from mypy.main import process_options, run_build
    from mypy.modulefinder import BuildSource
    from mypy.util import FancyFormatter, count_stats

    os.chdir(ROOT)  # errors name paths relative to the repository, as `mypy -p` did
    started = time.time()
    fscache = FileSystemCache()
    installed_name = {str(path.relative_to(ROOT)): module for module, path in modules()}
    found, options = process_options([*args, *installed_name], fscache=fscache)
    unmatched = set(installed_name) - {source.path for source in found}
    if unmatched:  # they would be checked as top-level `rules`, `dns`: refuse rather than guess
        print(f"layout: mypy named these files differently: {sorted(unmatched)}", file=sys.stderr)
        return 2
    sources = [BuildSource(source.path, installed_name[source.path], base_dir=str(ROOT))
               if source.path in installed_name else source for source in found]
    _, messages, blockers = run_build(sources, options, fscache, started, sys.stdout, sys.stderr)
    # The summary and the exit status as mypy's own main gives them.
    errors, notes, files = count_stats(messages)
    formatter = FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    if errors:
        print(formatter.format_error(errors, files, len(sources), blockers=blockers,
                                     use_color=options.color_output))
    elif notes == len(messages):
        print(formatter.format_success(len(sources), options.color_output))
    return (2 if blockers else 1) if messages and notes < len(messages) else 0


def copy_installed_tree(destination: Path, root: Path = ROOT) -> Path:
    """The package's modules laid out as installed (agent_egress/rules/engine.py, ...) under
    DESTINATION: what import-linter reads. A scratch copy, deleted after the run."""
    for module, path in modules(root):
        parts = module.split(".")
        target = destination.joinpath(*parts, "__init__.py") if path.stem == "__init__" \
            else destination.joinpath(*parts[:-1], path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return destination


def run_lint_imports(args: list[str], root: Path = ROOT) -> int:
    # import-linter (through grimp) imports the root package to find its directory and walks
    # it; in the repository agent_egress/ holds no rules/, so it reads a copy laid out as
    # installed. Contracts report module names, never these scratch paths.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="agent-egress-layers-") as scratch:
        copy_installed_tree(Path(scratch), root)
        env = {**os.environ, "PYTHONPATH": scratch, "PYTHONDONTWRITEBYTECODE": "1"}
        command = [str(lint_imports), "--no-cache", "--no-logo", *args,
                   str(root / "pyproject.toml")]
        # S603: the program is this venv's lint-imports; the arguments are the caller's own.
        done = subprocess.run(command, cwd=scratch, env=env, check=False)  # noqa: S603
    return done.returncode


def main(argv: list[str]) -> int:
    match argv:
        case ["mypy", *args]:
            unlisted = unlisted_packages()
            if unlisted:
                print("layout: packages missing from pyproject's [tool.setuptools] packages: "
                      + ", ".join(str(p.relative_to(ROOT)) for p in unlisted), file=sys.stderr)
                return 2
            return run_mypy(args)
        case ["lint-imports", *args]:
            return run_lint_imports(args)
        case ["modules"]:
            for module, path in modules():
                print(module, path.relative_to(ROOT))
            return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
