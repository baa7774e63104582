from __future__ import annotations

import unicodedata
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_egress.rules import normalize_path
from agent_egress.rules.paths import (
    PathPattern,
    RequestPath,
    ambiguous_path,
    deny_paths_match,
    paths_match,
    shown_path,
)


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


# Paths a rule that looks at paths must refuse: an origin could read them as another path.
AMBIGUOUS = [
    ("/v1/..%2Fadmin", "has a dot-segment once decoded ('..')"),
    ("/v1/x/..%2F..%2Fadmin", "has a dot-segment once decoded ('..')"),
    ("/v1/..%2fadmin", "has a dot-segment once decoded ('..')"),
    ("/v1/%2e%2e/admin", "has a dot-segment once decoded ('..')"),
    ("/v1/%2E%2e%2Fadmin", "has a dot-segment once decoded ('..')"),
    ("/v1/.%2e/admin", "has a dot-segment once decoded ('..')"),
    ("/v1/../admin", "has a dot-segment once decoded ('..')"),
    ("/v1/./admin", "has a dot-segment once decoded ('.')"),
    ("/v1/..", "has a dot-segment once decoded ('..')"),
    ("../admin", "has a dot-segment once decoded ('..')"),
    ("/v1/..;/admin", "has a dot-segment once decoded ('..')"),
    ("/v1/..;jsessionid=x/admin", "has a dot-segment once decoded ('..')"),
    ("/v1/.;/admin", "has a dot-segment once decoded ('.')"),
    ("/v1/..%3B/admin", "has a dot-segment once decoded ('..')"),
    ("/v1/..%20/admin", "has a dot-segment once decoded"),
    ("/v1/.../admin", "has a dot-segment once decoded ('...')"),
    ("/v1/%EF%BC%8E%EF%BC%8E/admin", "has a dot-segment once decoded ('..')"),  # full-width
    ("/v1/..%EF%BC%8Fadmin", "has a dot-segment once decoded ('..')"),  # full-width slash
    ("/v1/..%5cadmin", "encodes a backslash (%5C)"),
    ("/v1/..%5Cadmin", "encodes a backslash (%5C)"),
    ("/v1/x%5Cy", "encodes a backslash (%5C)"),
    ("/v1/..\\admin", "has a backslash"),
    ("/v1\\..\\admin", "has a backslash"),
    ("/v1/%EF%BC%BCadmin", "decodes to a backslash"),  # full-width backslash
    ("/v1/%c0%ae%c0%ae/admin", "decodes to invalid or overlong UTF-8"),
    ("/v1/%C0%AE%C0%AE%C0%AFadmin", "decodes to invalid or overlong UTF-8"),
    ("/v1/%e0%80%ae%e0%80%ae/admin", "decodes to invalid or overlong UTF-8"),
    ("/v1/%c1%9c", "decodes to invalid or overlong UTF-8"),
    ("/v1/%ff", "decodes to invalid or overlong UTF-8"),
    ("/v1/%252e%252e/admin", "is double-encoded"),
    ("/v1/..%252Fadmin", "is double-encoded"),
    ("/v1/%255c", "is double-encoded"),
    ("/v1/a%00", "encodes NUL (%00)"),
    ("/v1/admin%00.json", "encodes NUL (%00)"),
    ("/v1/a%0d%0aX:1", "encodes a control character (%0D)"),
    ("/v1/a%7f", "encodes a control character (%7F)"),
    ("/v1/a\x00", "has a control character"),
    ("/v1/a\tb", "has a control character"),
    ("/v1/a b", "has a raw space"),
    ("/v1/x#/../../admin", "has '#'"),
    ("/v1/\u2025/admin", "has a raw non-ASCII character"),
    ("/v1/\udcc0\udcae", "has a raw non-ASCII character"),  # bytes C0 AE, surrogate-escaped
    ("/v1/caf\u00e9", "has a raw non-ASCII character"),
    ("/v1/%", "has invalid percent-encoding"),
    ("/v1/%2", "has invalid percent-encoding"),
    ("/v1/%zz", "has invalid percent-encoding"),
    ("/v1/%%32%65", "has invalid percent-encoding"),
    ("/v1/%u002e", "has invalid percent-encoding"),
]

# Paths that must still pass: nothing an origin decodes in them creates or climbs a segment.
ORDINARY = [
    "/", "/v1/items", "/v1/a%20b", "/v1/@scope%2fname", "/v1/@scope%2Fname/-/name-1.0.tgz",
    "/v1/file.tar.gz", "/v1/.well-known/x", "/v1/..x", "/v1/x..", "/v1/a.b.c/", "/v1/a;b=c",
    "/v1/%7Euser", "/v1/caf%C3%A9", "/v1/%E2%9C%93", "/v1/100%25", "/v1/100%25off",
    "/v1/x?../../admin", "/v1/x?q=%00&r=..%2F", "/o/r.git/info/refs?service=git-upload-pack",
    "/v1/a+b", "/v1/a:b@c", "/v1/[x]", "/v1/{x}|y^z`", "*", "/v1/%25%25",
]


