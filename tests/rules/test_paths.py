from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_egress.rules import normalize_path
from agent_egress.rules.paths import PathPattern


@pytest.mark.parametrize("raw, path", [
    ("/v1/../admin", "/admin"), ("/v1/%2e%2e/admin", "/admin"), ("/v1/%2E%2E/admin", "/admin"),
    ("/v1/./x", "/v1/x"), ("/a/b/..", "/a/"), ("/a/b/../../..", "/"), ("", "/"),
    ("/x?y=/../z", "/x"), ("/x#frag", "/x"), ("/%7Euser", "/~user"), ("/a%2fb", "/a%2Fb"),
    ("/a%2Fb/..", "/"), ("/%41%42", "/AB"), ("/caf%C3%A9", "/caf%C3%A9"),
])
def test_normalize_path(raw, path):
    assert normalize_path(raw) == path


@pytest.mark.parametrize("pattern, path, matches", [
    ("/v1/*", "/v1/x", True), ("/v1/*", "/v1/a/b", True), ("/v1/*", "/v1", False),
    ("/v1/*", "/v2/x", False), ("/v1/*", "/admin", False), ("/*/info/refs", "/o/r/info/refs", True),
    ("/exact", "/exact", True), ("/exact", "/exact/more", False), ("/a.b", "/aXb", False),
])
def test_path_globs(pattern, path, matches):
    assert PathPattern.parse(pattern).matches(path) is matches


@given(st.text(alphabet="/.%2eE0aZ?~", max_size=40))
def test_normalisation_is_idempotent(raw):
    once = normalize_path(raw)
    assert normalize_path(once) == once
    assert "/../" not in once + "/" and not once.endswith("/..")
