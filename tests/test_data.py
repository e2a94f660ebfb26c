"""Data sources (pydoc, text, jsonl, hf) and the token windows cut from them."""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import types

import pytest
import torch

from lqframe.data import SOURCE_FORMS, TokenWindows, evaluation_indices, load_text, make_windows
from lqframe.errors import DataError


class PositionTokenizer:
    """One token per whitespace-separated word, whose id is the word's position in the text: every
    token of the stream is distinct, so window contents show exactly which tokens they hold."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, **kwargs):
        self.calls.append(kwargs)
        return {"input_ids": list(range(len(text.split())))}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ pydoc


def test_pydoc_is_the_sorted_topics_joined():
    from pydoc_data.topics import topics

    text = load_text("pydoc")
    keys = sorted(topics)
    assert text == "\n\n".join(topics[k] for k in keys)
    assert text.startswith(topics[keys[0]])
    assert text.endswith(topics[keys[-1]])
    assert len(text) > 100_000


# ------------------------------------------------------------------------------------------- text


def test_text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo\nworld ✓\n", encoding="utf-8")
    assert load_text(f"text:{p}") == "héllo\nworld ✓\n"


def test_text_file_drops_byte_order_mark(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffabc".encode())
    assert load_text(f"text:{p}") == "abc"


def test_text_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DataError) as exc:
        load_text(f"text:{p}")
    message = assert_one_line(exc)
    assert f"text:{p}" in message and "not found" in message


def test_text_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory") as exc:
        load_text(f"text:{tmp_path}")
    assert str(tmp_path) in assert_one_line(exc)


def test_text_unreadable(tmp_path, monkeypatch):
    p = tmp_path / "locked.txt"
    p.write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod 000 does not stop root, so simulate the failure at the read itself.
    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(DataError) as exc:
        load_text(f"text:{p}")
    message = assert_one_line(exc)
    assert "cannot read" in message and "Permission denied" in message and str(p) in message


def test_text_invalid_utf8_gives_byte_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xc3\xa9 ok then \xe9t\xe9")  # valid é at 3..4, a bare latin-1 0xe9 at 14
    with pytest.raises(DataError) as exc:
        load_text(f"text:{p}")
    message = assert_one_line(exc)
    assert "not valid UTF-8" in message and "byte offset 14" in message and str(p) in message


@pytest.mark.parametrize("content", ["", "   \n\t\n  "])
def test_text_empty_or_whitespace(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(DataError, match="empty") as exc:
        load_text(f"text:{p}")
    assert f"text:{p}" in assert_one_line(exc)


def test_text_without_path():
    with pytest.raises(DataError, match="no file path"):
        load_text("text:")


# ------------------------------------------------------------------------------------------ jsonl


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_joins_field_and_skips_blank_lines(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "first", "id": 1}), "", "   ", json.dumps({"text": "second\u2028line", "id": 2})],
    )
    assert load_text(f"jsonl:{p}:text") == "first\n\nsecond\u2028line"


def test_jsonl_path_may_contain_colons(tmp_path):
    folder = tmp_path / "a:b"
    folder.mkdir()
    p = write_jsonl(folder / "x:y.jsonl", [json.dumps({"body": "one"}), json.dumps({"body": "two"})])
    assert load_text(f"jsonl:{p}:body") == "one\n\ntwo"


def test_jsonl_crlf_lines(tmp_path):
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(b'{"t": "a"}\r\n\r\n{"t": "b"}\r\n')
    assert load_text(f"jsonl:{p}:t") == "a\n\nb"


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('["text", "a list"]', "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
        ('{"title": "no text field"}', "no field 'text'"),
        ('{"text": 42}', "field 'text' is int, expected a string"),
        ('{"text": null}', "field 'text' is NoneType, expected a string"),
    ],
)
def test_jsonl_bad_line_names_path_and_line(tmp_path, bad_line, expected):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "fine"}), "", bad_line])
    with pytest.raises(DataError) as exc:
        load_text(f"jsonl:{p}:text")
    message = assert_one_line(exc)
    assert expected in message
    assert f"{p} line 3" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_result(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match="no JSON records") as exc:
        load_text(f"jsonl:{p}:text")
    assert str(p) in assert_one_line(exc)


def test_jsonl_only_empty_strings(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": ""}), json.dumps({"text": " "})])
    with pytest.raises(DataError, match="empty"):
        load_text(f"jsonl:{p}:text")


def test_jsonl_missing_file_and_missing_field_name(tmp_path):
    p = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="not found") as exc:
        load_text(f"jsonl:{p}:text")
    assert str(p) in assert_one_line(exc)
    with pytest.raises(DataError, match="jsonl:PATH:FIELD"):
        load_text("jsonl:nofield")
    with pytest.raises(DataError, match="jsonl:PATH:FIELD"):
        load_text(f"jsonl:{p}:")


def test_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="byte offset 25"):
        load_text(f"jsonl:{p}:text")


# --------------------------------------------------------------------------------------------- hf


class FakeDataset:
    def __init__(self, columns: dict, dtypes: dict):
        self._columns = columns
        self.column_names = list(columns)
        self.features = {name: types.SimpleNamespace(dtype=dtype) for name, dtype in dtypes.items()}

    def __getitem__(self, name):
        return iter(self._columns[name])


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []
    module = types.ModuleType("datasets")
    module.result = FakeDataset(
        {"text": ["alpha", "", "beta"], "label": [0, 1, 2]}, {"text": "string", "label": "int64"}
    )

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if isinstance(module.result, Exception):
            raise module.result
        return module.result

    module.load_dataset = load_dataset
    module.calls = calls
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_hf_text_column_and_default_split(fake_datasets):
    assert load_text("hf:wikitext") == "alpha\n\n\n\nbeta"
    assert fake_datasets.calls == [("wikitext", None, "train")]


def test_hf_config_and_split(fake_datasets):
    load_text("hf:wikitext:wikitext-2-raw-v1:test")
    load_text("hf:wikitext:wikitext-2-raw-v1")
    load_text("hf:c4::validation")
    assert fake_datasets.calls == [
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("wikitext", "wikitext-2-raw-v1", "train"),
        ("c4", None, "validation"),
    ]


def test_hf_only_string_column(fake_datasets):
    fake_datasets.result = FakeDataset({"id": [1, 2], "content": ["x", "y"]}, {"id": "int32", "content": "string"})
    assert load_text("hf:some/data") == "x\n\ny"


def test_hf_ambiguous_or_missing_string_column(fake_datasets):
    fake_datasets.result = FakeDataset({"a": ["x"], "b": ["y"]}, {"a": "string", "b": "large_string"})
    with pytest.raises(DataError, match="several string columns"):
        load_text("hf:some/data")
    fake_datasets.result = FakeDataset({"n": [1]}, {"n": "int64"})
    with pytest.raises(DataError, match="no string column"):
        load_text("hf:some/data")


def test_hf_load_failure_is_one_line(fake_datasets):
    fake_datasets.result = ConnectionError("Couldn't reach 'wikitext' on the Hub\n(offline mode is enabled)")
    with pytest.raises(DataError) as exc:
        load_text("hf:wikitext:wikitext-2-raw-v1:test")
    message = assert_one_line(exc)
    assert "'wikitext'" in message and "ConnectionError" in message and "offline mode is enabled" in message


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets") as exc:
        load_text("hf:wikitext")
    assert_one_line(exc)


def test_hf_bad_spec(fake_datasets):
    with pytest.raises(DataError, match=r"hf:NAME\[:CONFIG\[:SPLIT\]\]"):
        load_text("hf:")
    with pytest.raises(DataError, match=r"hf:NAME"):
        load_text("hf:a:b:c:d")


# ---------------------------------------------------------------------------------------- unknown


@pytest.mark.parametrize("source", ["wikitext", "file:/tmp/x.txt", "", "PYDOC", "text"])
def test_unknown_source_lists_the_forms(source):
    with pytest.raises(DataError) as exc:
        load_text(source)
    message = assert_one_line(exc)
    assert "unknown data source" in message
    for form in SOURCE_FORMS:
        assert form in message
    assert SOURCE_FORMS == ("pydoc", "news", "wiki", "text:PATH", "jsonl:PATH:FIELD", "hf:NAME[:CONFIG[:SPLIT]]",
                            "package:DIST:PATH")


# ---------------------------------------------------------------------------------------- windows


def token_ranges(windows: torch.Tensor, seq_len: int) -> list[range]:
    """The stream positions each window covers (the PositionTokenizer makes id == position)."""
    out = []
    for row in windows.tolist():
        assert row == list(range(row[0], row[0] + seq_len))  # contiguous slice of the stream
        assert row[0] % seq_len == 0  # aligned with the non-overlapping windowing
        out.append(range(row[0], row[0] + seq_len))
    return out


def test_windows_are_disjoint_slices_of_the_stream():
    tok = PositionTokenizer()
    w = make_windows(tok, "custom", seq_len=10, n_calibration=5, n_evaluation=4, seed=3, text=words(157))
    assert isinstance(w, TokenWindows)
    assert w.total_tokens == 157 and w.seq_len == 10 and w.source == "custom"
    assert w.calibration.shape == (5, 10) and w.evaluation.shape == (4, 10)
    assert w.calibration.dtype == w.evaluation.dtype == torch.long
    cal = token_ranges(w.calibration, 10)
    ev = token_ranges(w.evaluation, 10)
    assert [r.start // 10 for r in cal] == list(w.calibration_index)
    assert [r.start // 10 for r in ev] == list(w.evaluation_index)
    assert not set().union(*map(set, cal)) & set().union(*map(set, ev))
    assert len(set(w.calibration_index) | set(w.evaluation_index)) == 9
    assert list(w.calibration_index) == sorted(w.calibration_index)
    assert all(0 <= i < 15 for i in w.calibration_index + w.evaluation_index)  # 157 // 10 windows
    # the tokenizer is called once, on the whole text, without special tokens
    assert tok.calls == [{"add_special_tokens": False, "verbose": False}]


def test_evaluation_windows_are_evenly_spaced():
    w = make_windows(PositionTokenizer(), "custom", seq_len=8, n_calibration=3, n_evaluation=4, text=words(200))
    assert w.evaluation_index == (0, 8, 16, 24) == evaluation_indices(25, 4)
    assert w.evaluation[:, 0].tolist() == [0, 64, 128, 192]
    # the default model's setting: 113108 pydoc tokens -> 220 windows of 512
    assert evaluation_indices(220, 16) == (0, 15, 29, 44, 58, 73, 88, 102, 117, 131, 146, 161, 175, 190, 204, 219)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 16, 17, 31, 100, 220])
def test_evaluation_indices_properties(k):
    assert evaluation_indices(k, 0) == ()
    assert evaluation_indices(k, 1) == (0,)
    assert evaluation_indices(k, k) == tuple(range(k))
    for n in range(2, k + 1):
        idx = evaluation_indices(k, n)
        assert len(idx) == n and list(idx) == sorted(set(idx))  # distinct, increasing
        assert idx[0] == 0 and idx[-1] == k - 1  # spans the whole stream
        gaps = {b - a for a, b in zip(idx, idx[1:], strict=False)}
        assert max(gaps) - min(gaps) <= 1  # as even as integers allow


def test_windows_are_deterministic_and_seed_changes_calibration():
    text = words(1000)
    a = make_windows(PositionTokenizer(), "custom", seq_len=10, n_calibration=8, n_evaluation=4, seed=0, text=text)
    b = make_windows(PositionTokenizer(), "custom", seq_len=10, n_calibration=8, n_evaluation=4, seed=0, text=text)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    assert a.calibration_index == b.calibration_index
    others = [
        make_windows(PositionTokenizer(), "custom", seq_len=10, n_calibration=8, n_evaluation=4, seed=s, text=text)
        for s in (1, 2)
    ]
    assert any(o.calibration_index != a.calibration_index for o in others)
    for o in others:  # evaluation never depends on the seed
        assert o.evaluation_index == a.evaluation_index and torch.equal(o.evaluation, a.evaluation)


def test_evaluation_windows_do_not_depend_on_calibration_count():
    """`lqframe eval` asks for 0 calibration windows, a run for 16: both must score the same windows."""
    text = words(1000)
    ref = make_windows(PositionTokenizer(), "c", seq_len=10, n_calibration=0, n_evaluation=6, text=text)
    for n_cal in (1, 16, 94):
        w = make_windows(PositionTokenizer(), "c", seq_len=10, n_calibration=n_cal, n_evaluation=6, text=text)
        assert w.evaluation_index == ref.evaluation_index and torch.equal(w.evaluation, ref.evaluation)


def test_calibration_is_not_always_the_windows_after_evaluation():
    w = make_windows(PositionTokenizer(), "c", seq_len=4, n_calibration=5, n_evaluation=2, seed=0, text=words(400))
    assert w.calibration_index != tuple(range(2, 7))


def test_too_few_tokens_error_text():
    with pytest.raises(DataError) as exc:
        make_windows(PositionTokenizer(), "text:small.txt", seq_len=10, n_calibration=3, n_evaluation=2, text=words(49))
    message = assert_one_line(exc)
    assert "'text:small.txt'" in message
    assert "49 tokens available" in message
    assert "50 needed" in message


def test_exactly_enough_tokens():
    w = make_windows(PositionTokenizer(), "c", seq_len=10, n_calibration=3, n_evaluation=2, text=words(50))
    assert sorted(w.calibration_index + w.evaluation_index) == [0, 1, 2, 3, 4]


def test_zero_calibration_or_evaluation_windows():
    text = words(100)
    w = make_windows(PositionTokenizer(), "c", seq_len=10, n_calibration=0, n_evaluation=3, text=text)
    assert w.calibration.shape == (0, 10) and w.calibration.dtype == torch.long and w.calibration_index == ()
    w = make_windows(PositionTokenizer(), "c", seq_len=10, n_calibration=4, n_evaluation=0, text=text)
    assert w.evaluation.shape == (0, 10) and w.evaluation_index == () and len(w.calibration_index) == 4


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": 1}, {"seq_len": 0}, {"seq_len": 2.5}, {"n_calibration": -1}, {"n_evaluation": -2}]
)
def test_bad_window_options(kwargs):
    with pytest.raises(DataError):
        make_windows(PositionTokenizer(), "c", text=words(100), **{"seq_len": 4, **kwargs})


def test_make_windows_loads_the_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(words(30))
    w = make_windows(PositionTokenizer(), f"text:{p}", seq_len=5, n_calibration=2, n_evaluation=2)
    assert w.total_tokens == 30 and w.source == f"text:{p}"
    with pytest.raises(DataError, match="not found"):
        make_windows(PositionTokenizer(), f"text:{tmp_path / 'missing.txt'}", seq_len=5)


def test_real_fast_tokenizer_without_length_warning():
    """A character-level Hugging Face fast tokenizer with a tiny model_max_length: the whole stream
    is tokenized without truncation and without the 'longer than the maximum' warning."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz .,\n"))
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", model_max_length=16)

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        text = "the quick brown fox jumps over the lazy dog. " * 5
        w = make_windows(tok, "custom", seq_len=16, n_calibration=4, n_evaluation=4, seed=1, text=text)
    finally:
        logger.removeHandler(handler)
    assert w.total_tokens == len(text)
    assert not [m for m in records if "longer than the specified maximum" in m]
    stream = [vocab[c] for c in text]
    for i, row in zip(w.evaluation_index + w.calibration_index, torch.cat([w.evaluation, w.calibration]), strict=True):
        assert row.tolist() == stream[i * 16 : (i + 1) * 16]


