"""Reads a policy file into YAML nodes that remember where they came from.

Everything a hostile or careless file can do to a YAML parser is turned into a `Problem` here:
oversized or binary files, tabs, duplicate keys, several documents, and aliases (which is also
how a "billion laughs" file is stopped before anything expands).
"""

from __future__ import annotations

import yaml

from .errors import PolicyError, Problem

MAX_POLICY_BYTES = 16 * 1024 * 1024
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def position(node: yaml.Node) -> tuple[int, int]:
    """1-based line and column of a node."""
    return node.start_mark.line + 1, node.start_mark.column + 1


def read_nodes(data: bytes, file: str) -> yaml.Node:
    """Parses `data` into its root node, or raises PolicyError."""

    def fail(line: int, col: int, message: str) -> PolicyError:
        return PolicyError([Problem(file, line, col, message)])

    if len(data) > MAX_POLICY_BYTES:
        raise fail(1, 1, f"file is {len(data) / 2**20:.1f} MiB; a policy may be at most "
                         f"{MAX_POLICY_BYTES // 2**20} MiB")
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = _byte_position(data, nul)
        raise fail(line, col, "binary data (a NUL byte); expected a YAML text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _byte_position(data, e.start)
        raise fail(line, col, f"not UTF-8 (byte 0x{data[e.start]:02x}); "
                              "expected a UTF-8 YAML text file") from None
    try:
        documents = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"invalid YAML: {e.problem or e.context}"
        if "\t" in _line(text, line):
            message += " (YAML indentation must use spaces, not tabs)"
        raise fail(line, col, message) from None
    except yaml.YAMLError as e:
        raise fail(1, 1, f"invalid YAML: {e}") from None
    except RecursionError:
        raise fail(1, 1, "YAML nested too deeply; expected a policy mapping") from None
    if not documents:
        raise fail(1, 1, "file is empty; expected a policy starting with 'version: 1'")
    if len(documents) > 1:
        line, col = position(documents[1])
        raise fail(line, col, "a second YAML document ('---'); expected one policy per file")
    root = documents[0]
    _check_structure(root, file)
    return root


def release_nodes(root: yaml.Node) -> None:
    """Frees a node tree a few nodes at a time. Dropped whole, the million nodes of a
    100,000-rule file are freed in one cascade of deallocations that holds the GIL for a
    quarter of a second: the event loop stalls although the reload runs in another thread."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            stack.extend([v for _, v in node.value if not isinstance(v, yaml.ScalarNode)])
        elif isinstance(node, yaml.SequenceNode):
            stack.extend([v for v in node.value if not isinstance(v, yaml.ScalarNode)])
        else:
            continue
        node.value = []  # its scalars go with it; the collections below wait on the stack


def _check_structure(root: yaml.Node, file: str) -> None:
    """Refuses aliases and duplicate keys anywhere in the tree, without recursion."""
    problems: list[Problem] = []
    seen: set[int] = set()
    alias_reported = False
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            if not alias_reported:  # one is enough: a bomb has thousands
                alias_reported = True
                line, col = position(node)
                problems.append(Problem(file, line, col,
                                        "this anchored value is reused through an alias; aliases "
                                        "are not supported, expected plain values (share "
                                        "destinations with presets)"))
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in first_line:
                        line, col = position(key)
                        problems.append(Problem(
                            file, line, col,
                            f"duplicate key {key.value!r} (first on line "
                            f"{first_line[key.value]}); expected each key once"))
                    else:
                        first_line[key.value] = position(key)[0]
                stack.append(key)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    if problems:
        raise PolicyError(problems)


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 0 < number <= len(lines) else ""


def _byte_position(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1
