"""`run --notify URL`: one JSON POST per new access request, so that someone hears of it.

Sending never blocks the proxy: each notice is queued (a bounded queue; beyond it, notices are
dropped and logged) and one background task posts them, in a worker thread, retrying a failed
POST a few times with growing pauses. The POST goes directly to URL, never through a proxy
named in the environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from urllib.parse import urlsplit

from .approvals import AccessRequest

log = logging.getLogger(__name__)

QUEUE = 100
ATTEMPTS = 4
FIRST_PAUSE = 1.0  # seconds before the first retry; doubled for each next one
TIMEOUT = 5.0


def check_url(url: str) -> str:
    """Raises ValueError unless `url` is an http or https URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected an http:// or https:// URL")
    return url


def notice(request: AccessRequest) -> dict[str, object]:
    return {"id": request.id, "account": request.account, "host": request.host,
            "port": request.port, "path": request.path, "reason": request.reason,
            "approve": f"agent-egress approve {request.id}"}


class Notifier:
    def __init__(self, url: str, first_pause: float = FIRST_PAUSE) -> None:
        self.url = check_url(url)
        parts = urlsplit(url)
        self.shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # no path: it may
        # hold the hook's secret
        self.first_pause = first_pause
        self._queue: asyncio.Queue[dict[str, object]] = asyncio.Queue(QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._send_all())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def announce(self, request: AccessRequest) -> None:
        try:
            self._queue.put_nowait(notice(request))
        except asyncio.QueueFull:
            log.warning("--notify: %d notices are waiting already; not announcing access "
                        "request %s", QUEUE, request.id)

    async def _send_all(self) -> None:
        while True:
            document = await self._queue.get()
            pause = self.first_pause
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await asyncio.to_thread(self._post, document)
                    break
                except Exception as e:  # noqa: BLE001 - any failure is retried the same way
                    if attempt == ATTEMPTS:
                        log.warning("--notify: access request %s not announced to %s after "
                                    "%d attempts: %s", document["id"], self.shown, ATTEMPTS, e)
                        break
                    await asyncio.sleep(pause)
                    pause *= 2

    def _post(self, document: dict[str, object]) -> None:
        request = urllib.request.Request(  # noqa: S310 - check_url allows http(s) only
            self.url, data=json.dumps(document).encode(), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "agent-egress"})
        with self._opener.open(request, timeout=TIMEOUT) as response:
            if not 200 <= response.status < 300:
                raise OSError(f"HTTP {response.status}")
