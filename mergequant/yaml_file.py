"""Read the YAML files users hand us (merge recipes, release files) with bounded work and one-line errors.

``yaml.safe_load`` is safe from code execution but not from cost: aliases let a 645-byte file
describe a billion-node tree. Parsing it is cheap (every alias points at the same node), but every
walk over the result (validation, the merge plan) pays for the expanded tree, and one such recipe
took 36 s and 1 GB before failing; a 1 KB one never finished. So before anything walks the data we
measure the document's size *as if every alias were expanded* and refuse it over ``MAX_NODES``.
The measuring itself is bounded: each distinct node's expanded size is computed once and reused
for every alias to it, so it costs as much as the file's distinct nodes, never the expansion.

The same pass refuses what PyYAML silently accepts but a user never means: duplicate mapping keys
(the last one would win unnoticed), aliases that contain themselves, and absurd nesting.

Use ``load_yaml(path, what)`` for the data, or ``read_yaml_text`` + ``parse_yaml`` when the caller
also keeps the text (to hash it or copy it next to the output).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mergequant.errors import MergeQuantError

MAX_FILE_BYTES = 2**20  # recipes and release files are a few KB; anything this size is not one
MAX_NODES = 100_000  # YAML nodes after alias expansion (a large real recipe has a few hundred)
MAX_DEPTH = 64  # nesting levels (real files nest fewer than 10)
MERGE_TAG = "tag:yaml.org,2002:merge"


class _TooLarge(Exception):
    """Raised inside the loader (args: "nodes" or "depth"); parse_yaml turns it into the caller's
    error with the file's name."""


class _Loader(yaml.SafeLoader):
    """SafeLoader (its own class, so nothing here changes ``yaml.SafeLoader`` for others) that stops
    composing after MAX_NODES nodes and aliases, or MAX_DEPTH levels: every node and alias counts at
    least once in the expanded size, so a file of a million plain nodes is refused after the first
    100k rather than after seconds of parsing the rest, and deep nesting is refused before PyYAML's
    recursive composer runs out of stack."""

    composed = 0
    depth = 0

    def compose_node(self, parent, index):
        self.composed += 1
        self.depth += 1
        try:
            if self.composed > MAX_NODES:
                raise _TooLarge("nodes")
            if self.depth > MAX_DEPTH:
                raise _TooLarge("depth")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml_text(path: str | Path, what: str = "recipe", error: type[MergeQuantError] = MergeQuantError) -> str:
    """The text of a YAML file, refusing what is not a regular file or is over ``MAX_FILE_BYTES``
    before reading it (a FIFO or /dev/zero would block or never end)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory; expected a {what} file (YAML)")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file; expected a {what} file (YAML)")
    if st.st_size > MAX_FILE_BYTES:
        raise error(_too_large(path, what, st.st_size))
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
        # newlines translated as Path.read_text does, so the text callers hash or copy is unchanged
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: the {what} file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise error(_too_large(path, what, len(raw)))
    return text


def _too_large(path: Path, what: str, size: int) -> str:
    return f"{path}: the {what} file is {size} bytes; more than {MAX_FILE_BYTES} is refused (not a {what})"


def parse_yaml(text: str, path: str | Path = "<yaml>", what: str = "recipe",
               error: type[MergeQuantError] = MergeQuantError) -> Any:
    """The data of one YAML document (None when empty), after the checks in the module docstring.
    Every problem raises ``error`` with one line naming ``path`` (and the line where known)."""
    if len(text) > MAX_FILE_BYTES:
        raise error(_too_large(Path(path), what, len(text)))
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node, loader, path, what, error)
        return loader.construct_document(node)
    except _TooLarge as e:
        raise error(_too_many_nodes(path, what) if e.args == ("nodes",) else _too_deep(path, what)) from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {_yaml_error_line(e)}") from None
    except RecursionError:
        raise error(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # a scalar PyYAML cannot convert: a 5000-digit int, 2024-13-45
        raise error(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, what: str = "recipe", error: type[MergeQuantError] = MergeQuantError) -> Any:
    """``parse_yaml(read_yaml_text(path))``: the data of a YAML file, bounded and checked."""
    return parse_yaml(read_yaml_text(path, what, error), path, what, error)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's message, which spans several lines with a source snippet, as 'line L, column C: problem (context)'."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root: Node, loader: _Loader, path, what: str, error) -> None:
    """Walk the composed node graph once (each distinct node once, however many aliases point at it):
    refuse recursive aliases, duplicate keys, and an expanded tree deeper than MAX_DEPTH or larger
    than MAX_NODES. Iterative, so a deep file cannot exhaust Python's stack here."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size capped at MAX_NODES + 1, height)
    open_: set[int] = set()  # nodes whose children are being walked: meeting one again means a cycle
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_.discard(key)
            measured[key] = _measure(node, measured)
            continue
        if key in measured:
            continue
        if key in open_:
            raise error(f"{path}: line {node.start_mark.line + 1}: an alias refers to a node that contains it "
                        f"(recursive YAML); not allowed in a {what}")
        if isinstance(node, MappingNode):
            _reject_duplicate_keys(node, loader, path, error)
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in measured)
    total, height = measured[id(root)]
    if total > MAX_NODES:
        raise error(_too_many_nodes(path, what))
    if height > MAX_DEPTH:
        raise error(_too_deep(path, what))


def _too_deep(path, what: str) -> str:
    return f"{path}: nested more than {MAX_DEPTH} levels deep (aliases expanded); refused (not a {what})"


def _too_many_nodes(path, what: str) -> str:
    return (f"{path}: the {what} has more than {MAX_NODES} YAML nodes once its aliases (*name) are expanded; "
            f"refused (an alias bomb, or not a {what})")


def _measure(node: Node, measured: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(expanded size, height) of ``node`` from its children's, which are already measured. The size is
    capped so that a bomb's arithmetic stays small too."""
    kids = [measured[id(c)] for c in _children(node)]
    return min(MAX_NODES + 1, 1 + sum(s for s, _ in kids)), 1 + max((h for _, h in kids), default=0)


def _reject_duplicate_keys(node: MappingNode, loader: _Loader, path, error) -> None:
    """PyYAML keeps the last of two equal keys without a word; a user who wrote both meant one of them.
    Keys are compared as constructed (``1`` and ``0x1``, ``true`` and ``yes`` are the same key); keys
    brought in by a merge key (``<<: *defaults``) may be overridden, as YAML intends."""
    first: dict[Any, tuple[int, str]] = {}  # key -> (line, as written)
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        try:
            seen = first.get(key)
        except TypeError:  # unhashable: construction reports it with its position
            continue
        if seen is not None:
            same = "" if seen[1] == key_node.value else f", the same key as '{seen[1]}'"
            raise error(f"{path}: line {line}: duplicate key '{key_node.value}' (first at line {seen[0]}{same})")
        first[key] = (line, key_node.value)