def test_repr_shows_shapes_not_tensors():
    w = make_windows(PositionTokenizer(), "c", seq_len=4, n_calibration=2, n_evaluation=2, text=words(40))
    text = repr(w)
    assert "LongTensor(2, 4)" in text and "tensor(" not in text


# ------------------------------------------------------------------------------------------ several sources


def test_news_is_english_prose_shipped_with_gensim():
    text = load_text("news")
    docs = text.split("\n")
    assert len([d for d in docs if d.strip()]) == 300  # the Lee background corpus: one article per line
    assert "Hundreds of people have been forced to vacate their homes" in text
    assert "def " not in text and ">>>" not in text  # prose, not documentation


def test_news_without_gensim_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError) as exc:
        load_text("news")
    assert "pip install --no-deps gensim" in assert_one_line(exc)


def test_package_source_reads_a_file_of_an_installed_distribution():
    import importlib.metadata

    dist = importlib.metadata.distribution("pytest")
    rel = next(str(f) for f in dist.files if str(f).endswith("__init__.py") and str(f).startswith("_pytest/"))
    assert load_text(f"package:pytest:{rel}") == pathlib.Path(dist.locate_file(rel)).read_text(encoding="utf-8")
    with pytest.raises(DataError, match="has no file no/such.txt"):
        load_text("package:pytest:no/such.txt")
    with pytest.raises(DataError, match="expected package:DIST:PATH"):
        load_text("package:pytest")


