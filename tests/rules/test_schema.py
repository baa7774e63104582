"""The shipped JSON Schema and the loader agree: on the examples both accept; on the broken
corpus, each file says (`# schema: reject|accept|skip`) whether the schema can see the problem
too (`accept`: only the loader can, e.g. public suffixes; `skip`: not YAML a schema can read)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from agent_egress.rules import PolicyError, load_policy

ROOT = Path(__file__).parents[2]
BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))
EXAMPLES = [ROOT / "deploy" / "policy.yaml",
            *(Path(__file__).parent / "fixtures" / name for name in ("engine.yaml",
                                                                   "credentials.yaml"))]


class _EditorLoader(yaml.SafeLoader):
    """Reads YAML as an editor's schema validator does: times stay strings."""


_EditorLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("agent_egress.rules").joinpath(
        "policy.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator, path: Path) -> list[str]:
    document = yaml.load(path.read_text(), Loader=_EditorLoader)  # noqa: S506 (a SafeLoader)
    return [e.message for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_both(validator, path):
    load_policy(path)
    assert schema_errors(validator, path) == []


def schema_verdict(path: Path) -> str:
    return next(line.removeprefix("# schema: ") for line in path.read_text().splitlines()
                if line.startswith("# schema: "))


@pytest.mark.parametrize("path", [p for p in BROKEN if schema_verdict(p) != "skip"],
                         ids=lambda p: p.stem)
def test_schema_agrees_with_loader_on_broken_files(validator, path):
    with pytest.raises(PolicyError):
        load_policy(path)
    rejected = bool(schema_errors(validator, path))
    assert rejected is (schema_verdict(path) == "reject")
