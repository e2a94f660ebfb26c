"""Helpers of ``tests/test_docs.py``: the fenced code blocks of Markdown files, the commands of a
shell block, Python blocks executed as one session with their printed lines recorded, and quoted
source compared with the file it quotes.

``python -m tests.docblocks SPEC.json RESULT.json`` executes the blocks of ``SPEC.json`` (a list of
``[name, code]``) in one fresh namespace and writes the printed lines to ``RESULT.json``: that is how
the tests run a block that needs a scratch-installed plugin on ``PYTHONPATH``.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Block:
    """One fenced code block: ``path`` relative to the repository root, ``line`` (1-based) of its
    opening fence, ``lang`` the first word of the info string ('' when there is none)."""

    path: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.lang or 'no language'})"


def fenced_blocks(path: Path, root: Path) -> list[Block]:
    """Every fenced block of a Markdown file (CommonMark fences of backticks or tildes)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        fence, indent, start = m["fence"], len(m["indent"]), i
        body, i = [], i + 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        else:
            raise ValueError(f"{path}:{start + 1}: a fenced block that is never closed")
        info = m["info"].strip().split()
        blocks.append(Block(str(path.relative_to(root)), start + 1, info[0] if info else "", "\n".join(body) + "\n"))
        i += 1
    return blocks


# --------------------------------------------------------------------------- shell blocks


@dataclass
class Command:
    """One simple command of a shell block. ``text`` (its words joined by single spaces, leading
    ``NAME=value`` assignments included, comment excluded) is what the tests' tables are keyed by."""

    text: str
    env: dict[str, str]
    argv: list[str]
    comment: str = ""
    subshell: bool = False
    expected: list[str] | None = None  # console blocks: the output shown after ``$ command``
    line: int = 0


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: a ``#`` outside quotes at the start or after a blank."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def shell_commands(text: str, console: bool = False) -> list[Command]:
    """The commands of a shell block, in order. ``a && b`` gives two commands; ``(cd x && y)``
    marks both as a subshell; with ``console``, lines starting with ``$ `` are commands and the
    lines after each, up to the next, its expected output."""
    commands: list[Command] = []
    logical: list[tuple[int, str, bool]] = []  # (line, text, is output)
    pending = ""
    for n, raw in enumerate(text.splitlines(), 1):
        if console and not raw.startswith("$ "):
            logical.append((n, raw, True))
            continue
        line = raw[2:] if console else raw
        if pending:
            line = pending + " " + line.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        logical.append((n, line, False))
    for n, line, output in logical:
        if output:
            if not commands:
                raise ValueError(f"line {n}: output before any $ command")
            commands[-1].expected.append(line)
            continue
        code, comment = _split_comment(line)
        code = code.strip()
        if not code:
            continue
        subshell = code.startswith("(") and code.endswith(")")
        if subshell:
            code = code[1:-1].strip()
        words = shlex.split(code)
        segments: list[list[str]] = [[]]
        for w in words:
            if w == "&&":
                segments.append([])
            else:
                segments[-1].append(w)
        for k, seg in enumerate(segments):
            if not seg:
                raise ValueError(f"line {n}: empty command in {line!r}")
            env = {}
            while seg and _ENV.match(seg[0]):
                name, _, value = seg.pop(0).partition("=")
                env[name] = value
            text_key = " ".join([*(f"{a}={b}" for a, b in env.items()), *seg])
            commands.append(Command(text_key, env, seg, comment if k == len(segments) - 1 else "", subshell,
                                    [] if console else None, n))
    return commands


# --------------------------------------------------------------------------- Python blocks


