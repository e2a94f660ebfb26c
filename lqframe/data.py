"""Calibration and evaluation text: data sources and token windows.

A *data source* is a string:

``pydoc``
    Python's own documentation text (``pydoc_data.topics.topics``, values in sorted-key order
    joined with a blank line). Ships with CPython, so it is always there, offline.
``text:PATH``
    A UTF-8 text file.
``jsonl:PATH:FIELD``
    One JSON object per line; the string field ``FIELD`` of each, joined with a blank line. ``PATH``
    may contain ``:`` (the field name is split off the right).
``hf:NAME[:CONFIG[:SPLIT]]``
    A Hugging Face dataset (needs the optional ``datasets`` package and a reachable hub or cache),
    column ``text`` or the only string column, split ``train`` unless given.
``package:DIST:PATH``
    A UTF-8 text file shipped inside the installed Python distribution ``DIST``, ``PATH`` relative
    to where the distribution is installed (site-packages). The distribution is never imported, so
    a ``pip install --no-deps DIST`` is enough.
``news``
    English news prose, a second domain unlike ``pydoc``: the Lee corpus (300 Australian
    Broadcasting Corporation news articles, one per line, about 75 000 tokens) that ships with
    gensim's test data (``package:gensim:gensim/test/test_data/lee_background.cor``; install it
    offline-capable with ``pip install --no-deps gensim``).
``wiki``
    English encyclopedic prose: the 206 Wikipedia articles of the dump excerpt in gensim's test data
    (``enwiki-latest-pages-articles1.xml-…-shortened.bz2``), markup stripped by
    :func:`wiki_plain_text` (templates, tables, references, files and categories dropped; links
    kept as their text), articles in dump order, about 1.1 M tokens. A third domain, never used
    for calibration by the shipped recipes.

:func:`make_windows` tokenizes the text once and cuts the token stream into non-overlapping windows
of ``seq_len`` tokens. Evaluation windows and calibration windows are disjoint sets of those
windows, so no token that is evaluated was ever seen during calibration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from lqframe.errors import DataError

__all__ = ["SOURCE_FORMS", "NAMED_SOURCES", "load_text", "TokenWindows", "make_windows", "evaluation_indices",
           "DataSets", "make_data", "calibration_shares"]

SOURCE_FORMS = ("pydoc", "news", "wiki", "text:PATH", "jsonl:PATH:FIELD", "hf:NAME[:CONFIG[:SPLIT]]",
                "package:DIST:PATH")

#: short names for texts that ship inside an installable package: name → (distribution, path inside
#: it, how the file is read: "text" or "mediawiki" (a bz2 XML dump, see :func:`wiki_plain_text`))
NAMED_SOURCES = {
    "news": ("gensim", "gensim/test/test_data/lee_background.cor", "text"),
    "wiki": ("gensim", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
             "mediawiki"),
}

_SEPARATOR = "\n\n"


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _error(source: str, message: str) -> DataError:
    return DataError(_one_line(f"data source {source!r}: {message}"))


# ----------------------------------------------------------------------------------------- sources


def _pydoc_text(source: str) -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise _error(source, f"Python's documentation topics (pydoc_data) are not installed: {exc}") from None
    return _SEPARATOR.join(str(topics[key]) for key in sorted(topics))


def _read_utf8(source: str, path_text: str) -> str:
    """Contents of a UTF-8 file, a leading byte-order mark removed; every failure is a DataError."""
    if not path_text:
        raise _error(source, "no file path given")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise _error(source, f"file not found: {path}")
    if path.is_dir():
        raise _error(source, f"{path} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _error(source, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(
            source, f"{path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} ({exc.reason})"
        ) from None
    return text.removeprefix("\ufeff")


def _text_file(source: str, path_text: str) -> str:
    text = _read_utf8(source, path_text)
    if not text.strip():
        raise _error(source, f"{Path(path_text).expanduser()} is empty (or holds only whitespace)")
    return text


def _jsonl_file(source: str, spec: str) -> str:
    path_text, sep, field = spec.rpartition(":")
    if not sep or not path_text or not field:
        raise _error(source, "expected jsonl:PATH:FIELD (the file path, then the name of a string field)")
    text = _read_utf8(source, path_text)
    path = Path(path_text).expanduser()
    values: list[str] = []
    # Split on "\n" only: str.splitlines() would also break at U+2028 etc., which JSON allows raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(source, f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise _error(source, f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise _error(source, f"{path} line {number}: no field {field!r} (fields: {keys})")
        value = record[field]
        if not isinstance(value, str):
            raise _error(source, f"{path} line {number}: field {field!r} is {type(value).__name__}, expected a string")
        values.append(value)
    if not values:
        raise _error(source, f"{path} holds no JSON records")
    joined = _SEPARATOR.join(values)
    if not joined.strip():
        raise _error(source, f"{path}: every {field!r} value is empty")
    return joined


def _text_column(source: str, dataset: Any) -> str:
    names = list(getattr(dataset, "column_names", None) or [])
    if "text" in names:
        return "text"
    features = getattr(dataset, "features", None) or {}
    strings = [n for n in names if getattr(features.get(n), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    if not strings:
        raise _error(source, f"dataset has no 'text' column and no string column (columns: {', '.join(names)})")
    raise _error(
        source, f"dataset has no 'text' column and several string columns ({', '.join(strings)}); cannot choose"
    )


def _hf_dataset(source: str, spec: str) -> str:
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise _error(source, "expected hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise _error(
            source, "Hugging Face datasets need the optional 'datasets' package: pip install datasets"
        ) from None
    where = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad config: all reported the same way
        raise _error(source, f"cannot load {where}: {type(exc).__name__}: {exc}") from None
    column = _text_column(source, dataset)
    try:
        values = [v for v in dataset[column] if v is not None]
    except Exception as exc:
        raise _error(source, f"cannot read column {column!r} of {where}: {type(exc).__name__}: {exc}") from None
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise _error(source, f"column {column!r} of {where} holds {type(bad).__name__} values, not strings")
    joined = _SEPARATOR.join(values)
    if not joined.strip():
        raise _error(source, f"{where} has no text in column {column!r}")
    return joined


def _package_path(source: str, spec: str, hint: str | None = None) -> Path:
    import importlib.metadata

    dist_name, sep, rel = spec.partition(":")
    if not sep or not dist_name or not rel:
        raise _error(source, "expected package:DIST:PATH (an installed distribution, then a file path inside it)")
    install = hint or f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise _error(source, f"the text ships with the Python package {dist_name!r}, which is not installed: "
                             f"{install}") from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise _error(source, f"{dist_name} {dist.version} has no file {rel} (looked at {path}); "
                             f"reinstall it: {install}")
    return path


def _package_file(source: str, spec: str, hint: str | None = None) -> str:
    return _text_file(source, str(_package_path(source, spec, hint)))


_WIKI_DROP = re.compile(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>|<(gallery|math|timeline)[^>]*>.*?</\1>",
                        re.S | re.I)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}")  # innermost template / table
_WIKI_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")  # innermost [[target|text]]
_WIKI_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_WIKI_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def wiki_plain_text(markup: str) -> str:
    """Plain prose from MediaWiki markup: comments, references, templates (nested) and tables
    dropped, ``[[File:…]]`` / ``[[Category:…]]`` links dropped, other links replaced by their text,
    external links by their label, bold/italic quotes, HTML tags and list bullets removed, headings
    kept as lines; HTML entities decoded; runs of blank lines collapsed."""
    import html

    text = _WIKI_DROP.sub("", markup)
    for pattern in (_WIKI_TEMPLATE, _WIKI_LINK):
        while True:
            if pattern is _WIKI_LINK:
                new = pattern.sub(lambda m: "" if ":" in m.group(1) else (m.group(2) or m.group(1)), text)
            else:
                new = pattern.sub("", text)
            if new == text:
                break
            text = new
    text = _WIKI_EXTERNAL.sub(lambda m: m.group(1), text)
    text = _WIKI_HEADING.sub(lambda m: m.group(2), text)
    text = _WIKI_TAG.sub("", text.replace("'''", "").replace("''", ""))
    text = html.unescape(text)
    lines = [re.sub(r"^[*#:;]+\s*", "", line).rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not line.startswith(("{|", "|", "!"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wiki_dump(source: str, spec: str, hint: str) -> str:
    """The articles (namespace 0, redirects skipped) of a bz2 MediaWiki XML dump, as plain text."""
    import bz2
    import xml.etree.ElementTree as ET

    path = _package_path(source, spec, hint)
    articles = []
    try:
        with bz2.open(path, "rb") as fh:
            for _, elem in ET.iterparse(fh):
                if elem.tag.rpartition("}")[2] != "page":
                    continue
                ns = next((c.text for c in elem if c.tag.endswith("}ns")), "0")
                body = next((t.text for r in elem if r.tag.endswith("}revision") for t in r
                             if t.tag.endswith("}text")), None) or ""
                if ns == "0" and not body.lstrip().upper().startswith("#REDIRECT"):
                    articles.append(wiki_plain_text(body))
                elem.clear()
    except (OSError, EOFError, ET.ParseError) as exc:
        raise _error(source, f"cannot read the Wikipedia dump {path}: {exc}") from None
    text = _SEPARATOR.join(a for a in articles if a)
    if not text.strip():
        raise _error(source, f"the Wikipedia dump {path} holds no article text")
    return text


def load_text(source: str) -> str:
    """The text of a data source (see the module docstring for the forms). Raises :class:`DataError`
    with a one-line message naming the source (and file, line or dataset) for anything unusable."""
    if not isinstance(source, str):
        raise DataError(f"a data source must be a string, got {type(source).__name__}")
    scheme, sep, rest = source.partition(":")
    if source == "pydoc":
        return _pydoc_text(source)
    if source in NAMED_SOURCES:
        dist, path, reader = NAMED_SOURCES[source]
        spec, hint = f"{dist}:{path}", f"pip install --no-deps {dist}"
        return _wiki_dump(source, spec, hint) if reader == "mediawiki" else _package_file(source, spec, hint)
    if sep and scheme == "package":
        return _package_file(source, rest)
    if sep and scheme == "text":
        return _text_file(source, rest)
    if sep and scheme == "jsonl":
        return _jsonl_file(source, rest)
    if sep and scheme == "hf":
        return _hf_dataset(source, rest)
    raise DataError(_one_line(f"unknown data source {source!r}: expected one of {', '.join(SOURCE_FORMS)}"))


# ----------------------------------------------------------------------------------------- windows


def _shape_repr(t: torch.Tensor) -> str:
    return f"LongTensor{tuple(t.shape)}"


@attrs.frozen(eq=False)
class TokenWindows:
    """Disjoint calibration and evaluation windows cut from one token stream.

    ``calibration_index`` / ``evaluation_index`` are the positions of the windows in the
    non-overlapping windowing of the stream: window ``i`` is tokens ``[i*seq_len, (i+1)*seq_len)``.
    """

    calibration: torch.Tensor = attrs.field(repr=_shape_repr)  # (n_calibration, seq_len) int64
    evaluation: torch.Tensor = attrs.field(repr=_shape_repr)  # (n_evaluation, seq_len) int64
    seq_len: int
    source: str
    total_tokens: int
    calibration_index: tuple[int, ...]
    evaluation_index: tuple[int, ...]


def evaluation_indices(n_windows: int, n_evaluation: int) -> tuple[int, ...]:
    """Which of ``n_windows`` windows are held out for evaluation: ``n_evaluation`` windows evenly
    spaced over the whole stream, the first and the last included (``round(i·(K-1)/(n-1))``, rounding
    halves up, in exact integer arithmetic, so the indices are distinct whenever ``n <= K``).

    Evenly spaced windows sample every part of the text; a contiguous block would score one topic
    only (``pydoc`` is sorted by topic name). On the default model, ``pydoc``, 16 × 512 tokens
    (Python 3.11.7's topics, 220 windows) the float perplexities are: evenly spaced 12.18, first 16
    windows 14.94, last 16 windows 10.01, all 220 windows 13.28 (none of the window choices tried
    reproduces the 11.54 quoted in ARCHITECTURE.md).
    """
    n, k = n_evaluation, n_windows
    if n <= 0 or k <= 0:
        return ()
    if n >= k:
        return tuple(range(k))
    if n == 1:
        return (0,)
    return tuple((2 * i * (k - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n))


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _token_ids(tokenizer: Any, text: str, source: str) -> torch.Tensor:
    # The only use of the tokenizer: one call on the whole text. No special tokens: windows are
    # arbitrary slices of the stream, so a BOS at the very start would sit in window 0 only.
    # verbose=False silences the "sequence longer than the model's max length" warning, which does
    # not apply: the stream is never fed to the model whole.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise _error(source, f"the tokenizer returned input_ids of shape {tuple(ids.shape)}, expected one sequence")
    return ids


def make_windows(
    tokenizer: Any,
    source: str,
    seq_len: int = 512,
    n_calibration: int = 16,
    n_evaluation: int = 16,
    seed: int = 0,
    text: str | None = None,
) -> TokenWindows:
    """Tokenize the text of ``source`` (or ``text``, with ``source`` only as its label) and pick
    ``n_evaluation`` evaluation windows (see :func:`evaluation_indices`) and ``n_calibration``
    calibration windows, a seeded random choice among the other windows, in stream order.

    ``tokenizer`` is any Hugging Face tokenizer, or any callable that accepts
    ``(text, add_special_tokens=False, verbose=False)`` and returns a mapping whose ``"input_ids"`` is
    a list (or 1-D tensor) of token ids. The result is a pure function of the arguments.
    """
    seq_len = _check_count("seq_len", seq_len, 2)
    n_calibration = _check_count("n_calibration", n_calibration, 0)
    n_evaluation = _check_count("n_evaluation", n_evaluation, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if text is None:
        text = load_text(source)
    ids = _token_ids(tokenizer, text, source)
    total = int(ids.numel())
    n_windows = total // seq_len
    needed = (n_calibration + n_evaluation) * seq_len
    if n_calibration + n_evaluation > n_windows:
        raise _error(
            source,
            f"too little text: {total} tokens available, {needed} needed "
            f"(({n_calibration} calibration + {n_evaluation} evaluation windows) × {seq_len} tokens)",
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)

    eval_index = evaluation_indices(n_windows, n_evaluation)
    taken = set(eval_index)
    rest = torch.tensor([i for i in range(n_windows) if i not in taken], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rest.numel(), generator=generator)
    cal_index = tuple(sorted(int(i) for i in rest[order[:n_calibration]]))

    def pick(index: tuple[int, ...]) -> torch.Tensor:
        return windows[list(index)].clone() if index else torch.empty((0, seq_len), dtype=torch.long)

    return TokenWindows(
        calibration=pick(cal_index),
        evaluation=pick(eval_index),
        seq_len=seq_len,
        source=source,
        total_tokens=total,
        calibration_index=cal_index,
        evaluation_index=eval_index,
    )


# ----------------------------------------------------------------------------------------- several sources


def calibration_shares(total: int, sources: Sequence[tuple[str, int | None]]) -> list[tuple[str, int]]:
    """How many calibration windows each source gives: an explicit count where one is given, and
    ``total`` split as evenly as possible (earlier sources get the remainder) among the others."""
    free = [i for i, (_, n) in enumerate(sources) if n is None]
    out = [(src, 0 if n is None else int(n)) for src, n in sources]
    for k, i in enumerate(free):
        out[i] = (out[i][0], total // len(free) + (1 if k < total % len(free) else 0))
    return out


@attrs.frozen(eq=False)
class DataSets:
    """Calibration windows mixed from several sources and evaluation windows per source.

    ``calibration`` stacks each calibration source's windows in the order the sources were given;
    ``evaluation`` maps each evaluation source to its windows (in the order given: the first is the
    run's primary figure). ``record()`` says exactly which windows of which source were used."""

    calibration: torch.Tensor = attrs.field(repr=_shape_repr)
    evaluation: dict[str, torch.Tensor]
    seq_len: int
    seed: int
    calibration_sources: tuple[tuple[str, tuple[int, ...]], ...]  # (source, window indices)
    evaluation_sources: tuple[tuple[str, tuple[int, ...]], ...]
    total_tokens: dict[str, int]

    def record(self) -> dict[str, Any]:
        """JSON description (report.json, resume checks): per source its token count and the
        positions of its windows in the source's windowing."""

        def side(entries):
            return [{"source": s, "total_tokens": self.total_tokens[s], "windows": list(idx)} for s, idx in entries]

        return {"seq_len": self.seq_len, "seed": self.seed, "calibration": side(self.calibration_sources),
                "evaluation": side(self.evaluation_sources)}

    def checksum(self) -> int:
        """Sum-of-ids fingerprint of every window (a changed tokenizer or text changes it)."""
        value = int(self.calibration.sum())
        for i, t in enumerate(self.evaluation.values()):
            value = value * 31 + (i + 1) * int(t.sum())
        return value


def make_data(
    tokenizer: Any,
    calibration: Sequence[tuple[str, int | None]] | Sequence[str],
    evaluation: Sequence[str],
    seq_len: int = 512,
    n_calibration: int = 16,
    n_evaluation: int = 16,
    seed: int = 0,
    texts: dict[str, str] | None = None,
) -> DataSets:
    """Windows from several sources. ``calibration``: sources (or ``(source, windows)`` pairs, see
    :func:`calibration_shares`) whose windows are mixed, ``n_calibration`` in all; ``evaluation``:
    sources evaluated separately, ``n_evaluation`` windows each. Every source is tokenized and
    windowed once by :func:`make_windows` with ``n_evaluation`` evaluation windows held out, whether
    or not it is evaluated, so within a source calibration and evaluation windows are disjoint and
    a source's windows do not depend on the other sources. ``texts`` supplies a source's text
    directly (tests)."""
    n_calibration = _check_count("n_calibration", n_calibration, 0)
    pairs = [(c, None) if isinstance(c, str) else (c[0], c[1]) for c in calibration]
    for src, n in pairs:
        if n is not None:
            _check_count(f"calibration windows of {src!r}", n, 0)
    seen: set[str] = set()
    for src, _ in pairs:
        if src in seen:
            raise DataError(f"calibration source {src!r} is listed twice")
        seen.add(src)
    if len(set(evaluation)) != len(evaluation):
        raise DataError(f"an evaluation source is listed twice: {list(evaluation)}")
    shares = calibration_shares(n_calibration, pairs) if pairs else []
    want = dict(shares)
    windows: dict[str, TokenWindows] = {}
    for src in dict.fromkeys([s for s, _ in shares] + list(evaluation)):
        text = (texts or {}).get(src)
        windows[src] = make_windows(tokenizer, src, seq_len, want.get(src, 0), n_evaluation, seed, text=text)
    cal = [windows[s].calibration for s, n in shares if n]
    calib = torch.cat(cal) if cal else torch.empty((0, seq_len), dtype=torch.long)
    return DataSets(
        calibration=calib,
        evaluation={s: windows[s].evaluation for s in evaluation},
        seq_len=seq_len,
        seed=seed,
        calibration_sources=tuple((s, windows[s].calibration_index) for s, n in shares if n),
        evaluation_sources=tuple((s, windows[s].evaluation_index) for s in evaluation),
        total_tokens={s: w.total_tokens for s, w in windows.items()},
    )


# ----------------------------------------------------------------------------------------- tuning


@attrs.frozen(eq=False)
class TuningWindows:
    """Training and validation windows of the tune stage, mixed from several sources.

    Each source is windowed like :func:`make_windows` with the run's ``n_evaluation`` evaluation
    windows held out, so no tuning window is ever an evaluation window of the same source; the
    windows of all sources are pooled and a seeded permutation gives the validation windows
    (``n_validation``) and the training windows (the rest)."""

    train: torch.Tensor = attrs.field(repr=_shape_repr)
    validation: torch.Tensor = attrs.field(repr=_shape_repr)
    seq_len: int
    seed: int
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (source, window indices in its windowing)
    total_tokens: dict[str, int]

    def record(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "seed": self.seed, "train": int(self.train.shape[0]),
                "validation": int(self.validation.shape[0]),
                "sources": [{"source": s, "total_tokens": self.total_tokens[s], "windows": list(idx)}
                            for s, idx in self.sources]}

    def checksum(self) -> int:
        return int(self.train.sum()) * 31 + int(self.validation.sum())


#: added to the data seed for the tuning windows, so that they are not the calibration windows
#: whenever the text has room for both
TUNING_SEED_OFFSET = 7919


def make_tuning_windows(
    tokenizer: Any,
    sources: Sequence[tuple[str, int | None]] | Sequence[str],
    seq_len: int,
    n_train: int,
    n_validation: int,
    n_evaluation: int,
    seed: int = 0,
    texts: dict[str, str] | None = None,
) -> TuningWindows:
    """The tune stage's windows: ``n_train + n_validation`` windows drawn from ``sources`` (shares
    as in :func:`calibration_shares`), none of them among a source's ``n_evaluation`` evaluation
    windows; a pure function of the arguments."""
    n_train = _check_count("tuning windows", n_train, 1)
    n_validation = _check_count("validation windows", n_validation, 0)
    pairs = [(c, None) if isinstance(c, str) else (c[0], c[1]) for c in sources]
    if not pairs:
        raise DataError("no tuning source given")
    shares = calibration_shares(n_train + n_validation, pairs)
    chunks, picked, totals = [], [], {}
    for src, n in shares:
        w = make_windows(tokenizer, src, seq_len, n, n_evaluation, seed + TUNING_SEED_OFFSET,
                         text=(texts or {}).get(src))
        chunks.append(w.calibration)
        picked.append((src, w.calibration_index))
        totals[src] = w.total_tokens
    pool = torch.cat(chunks)
    if pool.shape[0] != n_train + n_validation:  # (a source's explicit count changed the total)
        n_train = pool.shape[0] - n_validation
        if n_train < 1:
            raise DataError(f"tuning sources give {pool.shape[0]} windows, fewer than the {n_validation} "
                            "validation windows plus one training window")
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed + TUNING_SEED_OFFSET))
    return TuningWindows(train=pool[order[n_validation:]].clone(), validation=pool[order[:n_validation]].clone(),
                         seq_len=seq_len, seed=seed, sources=tuple(picked), total_tokens=totals)