def _texts():
    # three sources whose token ids do not overlap (PositionTokenizer numbers words from 0 in each, so
    # give each source a distinct length and compare window contents per source)
    return {"a": words(400), "b": words(300), "c": words(250)}


def test_make_data_mixes_calibration_and_scores_each_evaluation_source():
    from lqframe.data import make_data

    tok = PositionTokenizer()
    d = make_data(tok, ["a", "b"], ["a", "c"], seq_len=10, n_calibration=7, n_evaluation=3, seed=1, texts=_texts())
    assert [s for s, _ in d.calibration_sources] == ["a", "b"]
    assert [len(i) for _, i in d.calibration_sources] == [4, 3]  # 7 split evenly, remainder first
    assert d.calibration.shape == (7, 10) and list(d.evaluation) == ["a", "c"]
    for source, idx in d.calibration_sources + d.evaluation_sources:
        ref = make_windows(PositionTokenizer(), source, 10, 0, 3, 1, text=_texts()[source])
        if (source, idx) in d.evaluation_sources:
            assert idx == ref.evaluation_index  # evaluation windows never depend on the calibration mix
    # within each source calibration and evaluation windows are disjoint
    cal = dict(d.calibration_sources)
    ev = dict(d.evaluation_sources)
    assert not set(cal["a"]) & set(ev["a"])
    b_eval = make_windows(PositionTokenizer(), "b", 10, 0, 3, 1, text=_texts()["b"]).evaluation_index
    assert not set(cal["b"]) & set(b_eval)  # held out even though b is not evaluated
    # the calibration tensor is a's windows then b's, exactly the tokens the record names
    a_rows = torch.stack([torch.arange(i * 10, (i + 1) * 10) for i in cal["a"]])
    b_rows = torch.stack([torch.arange(i * 10, (i + 1) * 10) for i in cal["b"]])
    assert torch.equal(d.calibration, torch.cat([a_rows, b_rows]))
    for source, idx in d.evaluation_sources:
        rows = torch.stack([torch.arange(i * 10, (i + 1) * 10) for i in idx])
        assert torch.equal(d.evaluation[source], rows)
    rec = d.record()
    assert rec["calibration"] == [{"source": "a", "total_tokens": 400, "windows": list(cal["a"])},
                                  {"source": "b", "total_tokens": 300, "windows": list(cal["b"])}]
    assert rec["evaluation"][1] == {"source": "c", "total_tokens": 250, "windows": list(ev["c"])}
    json.dumps(rec)  # report.json material


