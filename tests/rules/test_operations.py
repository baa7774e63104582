"""`op`: what a request does, recognised from its method, path (with query) and body."""

from __future__ import annotations

import json

import pytest

from agent_egress.rules.operations import operation, path_for

BATCH = "/org/repo.git/info/lfs/objects/batch"


@pytest.mark.parametrize("method, path, body, op", [
    ("GET", "/o/r.git/info/refs?service=git-upload-pack", None, "git-fetch"),
    ("POST", "/o/r.git/git-upload-pack", None, "git-fetch"),
    ("GET", "/o/r.git/info/refs?service=git-receive-pack", None, "git-push"),
    ("GET", "/o/r.git/info/refs?x=1&service=git-receive-pack", None, "git-push"),
    ("POST", "/o/r.git/git-receive-pack", None, "git-push"),
    ("POST", "/o/r.git/%67it-receive-pack", None, "git-push"),  # read as the origin will
    ("GET", "/o/r.git/info/refs", None, "git-fetch"),  # dumb protocol
    ("GET", "/o/r.git/git-upload-pack", None, None),
    ("POST", BATCH, json.dumps({"operation": "download", "objects": []}).encode(),
     "lfs-download"),
    ("POST", BATCH, json.dumps({"operation": "upload", "objects": []}).encode(), "lfs-upload"),
    ("POST", BATCH, None, None),  # the body was not seen: not guessed
    ("POST", BATCH, b"not json", None),
    ("PUT", "/left-pad", b"{}", "publish"),
    ("PUT", "/@scope%2fpkg", b"{}", "publish"),
    ("PUT", "/@scope%2Fpkg", b"{}", "publish"),
    ("PUT", "/-/user/org.couchdb.user:x", b"{}", None),  # npm login
    ("PUT", "/pkg/-rev/3-abc", b"{}", None),
    ("PUT", "/api/v1/crates/new", b"", "publish"),
    ("POST", "/legacy/", b"", "publish"),
    ("POST", "/upload", b'--b\r\nContent-Disposition: form-data; name=":action"\r\n\r\n'
                       b"file_upload\r\n--b--", "publish"),
    ("POST", "/upload", b"a=1", None),
    ("GET", "/left-pad", None, None),
    (None, None, None, None),
])
def test_operation(method, path, body, op):
    assert operation(method, path, body) == op


def test_replay_gives_a_recorded_git_advertisement_its_service_back():
    assert path_for("git-push", "/o/r.git/info/refs") == \
        "/o/r.git/info/refs?service=git-receive-pack"
    assert path_for("git-fetch", "/o/r.git/info/refs") == \
        "/o/r.git/info/refs?service=git-upload-pack"
    assert path_for("git-push", "/o/r.git/git-receive-pack") == "/o/r.git/git-receive-pack"
    assert path_for(None, "/o/r.git/info/refs") == "/o/r.git/info/refs"
