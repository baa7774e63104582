"""What a request does, where the protocol says so: the `op` of an audit event. Pure: decided
from what the proxy sees of the request (method, path with its query, and the body when it has
been read), never from what a client claims about itself elsewhere.

Recognised: git smart HTTP (fetch, push), the Git LFS batch API (download, upload: the batch
request's body names the operation, so without the body it is not recognised), and package
publishing (npm's PUT of a package document, a PyPI-style upload, cargo's publish)."""

from __future__ import annotations

import json
import re

from .paths import normalize_path

GIT_FETCH = "git-fetch"
GIT_PUSH = "git-push"
LFS_DOWNLOAD = "lfs-download"
LFS_UPLOAD = "lfs-upload"
PUBLISH = "publish"
OPERATIONS = (GIT_FETCH, GIT_PUSH, LFS_DOWNLOAD, LFS_UPLOAD, PUBLISH)
WRITES = frozenset({GIT_PUSH, LFS_UPLOAD, PUBLISH})  # what a read-only rule never allows
READS = frozenset({GIT_FETCH, LFS_DOWNLOAD})
MAX_BODY = 65536  # how much of a batch request's body is read for its operation

# npm publishes with PUT /NAME or PUT /@SCOPE%2FNAME (a package document)
_NPM_PACKAGE = re.compile(r"/(?:@[^/@%]+(?:%2[fF]|/))?[^/@%][^/%]*/?")
_QUERY_PUSH = "git-receive-pack"


def operation(method: str | None, path: str | None, body: bytes | None = None) -> str | None:
    """The operation a request to `path` (as sent: its query included) with `method` is, or
    None when it is none that is recognised. A git push is recognised wherever its service
    is named, as the engine's read-only check does."""
    if path is None:
        return None
    method = (method or "GET").upper()
    raw, _, query = path.partition("?")
    normalized = normalize_path(raw).rstrip("/") or "/"
    if normalized.endswith("/info/refs"):
        if _QUERY_PUSH in query:
            return GIT_PUSH
        return GIT_FETCH if method in ("GET", "HEAD") else None
    if normalized.endswith("/git-receive-pack"):
        return GIT_PUSH
    if normalized.endswith("/git-upload-pack"):
        return GIT_FETCH if method == "POST" else None
    if normalized.endswith("/info/lfs/objects/batch"):
        return _lfs_batch(body) if method == "POST" else None
    if method == "PUT" and (normalized.endswith("/api/v1/crates/new")
                            or _NPM_PACKAGE.fullmatch(raw) and "/-/" not in raw
                            and "/-rev/" not in raw):
        return PUBLISH
    if method == "POST" and (normalized.endswith("/legacy") or _pypi_upload(body)):
        return PUBLISH
    return None


def _lfs_batch(body: bytes | None) -> str | None:
    if not body:
        return None
    try:
        request = json.loads(body[:MAX_BODY])
    except ValueError:
        return None
    kind = request.get("operation") if isinstance(request, dict) else None
    return {"download": LFS_DOWNLOAD, "upload": LFS_UPLOAD}.get(kind) if isinstance(
        kind, str) else None


def _pypi_upload(body: bytes | None) -> bool:
    """A multipart form whose `:action` is `file_upload` (twine, uv publish)."""
    if not body:
        return False
    head = body[:MAX_BODY]
    at = head.find(b'name=":action"')
    return at >= 0 and b"file_upload" in head[at:at + 200]


def path_for(op: str | None, path: str | None) -> str | None:
    """A recorded path (its query removed) as the engine must see it again to decide on what
    `op` says it was: a git smart-HTTP advertisement names its service only in the query."""
    if path is None or "?" in path or op not in (GIT_FETCH, GIT_PUSH):
        return path
    if normalize_path(path).rstrip("/").endswith("/info/refs"):
        service = "git-receive-pack" if op == GIT_PUSH else "git-upload-pack"
        return f"{path}?service={service}"
    return path