@pytest.mark.parametrize("raw, why", AMBIGUOUS)
def test_ambiguous_paths_say_why(raw, why):
    reason = ambiguous_path(raw)
    assert reason is not None and why in reason, (raw, reason)


@pytest.mark.parametrize("raw", ORDINARY)
def test_ordinary_paths_are_not_ambiguous(raw):
    assert ambiguous_path(raw) is None


def origin_reading(raw: str, remove_dot_segments: bool = True) -> str:
    """What a lenient origin serves: escapes decoded once (invalid UTF-8 replaced), Unicode
    folded, `\\` read as `/`, `;params` dropped, then dot-segments removed."""
    path = raw.split("?", 1)[0]
    decoded = unquote(path, errors="replace")
    folded = unicodedata.normalize("NFKC", decoded).replace("\\", "/")
    read = "/".join(s.split(";", 1)[0] for s in folded.split("/"))
    return normalize_path(read) if remove_dot_segments else read


@given(st.lists(st.sampled_from(
    ["/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "%3b", "a", "v1", "%25",
     "%c0%ae", "%00", "%", "2", "e", "f", "#", " ", "\u2025", "%EF%BC%8E", "?"]),
    max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_an_unambiguous_path_keeps_its_segments_whatever_the_origin_decodes(raw):
    """For a path that passes, removing dot-segments changes nothing in the lenient origin's
    reading, and that reading splits where the engine's reading with %2F as '/' does: no
    segment appears, goes or climbs."""
    if ambiguous_path(raw) is not None:
        return
    read = origin_reading(raw)
    assert read == origin_reading(raw, remove_dot_segments=False), raw
    assert read.count("/") == RequestPath(raw).slashed.count("/"), raw


@pytest.mark.parametrize("pattern, path, matches", [
    ("/v1/*", "/v1/@scope%2fname", True),  # both readings below /v1
    ("/v1/*", "/v1%2Fadmin", None),  # as sent outside /v1, decoded inside: no decision
    ("/@scope%2Fname*", "/@scope%2fname/-/name-1.0.tgz", True),
    ("/@scope%2Fname*", "/@scope/name/-/name-1.0.tgz", None),
    ("/@scope%2Fname*", "/@other%2Fname", False),
    ("/admin/*", "/admin%2Fusers", None),  # a deny rule must not be passed by %2F
    ("/v1/*", "/v2/x", False),
])
def test_paths_match_requires_both_readings_to_agree(pattern, path, matches):
    assert paths_match([PathPattern.parse(pattern)], RequestPath(path)) is matches


def test_shown_paths_carry_no_control_or_raw_bytes():
    assert shown_path("/a\r\nX-Injected: 1\x00/\udcc0\u00e9?q=secret") == \
        "/a%0D%0AX-Injected:%201%00/%C0%C3%A9"
    assert shown_path("/" + "a" * 300).endswith("a...")


@pytest.mark.parametrize("pattern, path, denied", [
    # what common origins read as the denied path is denied too (a path with dot-segments
    # is refused before this, as ambiguous_path says)
    ("/admin", "/admin", True), ("/admin", "/admin/", True), ("/admin", "/Admin", True),
    ("/admin", "/admin;jsessionid=1", True), ("/admin", "//admin", True),
    ("/admin", "/admin%2F", True), ("/secret/*", "/secret", True),
    ("/secret/*", "/SECRET/x", True), ("/secret/*", "/secret;a/x", True),
    # and nothing else
    ("/admin", "/adminx", False), ("/admin", "/admin/x", False), ("/secret/*", "/secrets", False),
    ("/secret/*", "/", False), ("/v1/admin", "/v1admin", False),
])
def test_a_deny_rule_matches_what_origins_read_as_its_path(pattern, path, denied):
    assert deny_paths_match([PathPattern.parse(pattern)], RequestPath(path)) is denied


@pytest.mark.parametrize("pattern, path", [
    ("/admin", "/admin/"), ("/admin", "/Admin"), ("/admin", "/admin;x"), ("/admin", "//admin"),
    ("/secret/*", "/secret"),
])
def test_an_allow_rule_matches_only_what_is_written(pattern, path):
    assert paths_match([PathPattern.parse(pattern)], RequestPath(path)) is False
