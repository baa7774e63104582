"""Proxy authentication that a password guesser cannot use to stall everyone else.

mitmproxy's ProxyAuth checks each Proxy-Authorization on the event loop: a bcrypt check at cost
12 takes about a quarter of a second, during which no client is served, so anyone sending wrong
passwords slows every client down. Here:
- a connection that authenticated is not checked again for the same credential (mitmproxy
  already trusts a whole CONNECT tunnel; this covers keep-alive plain HTTP);
- a credential that was verified once is recognised by a keyed hash (HMAC under a key made at
  start-up, never the password itself) from a bounded cache, without bcrypt;
- other checks run in a small thread pool (bcrypt releases the GIL), off the event loop;
- one client address has at most MAX_CHECKS_PER_ADDRESS checks, cached or not, in flight;
  more are refused at once (407) without being checked, and a failed check answers only after
  FAILURE_DELAY. So a guesser learns about a few guesses per second per address, whatever it
  sends (the cache is no faster oracle: it is behind the same gate), and pays for them in time.
Failures are answered 407 as before, and audited as denials by the Enforcer, which runs next.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import weakref
from collections import Counter, OrderedDict
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import connection, http
from mitmproxy.addons import proxyauth

CACHED_CREDENTIALS = 1024
CHECK_THREADS = 2
MAX_CHECKS_PER_ADDRESS = 4
FAILURE_DELAY = 1.0  # seconds


class ProxyAuthenticator(proxyauth.ProxyAuth):
    def __init__(self) -> None:
        super().__init__()
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="proxy-auth")
        self._in_flight: Counter[str] = Counter()
        self._connection_credential: MutableMapping[connection.Client, bytes] = (
            weakref.WeakKeyDictionary())

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "proxyauth" in updated:
            self._verified.clear()  # other credentials now

    def done(self) -> None:
        self._checks.shutdown(wait=False, cancel_futures=True)

    async def http_connect(self, f: http.HTTPFlow) -> None:  # type: ignore[override]
        if self.validator and await self._authenticate(f):
            self.authenticated[f.client_conn] = f.metadata["proxyauth"]

    async def requestheaders(self, f: http.HTTPFlow) -> None:  # type: ignore[override]
        if not self.validator:
            return
        if f.client_conn in self.authenticated:
            f.metadata["proxyauth"] = self.authenticated[f.client_conn]
        elif not f.is_replay:
            await self._authenticate(f)

    async def _authenticate(self, f: http.HTTPFlow) -> bool:
        """mitmproxy's authenticate_http, with the check below. Keeps the user name, not the
        password, in the flow's metadata (the Enforcer reads the name)."""
        is_proxy = proxyauth.is_http_proxy(f)
        header = proxyauth.http_auth_header(is_proxy)
        try:
            _, user, password = proxyauth.parse_http_basic_auth(f.request.headers.get(header, ""))
        except ValueError:
            valid = False
        else:
            valid = await self._check(f.client_conn, user, password)
        if not valid:
            f.response = proxyauth.make_auth_required_response(is_proxy)
            return False
        f.metadata["proxyauth"] = (user, "")
        del f.request.headers[header]
        return True

    async def _check(self, client: connection.Client, user: str, password: str) -> bool:
        credential = hmac.digest(self._key, f"{user}\0{password}".encode(), hashlib.sha256)
        if self._connection_credential.get(client) == credential:
            return True
        address = client.peername[0]
        if self._in_flight[address] >= MAX_CHECKS_PER_ADDRESS:
            return False
        self._in_flight[address] += 1
        try:
            valid = credential in self._verified or await asyncio.get_running_loop(
                ).run_in_executor(self._checks, self._validate, user, password)
            if not valid:
                await asyncio.sleep(FAILURE_DELAY)
                return False
        finally:
            self._in_flight[address] -= 1
            if not self._in_flight[address]:
                del self._in_flight[address]
        self._connection_credential[client] = credential
        self._verified[credential] = None
        self._verified.move_to_end(credential)
        if len(self._verified) > CACHED_CREDENTIALS:
            self._verified.popitem(last=False)
        return True

    def _validate(self, user: str, password: str) -> bool:
        if self.validator is None:  # no htpasswd loaded: nobody is valid
            return False
        try:
            return bool(self.validator(user, password))
        # Whatever the hash library raises on a malformed entry or input, the answer is "not a
        # valid credential": failing closed is the point, so the catch is deliberately wide.
        except Exception:  # noqa: BLE001
            return False