def exec_session(blocks: list[tuple[str, str]], namespace: dict | None = None) -> list[tuple[str, int, str]]:
    """Execute ``(name, code)`` blocks in order in one namespace (what a reader typing them into one
    interpreter gets); returns every line printed to stdout as ``(block name, line in the block,
    text)``."""
    ns = {"__name__": "__docs__"} if namespace is None else namespace
    printed: list[tuple[str, int, str]] = []

    def doc_print(*args, sep=" ", end="\n", file=None, flush=False):
        if file is None or file is sys.stdout:
            frame = sys._getframe(1)
            printed.append((frame.f_code.co_filename, frame.f_lineno, (sep or " ").join(map(str, args))))
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)

    ns["print"] = doc_print
    for name, code in blocks:
        exec(compile(code, name, "exec"), ns)  # noqa: S102 - running the documentation is the point
    return printed


_VALUE_COMMENT = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<value>[-+]?\d+(?:\.(?P<decimals>\d+))?)(?:\s|$)")


def stated_values(code: str) -> dict[int, tuple[str, int]]:
    """``print(...)  # 4.127`` lines: {line number: (the value as written, its decimals)}."""
    out = {}
    for n, line in enumerate(code.splitlines(), 1):
        m = _VALUE_COMMENT.match(line)
        if m:
            out[n] = (m["value"], len(m["decimals"] or ""))
    return out


def check_stated_values(name: str, code: str, printed: list[tuple[str, int, str]]) -> int:
    """Every ``print(x)  # value`` of a block printed exactly one number that rounds to the value
    as written; returns how many were checked."""
    values = stated_values(code)
    for line, (value, decimals) in values.items():
        got = [text for block, n, text in printed if block == name and n == line]
        assert len(got) == 1, f"{name}:{line}: expected one printed line, got {got}"
        assert f"{float(got[0]):.{decimals}f}" == value, f"{name}:{line}: printed {got[0]}, the docs say {value}"
    return len(values)


# --------------------------------------------------------------------------- quoted source


def _is_ellipsis(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Without docstrings (string statements) and ``from __future__`` imports."""
    return [n for n in body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
            and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def _same(quoted: ast.stmt, source: ast.stmt) -> bool:
    if type(quoted) is not type(source):
        return False
    if not hasattr(quoted, "body") or isinstance(quoted, ast.If | ast.For | ast.While | ast.With | ast.Try):
        return ast.dump(quoted) == ast.dump(source)
    head_q, head_s = copy.copy(quoted), copy.copy(source)
    head_q.body, head_s.body = [], []
    return ast.dump(head_q) == ast.dump(head_s) and _match(_statements(quoted.body), _statements(source.body), True)


def _match(quoted: list[ast.stmt], source: list[ast.stmt], whole: bool) -> bool:
    if not quoted:
        return not whole or not source
    first, rest = quoted[0], quoted[1:]
    if _is_ellipsis(first):
        return any(_match(rest, source[k:], whole) for k in range(len(source) + 1))
    if source and _same(first, source[0]) and _match(rest, source[1:], whole):
        return True
    return bool(source) and not whole and _match(quoted, source[1:], whole)


def quotes(snippet: str, source: str, whole: bool = False) -> bool:
    """Whether ``snippet`` quotes ``source`` faithfully: the same statements (comments, docstrings
    and formatting aside), a ``...`` statement standing for any statements left out; with
    ``whole`` every top-level statement of ``source`` is quoted, else only some of them, in order.
    Function and class bodies are always compared whole."""
    return _match(_statements(ast.parse(textwrap.dedent(snippet)).body), _statements(ast.parse(source).body), whole)


def match_lines(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` equals ``expected`` where an expected line ``...`` stands for any number
    of lines (trailing blanks ignored)."""
    expected = [e.rstrip() for e in expected]
    actual = [a.rstrip() for a in actual]
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(match_lines(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and match_lines(expected[1:], actual[1:])


def _main(spec: str, result: str) -> None:
    blocks = [(name, code) for name, code in json.loads(Path(spec).read_text(encoding="utf-8"))]
    printed = exec_session(blocks)
    Path(result).write_text(json.dumps(printed), encoding="utf-8")


if __name__ == "__main__":
    _main(*sys.argv[1:])
