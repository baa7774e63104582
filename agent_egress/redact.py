"""Secrets out of command lines before they reach the audit log.

A process's command line is recorded so that an operator can tell which tool made a
connection; tools take passwords and tokens on their command lines as often as in requests.
Redaction errs on the side of hiding: a port number or a file name taken for a secret costs
little, a token kept costs a rotation. Pure: no I/O.

What is replaced by `[redacted]`:
- the values of options named for secrets (`--password X`, `--token=X`, `-pX`), the password
  part of user options (`-u user:X`, `--user=user:X`), cookies, and every header value but a
  few harmless ones (`-H 'Authorization: Bearer X'`);
- `NAME=value` where NAME says key, token, secret, password, passwd, pass, pwd, auth,
  credential, cookie or bearer (`AWS_SECRET_ACCESS_KEY=X`, `password=X` in a query or a
  connection string), and the same names as JSON keys;
- URL userinfo and query strings (`https://[redacted]@host/path?[redacted]`);
- tokens by their shape (GitHub, GitLab, Slack, AWS access key ids, npm, PyPI, Hugging Face,
  Google API keys, `sk-` API keys, JWTs);
- every secret value given by the caller (configured credentials), wherever it appears.
Arguments holding a whole shell command (`sh -c '...'`) are read as command lines too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

REDACTED = "[redacted]"

# Words that make a name (an option, a variable, a key) name a secret. Long words are found
# anywhere in the name (PGPASSWORD); short ones only as a whole part of it (MYSQL_PWD, _auth,
# apiKey), so that GIT_AUTHOR_NAME or --keep-alive stay readable.
_SECRET_SUBSTRINGS = ("password", "passwd", "passphrase", "secret", "token", "credential",
                      "apikey", "api_key", "api-key", "authorization", "bearer", "cookie",
                      "private_key", "private-key", "privatekey", "session")
_SECRET_PARTS = frozenset({"key", "pass", "pwd", "pw", "auth", "pat", "sig", "signature"})
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# Options whose value is `user[:password]`: only the password is hidden.
_USER_OPTIONS = frozenset({"--user", "--proxy-user", "-u", "-U", "--cert", "-E",
                           "--proxy-cert", "--http-user", "--ftp-user"})
_HEADER_OPTIONS = frozenset({"-H", "--header", "--proxy-header"})
_COOKIE_OPTIONS = frozenset({"-b", "--cookie"})
# Headers whose values say nothing secret; every other header's value is hidden.
_HARMLESS_HEADERS = frozenset({
    "accept", "accept-charset", "accept-encoding", "accept-language", "cache-control",
    "connection", "content-encoding", "content-language", "content-length", "content-type",
    "dnt", "expect", "host", "if-match", "if-modified-since", "if-none-match",
    "if-unmodified-since", "origin", "pragma", "range", "referer", "te", "upgrade",
    "user-agent", "x-requested-with", "x-github-api-version", "x-http-method-override"})
# Programs that take a password as a separate value of a short option.
_PASSWORD_SHORT_OPTIONS = {"sshpass": "-p", "redis-cli": "-a", "htpasswd": "-b"}
_CONFIG_WORDS = frozenset({"config", "configure", "set"})

_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|gl(?:pat|dt|ptt|rt|cbt|soat|ft|imt|agent)-[A-Za-z0-9_-]{16,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}"
    r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}"
    r"|npm_[A-Za-z0-9]{30,}|pypi-[A-Za-z0-9_-]{40,}|hf_[A-Za-z0-9]{30,}"
    r"|AIza[A-Za-z0-9_-]{35}|sk-[A-Za-z0-9_-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r")")
# scheme://userinfo@host/path?query#fragment; userinfo runs to the last '@' before the path,
# so an '@' or '?' in a password does not end it early.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
                  r"(?:(?P<userinfo>[^/\s\"'@]*(?:@[^/\s\"'@]*)*)@)?(?P<rest>[^?#\s\"']*)(?P<query>[?#][^\s\"']*)?")
# NAME=value anywhere: an option (--password=x), a variable (TOKEN=x), a query or form field.
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.])-{0,2}(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)=")
# "name": "value" in JSON bodies (curl -d '{"password": "x"}').
_JSON_FIELD = re.compile(r"\"(?P<name>[^\"\\]{1,64})\"\s*:\s*\"(?P<value>(?:[^\"\\]|\\.)*)\"")
# Name: value as a header, where the name says secret or is Authorization.
_HEADER_TEXT = re.compile(r"(?<![A-Za-z0-9_-])(?P<name>[A-Za-z][A-Za-z0-9_-]*)[ \t]*:[ \t]*"
                          r"(?P<value>[^\"'\r\n]+)")
_AUTH_SCHEMES = frozenset({"basic", "bearer", "token", "digest", "negotiate", "ntlm", "hoba",
                           "mutual", "aws4-hmac-sha256", "otp"})
# Value ends: ASCII white space, a shell or query separator or a quote (never a Unicode space,
# which a value may hold).
_VALUE_END = re.compile(r"[ \t\r\n\f\v&;|\"'<>`]")
_SHELL_WORDS = re.compile(r"(?:[^ \t\r\n\"']+|\"(?:[^\"\\]|\\.)*\"|'[^']*')+")
_ASCII_SPACE = re.compile(r"[ \t\r\n]")


def redact_cmdline(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """`argv` with every secret it shows replaced by `[redacted]`; `secrets` are values known
    to be secret (configured credentials), hidden wherever they appear."""
    known = _known_secrets(secrets)
    return _redact_argv(list(argv), known, depth=0)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """One string (a joined command line, a shell command) with its secrets replaced."""
    return _redact_free_text(text, _known_secrets(secrets), depth=0)


def is_secret_name(name: str) -> bool:
    """Whether a variable, option or key named `name` holds a secret by its name."""
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_SUBSTRINGS):
        return True
    return any(part.lower() in _SECRET_PARTS for part in _NAME_PARTS.findall(name))


def _known_secrets(secrets: Iterable[str]) -> tuple[str, ...]:
    values = set()
    for secret in secrets:
        for form in (secret, secret.strip()):
            if form:
                values.add(form)
    return tuple(sorted(values, key=len, reverse=True))  # a longer one first: it may hold one


def _redact_argv(argv: list[str], known: tuple[str, ...], depth: int) -> list[str]:
    args = [_replace_known(arg, known) for arg in argv]
    program = args[0].rsplit("/", 1)[-1] if args else ""
    password_short = _PASSWORD_SHORT_OPTIONS.get(program)
    in_login = "login" in args[1:]
    configuring = any(arg in _CONFIG_WORDS for arg in args[1:])
    out: list[str] = []
    pending: str | None = None  # the kind of value this argument is, from the option before
    for i, arg in enumerate(args):
        if pending is not None:
            out.append(_redact_value(pending, arg, known, depth))
            pending = None
        elif i == 0:  # the program, or in a shell command an assignment before it
            out.append(_redact_attached(arg, known, depth) if "=" in arg
                       else _redact_free_text(arg, known, depth))
        elif (kind := _separate_value_kind(arg, password_short, in_login)) is not None:
            pending = kind
            out.append(arg)
        elif configuring and _is_config_key(arg):  # npm config set //host/:_authToken VALUE
            pending = "secret"
            out.append(arg)
        else:
            out.append(_redact_attached(arg, known, depth))
    return out


def _is_config_key(arg: str) -> bool:
    return re.fullmatch(r"[\w./:@-]+", arg) is not None and not arg.startswith("-") \
        and is_secret_name(re.split(r"[/:]", arg)[-1] or arg)


def _separate_value_kind(arg: str, password_short: str | None, in_login: bool) -> str | None:
    """Which kind of value the next argument is, when `arg` is an option that takes one."""
    if "=" in arg or not arg.startswith("-") or arg == "-" or arg == "--":
        return None
    option = arg.lower() if arg.startswith("--") else arg  # long options in any case
    if option in _USER_OPTIONS or re.fullmatch(r"-[A-Za-z]*u", arg):
        return "user"
    if option in _HEADER_OPTIONS or re.fullmatch(r"-[A-Za-z]*H", arg):
        return "header"
    if option in _COOKIE_OPTIONS:
        return "secret"
    if arg == password_short or (in_login and arg == "-p"):
        return "secret"
    if arg.startswith("--") and is_secret_name(arg[2:]):
        return "secret"
    return None


def _redact_value(kind: str, value: str, known: tuple[str, ...], depth: int) -> str:
    """The value of an option given as the next argument."""
    if kind == "secret":
        return REDACTED
    if kind == "user":
        user, colon, _password = value.partition(":")
        return f"{_redact_free_text(user, known, depth)}:{REDACTED}" if colon else \
            _redact_free_text(value, known, depth)
    return _redact_header(value, known, depth)


def _redact_attached(arg: str, known: tuple[str, ...], depth: int) -> str:
    """An argument carrying its own value: `--opt=value`, `-uuser:pass`, `-pSECRET`."""
    if arg.startswith("--") and "=" in arg:
        name, _, value = arg.partition("=")
        lowered = name.lower()
        if lowered in _USER_OPTIONS:
            user, colon, _password = value.partition(":")
            if colon:
                return f"{name}={user}:{REDACTED}"
            return f"{name}={_redact_free_text(value, known, depth)}"
        if lowered in _HEADER_OPTIONS:
            return f"{name}={_redact_header(value, known, depth)}"
        if lowered in _COOKIE_OPTIONS or is_secret_name(name[2:]):
            return f"{name}={REDACTED}"
        return f"{name}={_redact_free_text(value, known, depth)}"
    assignment = re.match(r"-?[A-Za-z_][A-Za-z0-9_.-]*(?==)", arg)
    if assignment and is_secret_name(assignment.group().lstrip("-")) \
            and arg[assignment.end() + 1:][:1] not in ("'", '"'):
        # NAME=value: the value is all the rest; NAME='quoted value' ... is a shell command
        return f"{assignment.group()}={REDACTED}"
    if not arg.startswith("--") and len(arg) > 2 and arg.startswith("-"):
        if arg.startswith("-p"):  # mysql and its kin: -pPASSWORD
            return f"-p{REDACTED}"
        if arg.startswith("-H"):
            return f"-H{_redact_header(arg[2:], known, depth)}"
        if arg.startswith("-b"):
            return f"-b{REDACTED}"
        attached = re.fullmatch(r"(-[A-Za-z]*[uU])([^:=]*):.*", arg, re.DOTALL)
        if attached:  # -uuser:password, -sSuuser:password
            return f"{attached.group(1)}{attached.group(2)}:{REDACTED}"
    return _redact_free_text(arg, known, depth)


def _redact_header(header: str, known: tuple[str, ...], depth: int) -> str:
    name, colon, value = header.partition(":")
    if not colon or not re.fullmatch(r"[ \t]*[A-Za-z0-9_-]+[ \t]*", name):
        return _redact_free_text(header, known, depth)
    if name.strip().lower() in _HARMLESS_HEADERS or not value.strip():
        return f"{name}:{_redact_free_text(value, known, depth)}"
    scheme = value.split()[0] if value.split() else ""
    if scheme.lower() in _AUTH_SCHEMES and len(value.split()) > 1:
        return f"{name}: {scheme} {REDACTED}"
    return f"{name}: {REDACTED}"


def _redact_free_text(text: str, known: tuple[str, ...], depth: int) -> str:
    text = _replace_known(text, known)
    if depth < 2 and _ASCII_SPACE.search(text) and text.strip():
        text = _redact_shell_words(text, known, depth + 1)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    text = _URL.sub(_url_replacement, text)
    text = _HEADER_TEXT.sub(_header_text_replacement, text)
    text = _JSON_FIELD.sub(_json_replacement, text)
    return _redact_assignments(text)


def _redact_shell_words(text: str, known: tuple[str, ...], depth: int) -> str:
    """A string holding a command line (`sh -c '...'`, `ssh host cmd`): its words are
    redacted as arguments, each replaced where it stands."""
    spans = [(m.start(), m.end(), m.group()) for m in _SHELL_WORDS.finditer(text)]
    if len(spans) < 2:
        return text
    words = [_unquote(word) for _, _, word in spans]
    redacted = _redact_argv(words, known, depth)
    out, position = [], 0
    for (start, end, word), before, after in zip(spans, words, redacted, strict=True):
        out.append(text[position:start])
        if after == before:
            out.append(word)
        else:
            out.append(f"'{after}'" if _ASCII_SPACE.search(after) or not after else after)
        position = end
    out.append(text[position:])
    return "".join(out)


def _unquote(word: str) -> str:
    parts = re.findall(r"\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([^\"']+)", word)
    return "".join(re.sub(r"\\(.)", r"\1", d) if d else s or p for d, s, p in parts)


def _replace_known(text: str, known: tuple[str, ...]) -> str:
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _url_replacement(match: re.Match[str]) -> str:
    userinfo = f"{REDACTED}@" if match.group("userinfo") is not None else ""
    query = f"{match.group('query')[0]}{REDACTED}" if match.group("query") else ""
    return f"{match.group('scheme')}{userinfo}{match.group('rest')}{query}"


def _header_text_replacement(match: re.Match[str]) -> str:
    name, value = match.group("name"), match.group("value")
    lowered = name.lower()
    if lowered not in ("authorization", "proxy-authorization", "cookie", "set-cookie") \
            and not is_secret_name(name):
        return match.group()
    if value.strip() == REDACTED or value.startswith("//"):
        return match.group()  # already hidden, or a URL's scheme://
    words = value.split()
    if words and words[0].lower() in _AUTH_SCHEMES and len(words) > 1:
        return f"{name}: {words[0]} {REDACTED}"
    return f"{name}: {REDACTED}"


def _json_replacement(match: re.Match[str]) -> str:
    if not is_secret_name(match.group("name")) or match.group("value") == REDACTED:
        return match.group()
    return f"\"{match.group('name')}\": \"{REDACTED}\""


def _redact_assignments(text: str) -> str:
    spans = []
    for match in _ASSIGNMENT.finditer(text):
        if not is_secret_name(match.group("name")):
            continue
        start = match.end()
        if start < len(text) and text[start] in "\"'":
            close = text.find(text[start], start + 1)
            end = len(text) if close < 0 else close + 1
        else:
            found = _VALUE_END.search(text, start)
            end = found.start() if found else len(text)
        if text[start:end] and text[start:end] != REDACTED:
            spans.append((start, end))
    for start, end in reversed(_merged(spans)):
        text = text[:start] + REDACTED + text[end:]
    return text


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