def test_make_data_is_deterministic_and_seeded():
    from lqframe.data import make_data

    args = (["a", "b"], ["a"], 10, 8, 3)
    one = make_data(PositionTokenizer(), *args, seed=0, texts=_texts())
    two = make_data(PositionTokenizer(), *args, seed=0, texts=_texts())
    assert one.record() == two.record() and torch.equal(one.calibration, two.calibration)
    assert one.checksum() == two.checksum()
    other = make_data(PositionTokenizer(), *args, seed=5, texts=_texts())
    assert other.record()["calibration"] != one.record()["calibration"]
    assert other.record()["evaluation"] == one.record()["evaluation"]


def test_make_data_explicit_counts_and_errors():
    from lqframe.data import calibration_shares, make_data

    assert calibration_shares(10, [("a", None), ("b", 2), ("c", None)]) == [("a", 5), ("b", 2), ("c", 5)]
    assert calibration_shares(1, [("a", None), ("b", None)]) == [("a", 1), ("b", 0)]
    d = make_data(PositionTokenizer(), [("a", 2), ("b", None)], [], 10, 5, 3, texts=_texts())
    assert [(s, len(i)) for s, i in d.calibration_sources] == [("a", 2), ("b", 5)]
    assert d.evaluation == {}
    with pytest.raises(DataError, match="listed twice"):
        make_data(PositionTokenizer(), ["a", "a"], [], 10, 4, 3, texts=_texts())
    with pytest.raises(DataError, match="'c'.*too little text"):
        make_data(PositionTokenizer(), ["c"], [], 10, 30, 3, texts=_texts())


def test_wiki_plain_text_strips_markup():
    from lqframe.data import wiki_plain_text

    markup = ("{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy|philosophy]] "
              "of [[society]].<ref name=a>{{cite web|url=x}}</ref> See [http://example.org the site].<!-- c -->\n"
              "[[File:Flag.svg|thumb|A [[flag]]]]\n== History ==\n* First &amp; second\n"
              "{| class=wikitable\n|-\n| cell\n|}\n\n\n\n[[Category:Ideologies]]<ref>plain</ref><br/>End.")
    text = wiki_plain_text(markup)
    assert text == ("Anarchism is a philosophy of society. See the site.\n\nHistory\nFirst & second\n\nEnd.")


def test_wiki_source_is_article_prose():
    text = load_text("wiki")
    assert len(text) > 2_000_000
    for marker in ("{{", "}}", "[[", "]]", "<ref", "&amp;", "'''"):
        assert text.count(marker) <= 3, marker  # (one article spells out the ASCII table, braces included)
    assert "Anarchism is" in text[:5000]
