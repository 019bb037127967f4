"""`layerfuse run` on the local engine: corpus readers, embeddings against an independent forward, outputs,
bad rows, bad arguments, and a real kill of a running job followed by `--resume`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

import layerfuse
from layerfuse import FusionConfig
from layerfuse.cli import main
from layerfuse.methods import METHODS, register_method
from layerfuse.run import Embedder, embed_corpus
from layerfuse.run.corpus import Corpus, Reject, Text
from layerfuse.run.shards import ShardStore, manifest_digest
from layerfuse.run.truncation import CHARS_PER_TOKEN, capped
from reference import FORMULAS, bert_forward

WORDS = "the a model layer fusion text corpus quick brown fox jumps over lazy dog vector batch token".split()


def sentences(count: int, seed: int = 0, longest: int = 30) -> list[str]:
    generator = numpy.random.default_rng(seed)
    return [" ".join(generator.choice(WORDS, generator.integers(1, longest))) for _ in range(count)]


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    """A 2-block BERT (hidden 32, 64 positions) with the embedded model's tokenizer, saved: quick to run."""
    _, tokenizer = layerfuse.load_model()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("small-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_embeddings(folder, texts, *, layer=None, info=None, pooling="mean", max_length=64):
    """Each text alone, unpadded, through tests/reference.py's BERT forward (addition at `layer`)."""
    model, tokenizer = layerfuse.load_model(folder)
    out = []
    with torch.no_grad():
        for index, text in enumerate(texts):
            batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            row_info = None if info is None else info[index] if info.ndim == 2 else info
            hidden = bert_forward(model, batch, layer=layer, info=row_info, combine=FORMULAS["addition"])[-1][0]
            out.append({"mean": hidden.mean(0), "cls": hidden[0], "none": hidden}[pooling].numpy())
    return out


def read_embeddings(path) -> numpy.ndarray:
    column = pq.read_table(path).column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


# Corpus readers


def test_txt_rows_keep_their_numbers_and_bad_ones_say_why(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\r\n\n   \t\ncaf\xe9\nfive")
    corpus = Corpus(path)
    assert corpus.count() == 5
    assert list(corpus.rows()) == [
        Text(0, "one"),
        Reject(1, "empty text"),
        Reject(2, "empty text"),
        Reject(3, "not UTF-8", "'text': invalid byte 0xe9 at position 3"),
        Text(4, "five"),
    ]
    assert [row.row for row in corpus.rows(start=3)] == [3, 4]


def test_jsonl_bad_rows_each_get_their_reason(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        b'{"id": 7, "text": "good"}',
        b"not json",
        b"",
        b"[1, 2]",
        b'{"id": 1}',
        b'{"id": 2, "text": null}',
        b'{"id": 3, "text": 5}',
        b'{"id": 4, "text": "caf\xe9"}',
        b'{"text": "no id"}',
        b'{"id": "x", "text": " "}',
        b'{"id": "s", "text": "fine"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = list(Corpus(path, id_column="id").rows())
    assert [(row.row, row.reason if isinstance(row, Reject) else row.text) for row in rows] == [
        (0, "good"),
        (1, "not JSON"),
        (2, "not JSON"),
        (3, "not a JSON object"),
        (4, "missing column"),
        (5, "missing column"),
        (6, "not text"),
        (7, "not UTF-8"),
        (8, "missing column"),
        (9, "empty text"),
        (10, "fine"),
    ]
    assert rows[0].id == "7" and rows[-1].id == "s"
    assert rows[2].detail == "empty line" and rows[8].detail == "no 'id' key"


def test_csv_rows_are_counted_across_quoted_newlines_and_malformed_rows(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(
        b'id,text,extra\n007,"first\nspans two lines",x\n2,short\n3,ok,y\n4,\xff,z\n5,,z\n6,too,many,f\n7,last,g\n'
    )
    corpus = Corpus(path, id_column="id")
    rows = list(corpus.rows())
    assert corpus.count() == len(rows) == 7
    assert rows[0] == Text(0, "first\nspans two lines", "007")
    assert [(row.row, row.reason) for row in rows if isinstance(row, Reject)] == [
        (1, "malformed CSV row"),
        (3, "not UTF-8"),
        (4, "empty text"),
        (5, "malformed CSV row"),
    ]
    assert rows[6] == Text(6, "last", "7")


def test_parquet_keeps_the_id_type_and_rejects_nulls(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"key": [10, 11, 12], "body": ["a text", None, ""]}), path)
    corpus = Corpus(path, text_column="body", id_column="key")
    assert corpus.id_type == pa.int64()
    assert list(corpus.rows()) == [
        Text(0, "a text", 10),
        Reject(1, "missing column", "'body' is null"),
        Reject(2, "empty text"),
    ]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("c.txt", "first text\nsecond text\n"),
        ("c.jsonl", '{"id": 1, "text": "first text"}\n{"id": 2, "text": "second text"}\n'),
        ("c.csv", "text,id\nfirst text,1\nsecond text,2\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path, name, content):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / name).write_text(content, encoding="utf-8")
    (tmp_path / name).write_text(content, encoding="utf-8-sig")
    assert (tmp_path / name).read_bytes().startswith(b"\xef\xbb\xbf")
    options = {} if name == "c.txt" else {"id_column": "id"}
    rows = list(Corpus(tmp_path / name, **options).rows())
    assert rows == list(Corpus(tmp_path / "plain" / name, **options).rows())
    assert rows[0] == Text(0, "first text", None if name == "c.txt" else "1")


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("c.csv", b"id,body\n1,x\n", {}, "unknown column 'text' in c.csv: its header has 'id', 'body'"),
        ("c.jsonl", b'{"body": "x"}\n', {}, "unknown column 'text' in c.jsonl: the first 100 rows have keys 'body'"),
        ("c.txt", b"x\n", {"text_column": "body"}, "a .txt corpus holds one text a line and no columns"),
        ("c.tsv", b"x\n", {}, "cannot read a corpus from c.tsv: use a .txt, .jsonl, .csv, .parquet file"),
    ],
)
def test_unknown_columns_and_formats_are_refused(tmp_path, name, content, options, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(layerfuse.ArgumentValueError, match=message):
        Corpus(tmp_path / name, **options)


def test_a_parquet_text_column_must_hold_text(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(layerfuse.ArgumentValueError, match="column 'text' of c.parquet holds int64, not text"):
        Corpus(tmp_path / "c.parquet")


# Embeddings


@pytest.mark.parametrize("pooling", ["mean", "cls", "none"])
def test_bucketed_batches_give_each_text_its_own_fused_embedding_in_input_order(small, pooling):
    texts = sentences(40)
    info = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with Embedder.load(small, FusionConfig(layer=1), info, pooling=pooling, batch_size=8) as embedder:
        table = embedder(pa.table({"row": range(40), "text": texts}))
    expected = reference_embeddings(small, texts, layer=1, info=info, pooling=pooling)
    got = table.column("embedding").to_pylist()
    for row, want in zip(got, expected):
        numpy.testing.assert_allclose(numpy.array(row, numpy.float32), want, rtol=1e-4, atol=1e-5)
    assert table.column("row").to_pylist() == list(range(40))


def test_per_row_info_goes_to_its_own_row_whatever_the_batch(small):
    texts = sentences(20, seed=1)
    info = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    with Embedder.load(small, FusionConfig(layer=2), info, batch_size=6) as embedder:
        table = embedder(pa.table({"row": range(20), "text": texts}))
    got = numpy.array(table.column("embedding").to_pylist(), numpy.float32)
    numpy.testing.assert_allclose(got, reference_embeddings(small, texts, layer=2, info=info), rtol=1e-4, atol=1e-5)


def test_bucketing_cuts_padding_without_changing_the_embeddings(small):
    texts = sentences(48, seed=2)
    table = pa.table({"row": range(48), "text": texts})
    with Embedder.load(small, batch_size=8) as bucketed, Embedder.load(small, batch_size=8, bucket=False) as naive:
        numpy.testing.assert_allclose(
            numpy.array(bucketed(table).column("embedding").to_pylist()),
            numpy.array(naive(table).column("embedding").to_pylist()),
            rtol=1e-4,
            atol=1e-5,
        )


def test_truncation_is_flagged_and_matches_a_truncated_forward(small):
    texts = ["short", " ".join(["word"] * 40)]
    with Embedder.load(small, max_length=10) as embedder:
        table = embedder(pa.table({"row": [0, 1], "text": texts}))
    assert table.column("truncated").to_pylist() == [False, True]
    numpy.testing.assert_allclose(
        numpy.array(table.column("embedding").to_pylist(), numpy.float32),
        reference_embeddings(small, texts, max_length=10),
        rtol=1e-4,
        atol=1e-5,
    )


PIECES = [
    *WORDS,
    "café",
    "naïve",
    "e\u0301te\u0301",
    "Straße",
    "東京大学の研究",
    "中文文本没有空格",
    "🙂",
    "👩‍👩‍👧",
    "مرحبا",
    "Привет",
    "http://example.com/a_b?c=d&e=f",
    "3.14159",
    "don't",
    "(x)",
    "a" * 150,
    "unbelievablyextraordinarilylongcompoundword" * 3,
]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\u3000", "\n", " " * 300, "\u00a0"]


def many_shaped_lines(count: int, seed: int = 0) -> list[str]:
    """Lines of words, long words, unicode, punctuation and whitespace runs, from a few characters to a few thousand."""
    generator = numpy.random.default_rng(seed)
    lines = []
    for _ in range(count):
        pieces = generator.choice(len(PIECES), generator.integers(1, 400))
        separators = generator.choice(len(SEPARATORS), len(pieces))
        lines.append("".join(PIECES[p] + SEPARATORS[s] for p, s in zip(pieces, separators)))
    return [
        *lines,
        "a" * 5000,
        "東" * 5000,
        " " * 5000 + "words after many spaces",
        "\x00" * 5000 + " words after characters the tokenizer drops",
        "word " * 1000,
        "",
    ]


@pytest.mark.parametrize("max_length", [8, 30])
def test_a_capped_row_truncates_to_the_tokens_of_the_whole_row(small, max_length):
    tokenizer = AutoTokenizer.from_pretrained(small)
    for line in many_shaped_lines(300):
        short = capped(tokenizer, line, max_length)
        assert line.startswith(short) and len(short) <= max(len(line), CHARS_PER_TOKEN * (max_length + 2))
        whole, cut = (tokenizer(text, verbose=False)["input_ids"] for text in (line, short))
        assert (len(cut) > max_length) == (len(whole) > max_length), line
        truncated = (tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in (line, short))
        assert next(truncated) == next(truncated), line


class Recording:
    """A tokenizer that notes the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, *args, **kwargs):
        self.longest = max(self.longest, *(len(text) for text in ([texts] if isinstance(texts, str) else texts)))
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_line_of_megabytes_is_tokenised_only_as_far_as_its_first_tokens(small):
    huge = "the quick brown fox jumps over the lazy dog " * 100_000
    with Embedder.load(small) as embedder:
        embedder.tokenizer = Recording(embedder.tokenizer)
        table = embedder(pa.table({"row": [0, 1], "text": [huge, huge[:1000]]}))
        assert len(huge) > 4_000_000 and embedder.tokenizer.longest <= CHARS_PER_TOKEN * (64 + 2)
    assert table.column("truncated").to_pylist() == [True, True]
    assert table.column("text").to_pylist()[0] == huge
    first, cut = table.column("embedding").to_pylist()
    assert first == cut


# Whole runs


def write_corpus(path: Path, count: int = 30, seed: int = 0) -> list[str]:
    """A .jsonl corpus with ids and bad rows 3, 11 and 20 (those below `count`)."""
    texts = sentences(count, seed)
    lines = [json.dumps({"id": f"doc{i}", "text": text}).encode() for i, text in enumerate(texts)]
    bad = {3: b'{"id": "doc3", "text": "  "}', 11: b"{broken", 20: b'{"id": "doc20", "text": "\xff"}'}
    for row, line in bad.items():
        if row < count:
            lines[row] = line
    path.write_bytes(b"\n".join(lines) + b"\n")
    return texts


def test_a_run_writes_good_rows_in_order_and_lists_the_rejects(small, tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl")
    info = torch.randn(32, generator=torch.Generator().manual_seed(3))
    summary = embed_corpus(
        tmp_path / "c.jsonl",
        tmp_path / "out.parquet",
        model=small,
        fusion=FusionConfig(layer=1),
        info=info,
        id_column="id",
        include_text=True,
        batch_size=4,
        shard_size=8,
    )
    assert (summary.rows, summary.written, summary.rejected) == (
        30,
        27,
        {"empty text": 1, "not JSON": 1, "not UTF-8": 1},
    )
    table = pq.read_table(tmp_path / "out.parquet")
    good = [i for i in range(30) if i not in (3, 11, 20)]
    assert table.column_names == ["row", "id", "text", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert table.column("row").to_pylist() == good
    assert table.column("id").to_pylist() == [f"doc{i}" for i in good]
    assert table.column("text").to_pylist() == [texts[i] for i in good]
    expected = reference_embeddings(small, [texts[i] for i in good], layer=1, info=info)
    numpy.testing.assert_allclose(read_embeddings(tmp_path / "out.parquet"), expected, rtol=1e-4, atol=1e-5)
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(3, "empty text"), (11, "not JSON"), (20, "not UTF-8")]
    assert not (tmp_path / "out.parquet.partial").exists()


def test_npy_and_safetensors_hold_the_same_embeddings_as_parquet(small, tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    for name in ("out.parquet", "out.npy", "out.safetensors"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / name, model=small, shard_size=8, rejects=tmp_path / f"{name}.rej")
    parquet = read_embeddings(tmp_path / "out.parquet")
    assert numpy.array_equal(numpy.load(tmp_path / "out.npy"), parquet)
    tensors = load_file(tmp_path / "out.safetensors")
    assert numpy.array_equal(tensors["embedding"], parquet)
    assert tensors["row"].tolist() == pq.read_table(tmp_path / "out.parquet").column("row").to_pylist()


def test_per_token_states_are_written_per_row(small, tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl", count=12)
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, pooling="none")
    column = pq.read_table(tmp_path / "out.parquet").column("embedding").to_pylist()
    good = [i for i in range(12) if i not in (3, 11)]
    for states, want in zip(column, reference_embeddings(small, [texts[i] for i in good], pooling="none")):
        numpy.testing.assert_allclose(numpy.array(states, numpy.float32), want, rtol=1e-4, atol=1e-5)


def test_a_saved_fusion_runs_like_the_same_fusion_given_by_options(small, tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    info = torch.randn(32, generator=torch.Generator().manual_seed(4))
    model, _ = layerfuse.load_model(small)
    with layerfuse.fuse(model, info, layer=1, method="addition", alpha=0.5, positions="tokens") as fusion:
        fusion.save(tmp_path / "fusion")
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "a.parquet", model=small, saved=tmp_path / "fusion")
    options = FusionConfig(layer=1, arguments={"alpha": 0.5}, positions="tokens")
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "b.parquet", model=small, fusion=options, info=info)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_nan_embeddings_are_rejected_and_reported_not_written(small, tmp_path, capsys):
    write_corpus(tmp_path / "c.jsonl", count=10)
    info = torch.zeros(10, 32)
    info[[2, 7]] = 3e38  # finite info, but the next LayerNorm overflows on these rows
    torch.save(info, tmp_path / "info.pt")
    code = main(
        [
            "run",
            str(tmp_path / "c.jsonl"),
            "-o",
            str(tmp_path / "out.parquet"),
            "--model",
            str(small),
            "--layer",
            "1",
            "--info",
            str(tmp_path / "info.pt"),
            "--alpha",
            "10",
        ]
    )
    assert code == 1
    assert "warning: 2 rows gave NaN or infinite embeddings and were not written" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out.parquet").column("row").to_pylist() == [0, 1, 4, 5, 6, 8, 9]
    assert numpy.isfinite(read_embeddings(tmp_path / "out.parquet")).all()
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (2, "non-finite output"),
        (3, "empty text"),
        (7, "non-finite output"),
    ]


def test_an_all_bad_corpus_gives_an_empty_output(small, tmp_path):
    (tmp_path / "c.txt").write_text("\n  \n")
    summary = embed_corpus(tmp_path / "c.txt", tmp_path / "out.npy", model=small)
    assert (summary.rows, summary.written) == (2, 0)
    assert numpy.load(tmp_path / "out.npy").shape == (0, 32)


def test_the_cli_runs_a_csv_and_prints_the_summary(small, tmp_path, capsys):
    (tmp_path / "c.csv").write_text("key,body\n1,a first text\n2,\n3,a third text\n")
    code = main(
        [
            "run",
            str(tmp_path / "c.csv"),
            "--output",
            str(tmp_path / "out.parquet"),
            "--model",
            str(small),
            "--text-column",
            "body",
            "--id-column",
            "key",
            "--max-length",
            "4",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"wrote 2 of 3 rows to {tmp_path / 'out.parquet'}" in out
    assert f"rejected 1 row (1 empty text), listed in {tmp_path / 'out.rejects.jsonl'}" in out
    assert "truncated 2 rows to 4 tokens" in out
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == ["1", "3"]


def test_a_folder_a_glob_and_a_list_of_files_are_one_corpus_named_by_file_and_row(small, tmp_path, capsys):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    first, second = tmp_path / "corpus" / "b.jsonl", tmp_path / "corpus" / "sub" / "a.jsonl"
    texts = {first: write_corpus(first, 14, seed=1), second: write_corpus(second, 5, seed=2)}
    (tmp_path / "corpus" / "notes.md").write_text("not a corpus file\n")
    info = torch.randn(32, generator=torch.Generator().manual_seed(4))
    given = {
        "folder": [str(tmp_path / "corpus")],
        "glob": [str(tmp_path / "corpus" / "**" / "*.jsonl")],
        "list": [str(second), str(first)],
    }
    tables = {}
    for form, paths in given.items():
        output = tmp_path / f"{form}.parquet"
        options = ["--model", str(small), "--layer", "1", "--info", str(tmp_path / "info.pt"), "--id-column", "id"]
        torch.save(info, tmp_path / "info.pt")
        assert main(["run", *paths, "-o", str(output), *options, "--shard-size", "4", "--quiet"]) == 0
        assert "wrote 16 of 19 rows" in capsys.readouterr().out
        tables[form] = pq.read_table(output)
        rejects = [json.loads(line) for line in output.with_suffix(".rejects.jsonl").read_text().splitlines()]
        assert sorted((r["file"], r["row"], r["reason"]) for r in rejects) == [
            (str(first), 3, "empty text"),
            (str(first), 11, "not JSON"),
            (str(second), 3, "empty text"),
        ]
    good = {first: [i for i in range(14) if i not in (3, 11)], second: [0, 1, 2, 4]}
    named = [(str(path), row) for path in (first, second) for row in good[path]]
    table = tables["folder"]
    assert table.column_names == ["file", "row", "id", "embedding"]
    assert list(zip(table["file"].to_pylist(), table["row"].to_pylist())) == named
    assert tables["glob"].equals(table)
    listed = tables["list"]
    assert list(zip(listed["file"].to_pylist(), listed["row"].to_pylist())) == named[-4:] + named[:-4]
    expected = reference_embeddings(
        small, [texts[path][i] for path in (first, second) for i in good[path]], layer=1, info=info
    )
    numpy.testing.assert_allclose(read_embeddings(tmp_path / "folder.parquet"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layout, options, message",
    [
        ({"a.txt": "one\n", "b.csv": "text\ntwo\n"}, {}, "several formats (.csv, .txt): give files of one format"),
        ({"a.txt": "one\n", "b.txt": "two\n"}, {"info": (2, 32)}, "numbered by the rows of one file"),
        ({"notes.md": "no corpus\n"}, {}, "holds or matches no .txt, .jsonl, .csv, .parquet file"),
        ({"a.txt": "one\n"}, {"twice": True}, "is given twice: name each input file once"),
    ],
)
def test_inputs_of_several_files_are_refused_before_any_work(small, tmp_path, layout, options, message):
    (tmp_path / "in").mkdir()
    for name, text in layout.items():
        (tmp_path / "in" / name).write_text(text)
    input = [tmp_path / "in" / "a.txt"] * 2 if options.get("twice") else tmp_path / "in"
    info = torch.ones(options["info"]) if "info" in options else torch.ones(32)
    with pytest.raises(layerfuse.LayerfuseError, match=re.escape(message)):
        embed_corpus(input, tmp_path / "out.parquet", model=small, fusion=FusionConfig(layer=1), info=info)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in"]


# Bad arguments: refused before any work, nothing written


def bad_arguments(tmp_path, small):
    (tmp_path / "c.txt").write_text("a text\nanother\n")
    (tmp_path / "exists.parquet").write_bytes(b"")
    ShardStore(tmp_path / "busy.parquet.partial", {}).add(0, pa.table({"row": [0]}), [], rows=1, truncated=0)
    torch.save(torch.ones(31), tmp_path / "narrow.pt")
    torch.save(torch.ones(5, 32), tmp_path / "five_rows.pt")
    torch.save(torch.ones(2, 4, 32), tmp_path / "per_token.pt")
    c = str(tmp_path / "c.txt")
    return [
        (["missing.txt"], "no input file at missing.txt"),
        ([c, "-o", "exists.parquet"], "exists.parquet exists: pass --overwrite to replace it"),
        (
            [c, "-o", "busy.parquet"],
            r"busy.parquet.partial holds an interrupted run \(1 shard done\): carry on with --resume and the same",
        ),
        ([c, "-o", "x.csv"], "cannot write x.csv: name the output .parquet, .npy or .safetensors"),
        ([c, "-o", "x.npy", "--pooling", "none"], "per-token states .* write them to .parquet, not .npy"),
        ([c, "--layer", "1", "--info", "narrow.pt"], r"info must have shape .* with D = 32, got \(31,\)"),
        ([c, "--layer", "1", "--info", "five_rows.pt"], "the info has 5 rows but c.txt has 2: give one info row"),
        (
            [c, "--layer", "1", "--info", "per_token.pt"],
            r"per-token info \(2, 4, 32\) depends on how a batch is padded",
        ),
        ([c, "--layer", "1"], "method 'addition' combines info into the layer, and none was given"),
        ([c, "--layer", "9", "--method", "scale", "--alpha", "2"], "layer 9 is out of range for a 2-block model"),
        ([c, "--info", "narrow.pt"], r"fusion options \(info\) need --layer or --fusion"),
        ([c, "--fusion", "nowhere"], "nowhere is not a saved fusion"),
        ([c, "--max-length", "100"], "max length must be from 3 to this model's 64 tokens, got 100"),
        ([c, "--batch-size", "0"], "batch size must be a positive int, got 0"),
        ([c, "--shard-size", "0"], "shard size must be a positive int, got 0"),
        ([c, "--workers", "2"], "a Ray address and workers are for the ray engine"),
        ([c, "--engine", "ray", "-o", "x.npy"], "the ray engine writes a folder of Parquet files, not .npy"),
        ([c, "--device", "gpu"], r"unknown device 'gpu': use cpu, cuda or cuda:N"),
        ([c, "--device", "cuda:x"], r"unknown device 'cuda:x': use cpu, cuda or cuda:N"),
        ([c, "--backend", "onnx", "--device", "cuda"], "the onnx backend runs on the CPU, not on cuda: use --device"),
        ([c, "--engine", "ray", "--device", "cuda:1"], "the ray engine assigns each actor a GPU of its own, which"),
        *unreachable_devices(c),
    ]


def unreachable_devices(c: str) -> list[tuple[list[str], str]]:
    """Devices that this machine's torch does not reach: any CUDA one without CUDA, else one past the last."""
    if not torch.cuda.is_available():
        message = r"device 'cuda' needs CUDA, which this torch does not reach \(torch.cuda.is_available\(\) is false\)"
        return [([c, "--device", "cuda"], message), ([c, "--engine", "ray", "--device", "cuda"], message)]
    count = torch.cuda.device_count()
    return [([c, "--device", f"cuda:{count}"], f"there is no device 'cuda:{count}': this machine has {count} CUDA")]


def test_bad_arguments_fail_before_any_work_with_a_clear_message(small, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arguments, message in bad_arguments(tmp_path, small):
        before = sorted(os.listdir(tmp_path))
        if "-o" not in arguments:
            arguments = [*arguments, "-o", "out.parquet"]
        assert main(["run", *arguments, "--model", str(small)]) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("layerfuse run: error: ") and re.search(message, error), error
        assert len(error.splitlines()) == 1, error
        assert sorted(os.listdir(tmp_path)) == before, arguments


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, with the bytes of each file: what a refused run must leave as it found."""

    def content(path: Path) -> bytes | int | None:
        if path.is_dir():
            return None
        return path.read_bytes() if os.access(path, os.R_OK) else path.stat().st_size

    return {str(path.relative_to(folder)): content(path) for path in folder.rglob("*")}


def no_forward(*args, **kwargs):
    raise AssertionError("a forward ran before the paths were checked")


BAD_PATHS = {
    "rejects in a missing folder": (
        [],
        ["--rejects", "nope/r.jsonl"],
        "cannot write the rejects file to nope/r.jsonl: ",
    ),
    "output in a missing folder": (
        [],
        ["-o", "nope/out.npy"],
        "cannot write the output to nope/out.npy: .*nope does not",
    ),
    "output a folder": (
        ["out.npy/"],
        ["-o", "out.npy"],
        "cannot write the output to out.npy: it is a folder; name a file",
    ),
    "output a folder, overwrite": (
        ["out.npy/"],
        ["-o", "out.npy", "--overwrite"],
        "out.npy: it is a folder; name a file",
    ),
    "output's folder a file": (["file"], ["-o", "file/out.npy"], "to file/out.npy: .*file is a file, not a folder"),
    "rejects' folder a file": (
        ["file"],
        ["--rejects", "file/r.jsonl"],
        "to file/r.jsonl: .*file is a file, not a folder",
    ),
    "rejects a folder": (["r/"], ["--rejects", "r"], "cannot write the rejects file to r: it is a folder; name a file"),
    "partial folder a file": (
        ["out.npy.partial"],
        [],
        "write the partial folder to out.npy.partial: it is a file, not a",
    ),
    "partial folder a file, overwrite": (["out.npy.partial"], ["--overwrite"], "out.npy.partial: it is a file, not a"),
    "partial folder a file, resume": (["out.npy.partial"], ["--resume"], "out.npy.partial: it is a file, not a"),
    "missing info file": ([], ["--layer", "1", "--info", "nope.pt"], "no info file at nope.pt"),
    "missing model folder": ([], ["--model", "./nope"], "no model folder at nope: pass an existing folder"),
}


@pytest.mark.parametrize("case", BAD_PATHS)
def test_paths_the_run_could_not_write_fail_before_any_work(small, tmp_path, capsys, monkeypatch, case):
    made, arguments, message = BAD_PATHS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Embedder, "__call__", no_forward)
    (tmp_path / "c.txt").write_text("a text\nanother\n")
    for name in made:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text("mine")
    before = tree(tmp_path)
    if "-o" not in arguments:
        arguments = [*arguments, "-o", "out.npy"]
    assert main(["run", "c.txt", "--model", str(small), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("layerfuse run: error: ") and error.count("\n") == 1 and re.search(message, error), error
    assert tree(tmp_path) == before


DROP_PERMISSION_OVERRIDE = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
PERMISSION_CASES = """
import contextlib, io, json, os, sys
from layerfuse.cli import main
os.chdir(sys.argv[1])
results = {}
for case, argv in json.loads(sys.argv[2]).items():
    error = io.StringIO()
    with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
        results[case] = [main(argv), error.getvalue()]
print(json.dumps(results))
"""


def without_permission_override() -> list[str]:
    """The prefix that runs a command without root's power to read and write what permissions forbid."""
    if os.geteuid() != 0:
        return []
    probe = Path(tempfile.mkdtemp()) / "unreadable"
    probe.write_text("x")
    probe.chmod(0)
    if (
        shutil.which("setpriv") is None
        or subprocess.run([*DROP_PERMISSION_OVERRIDE, "cat", str(probe)]).returncode == 0
    ):
        pytest.skip("running as root, and setpriv cannot drop the permission override here")
    return DROP_PERMISSION_OVERRIDE


def test_unreadable_inputs_and_unwritable_folders_fail_before_any_work(small, tmp_path):
    prefix = without_permission_override()
    model, _ = layerfuse.load_model(small)
    with layerfuse.fuse(model, torch.ones(32), layer=1) as fusion:
        for name in ("fusion", "fusion-config", "fusion-tensors"):
            fusion.save(tmp_path / name)
    shutil.copytree(small, tmp_path / "model-weights")
    shutil.copytree(small, tmp_path / "model-folder")
    (tmp_path / "c.txt").write_text("a text\nanother\n")
    (tmp_path / "unreadable.txt").write_text("a text\n")
    torch.save(torch.ones(32), tmp_path / "info.pt")
    torch.save(torch.ones(32), tmp_path / "unreadable.pt")
    (tmp_path / "read-only").mkdir()
    run = ["run", "c.txt", "-o", "out.npy", "--model", str(small)]
    cases = {
        "read-only folder": (["run", "c.txt", "-o", "read-only/out.npy", "--model", str(small)], "read-only", 0o555),
        "read-only rejects folder": ([*run, "--rejects", "read-only/r.jsonl"], "read-only", 0o555),
        "unreadable input": (["run", "unreadable.txt", "-o", "out.npy", "--model", str(small)], "unreadable.txt", 0),
        "unreadable info": ([*run, "--layer", "1", "--info", "unreadable.pt"], "unreadable.pt", 0),
        "unreadable fusion config": ([*run, "--fusion", "fusion-config"], "fusion-config/fusion_config.json", 0),
        "... with --approach": ([*run, "--fusion", "fusion-config", "--approach", "layer"], "", 0),
        "unreadable fusion tensors": ([*run, "--fusion", "fusion-tensors"], "fusion-tensors/fusion.safetensors", 0),
        "unreadable model weights": ([*run[:-1], "model-weights"], "model-weights/model.safetensors", 0),
        "unreadable model folder": ([*run[:-1], "model-folder"], "model-folder", 0),
        "unreadable sweep infos": (["sweep", "--infos", "unreadable.pt", "--model", str(small)], "", 0),
    }
    messages = {
        "read-only folder": "cannot write the output to read-only/out.npy: .*read-only: Permission denied",
        "read-only rejects folder": "cannot write the rejects file to read-only/r.jsonl: .*Permission denied",
        "unreadable input": "cannot read the input unreadable.txt: Permission denied",
        "unreadable info": "cannot read info from unreadable.pt: .*Permission denied",
        "unreadable fusion config": "cannot read the saved fusion fusion-config: .*fusion_config.json: Permission denied",
        "... with --approach": "cannot read the saved fusion fusion-config: .*fusion_config.json: Permission denied",
        "unreadable fusion tensors": "cannot read the saved fusion fusion-tensors: .*fusion.safetensors: Permission",
        "unreadable model weights": "cannot read the model folder .*model-weights: .*model.safetensors: Permission denied",
        "unreadable model folder": "cannot read the model folder .*model-folder: Permission denied",
        "unreadable sweep infos": "cannot read info from unreadable.pt: .*Permission denied",
    }
    for _, name, mode in cases.values():
        if name:
            (tmp_path / name).chmod(mode)
    before = tree(tmp_path)
    argv = json.dumps({case: arguments for case, (arguments, _, _) in cases.items()})
    done = subprocess.run(
        [*prefix, sys.executable, "-c", PERMISSION_CASES, str(tmp_path), argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for case, (code, error) in json.loads(done.stdout).items():
        assert code == 2 and error.count("\n") == 1 and re.search(messages[case], error), (case, error)
    assert tree(tmp_path) == before


def test_a_saved_fusion_at_token_indices_is_refused(small, tmp_path):
    model, _ = layerfuse.load_model(small)
    with layerfuse.fuse(model, torch.ones(32), layer=1, positions=[0, -1]) as fusion:
        fusion.save(tmp_path / "fusion")
    (tmp_path / "c.txt").write_text("a text\n")
    with pytest.raises(layerfuse.ArgumentValueError, match="fuses at token indices or a mask, which depend on"):
        embed_corpus(tmp_path / "c.txt", tmp_path / "out.parquet", model=small, saved=tmp_path / "fusion")


# Kill and resume


def run_command(small, tmp_path, output, *extra):
    return [
        sys.executable,
        "-m",
        "layerfuse",
        "run",
        str(tmp_path / "c.jsonl"),
        "-o",
        str(tmp_path / output),
        "--model",
        str(small),
        "--id-column",
        "id",
        "--batch-size",
        "4",
        "--shard-size",
        "16",
        *extra,
    ]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run, on a busy machine too


def test_a_job_killed_mid_run_resumes_to_exactly_the_uninterrupted_output(small, tmp_path):
    write_corpus(tmp_path / "c.jsonl", count=1000, seed=5)
    partial = tmp_path / "killed.parquet.partial"
    job = subprocess.Popen(run_command(small, tmp_path, "killed.parquet"), stdout=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        while job.poll() is None and not (
            (partial / "manifest.json").is_file() and json.loads((partial / "manifest.json").read_text())["shards"]
        ):
            time.sleep(0.005)
        assert job.poll() is None, "the job finished before it could be killed"
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        job.kill()
    done = json.loads((partial / "manifest.json").read_text())["shards"]
    assert 1 <= len(done) < 63 and not (tmp_path / "killed.parquet").exists()

    resumed = subprocess.run(
        run_command(small, tmp_path, "killed.parquet", "--resume"), capture_output=True, text=True, env=ONE_THREAD
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after row {16 * len(done)}" in resumed.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_corpus(
            tmp_path / "c.jsonl", tmp_path / "whole.parquet", model=small, id_column="id", batch_size=4, shard_size=16
        )
    finally:
        torch.set_num_threads(threads)

    assert pq.read_table(tmp_path / "killed.parquet").num_rows == 997
    assert (tmp_path / "killed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert (tmp_path / "killed.rejects.jsonl").read_bytes() == (tmp_path / "whole.rejects.jsonl").read_bytes()
    assert not partial.exists()


KILL_AT = """
import os, signal, sys
from pathlib import Path
from layerfuse.cli import main
from layerfuse.run import local, shards

point, output = sys.argv[1], Path(sys.argv[2]).name
replace, write_manifest = os.replace, shards.ShardStore._write_manifest


def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_renaming(name):
    def renaming(source, target):
        if Path(target).name == name:
            kill()
        replace(source, target)
    return renaming


def kill_before_listing_the_second(self):
    if len(self.shards) == 2:
        kill()
    write_manifest(self)


if point == "the second shard's files written, not listed":
    shards.ShardStore._write_manifest = kill_before_listing_the_second
elif point == "between the rejects and OUT":
    local.write_output = kill
elif point == "OUT written but not renamed":
    os.replace = kill_before_renaming(output)
elif point == "after OUT, before the partial folder is removed":
    shards.ShardStore.remove = kill
sys.exit(main(sys.argv[3:]))
"""
KILL_POINTS = {  # each one a fresh process; a kill between shards is the test above. Then: (OUT, rejects) there?
    "the second shard's files written, not listed": (False, False),
    "between the rejects and OUT": (False, True),
    "OUT written but not renamed": (False, True),
    "after OUT, before the partial folder is removed": (True, True),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_any_step_resumes_to_the_same_bytes(small, tmp_path, point):
    write_corpus(tmp_path / "c.jsonl", count=40)
    out, rejects = tmp_path / "out.parquet", tmp_path / "out.rejects.jsonl"
    arguments = run_command(small, tmp_path, "out.parquet", "--shard-size", "12")[3:]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, point, str(out), *arguments], env=ONE_THREAD, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out.exists(), rejects.exists()) == KILL_POINTS[point]
    assert (tmp_path / "out.parquet.partial").is_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*arguments, "--resume", "--quiet"]) == 0
        assert main([*arguments, "-o", str(tmp_path / "whole.parquet"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert out.read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert rejects.read_bytes() == (tmp_path / "whole.rejects.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == [
        "c.jsonl",
        "out.parquet",
        "out.rejects.jsonl",
        "whole.parquet",
        "whole.rejects.jsonl",
    ]


def test_an_interrupted_run_says_how_to_go_on_in_one_line(small, tmp_path):
    write_corpus(tmp_path / "c.jsonl", count=1000, seed=5)
    partial = tmp_path / "out.parquet.partial"
    job = subprocess.Popen(
        run_command(small, tmp_path, "out.parquet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action, as a shell gives it: a library loaded earlier in the suite may have left
        # SIGINT ignored in this process, which a child inherits
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while job.poll() is None and not (
            (partial / "manifest.json").is_file() and json.loads((partial / "manifest.json").read_text())["shards"]
        ):
            time.sleep(0.005)
        assert job.poll() is None, "the job finished before it could be interrupted"
        job.send_signal(signal.SIGINT)
        _, error = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130
    assert error.splitlines()[-1] == (
        f"layerfuse run: interrupted; the finished shards are kept in {partial}: "
        "carry on with the same command and --resume"
    )
    assert "Traceback" not in error and json.loads((partial / "manifest.json").read_text())["shards"]


def test_resuming_with_other_settings_is_refused(small, tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    ShardStore(tmp_path / "out.parquet.partial", {"batch_size": 99})
    with pytest.raises(
        layerfuse.ArgumentValueError, match=r"cannot resume the run in .*: it was made with other settings"
    ):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, resume=True)


@pytest.fixture
def failing():
    """A method whose forward fails from its `failing.after`-th call on (the first: 0), as an overflow would."""

    @register_method("fails_test")
    class Fails(layerfuse.Method):
        formula = "h + v"
        after = 0
        calls = 0

        def forward(self, hidden, info):
            Fails.calls += 1
            if Fails.calls > Fails.after:
                raise RuntimeError("value cannot be converted to type float without overflow")
            return hidden + info

    try:
        yield Fails
    finally:
        del METHODS["fails_test"]


def test_a_forward_that_fails_before_a_shard_is_done_leaves_nothing_behind(small, tmp_path, failing):
    write_corpus(tmp_path / "c.jsonl")
    info = torch.ones(32)
    failing_run = FusionConfig(layer=1, method="fails_test")
    with pytest.raises(RuntimeError, match="overflow"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, fusion=failing_run, info=info)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
    summary = embed_corpus(
        tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, fusion=FusionConfig(layer=1), info=info
    )
    assert summary.written == 27


def test_a_forward_that_fails_mid_run_keeps_its_shards_and_says_how_to_go_on(small, tmp_path, capsys, failing):
    write_corpus(tmp_path / "c.jsonl")
    torch.save(torch.ones(32), tmp_path / "info.pt")
    failing.after = 2  # shard 0 (8 rows, batches of 4) is done, shard 1 fails
    run = ["run", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "out.parquet"), "--model", str(small), "--quiet"]
    run += ["--layer", "1", "--info", str(tmp_path / "info.pt"), "--shard-size", "8", "--batch-size", "4"]
    with pytest.raises(RuntimeError, match="overflow"):
        main([*run, "--method", "fails_test"])
    partial = tmp_path / "out.parquet.partial"
    assert len(json.loads((partial / "manifest.json").read_text())["shards"]) == 1
    capsys.readouterr()

    assert main([*run, "--method", "addition"]) == 2
    error = capsys.readouterr().err
    assert "out.parquet.partial holds an interrupted run (1 shard done): carry on with --resume and the same" in error
    assert "or start over with --overwrite" in error
    assert main([*run, "--method", "addition", "--resume"]) == 2
    assert "it was made with other settings (fusion): run it with the same ones, or start over (--overwrite" in (
        capsys.readouterr().err
    )
    assert main([*run, "--method", "addition", "--overwrite"]) == 0
    assert main([*run, "--method", "addition", "-o", str(tmp_path / "fresh.parquet")]) == 0
    assert pq.read_table(tmp_path / "out.parquet").equals(pq.read_table(tmp_path / "fresh.parquet"))
    assert not partial.exists()


def interrupt_after_shards(monkeypatch, input: Path, output: Path, model: Path, shards: int = 1) -> None:
    """Run a job that fails after `shards` shards, leaving a partial folder that holds them."""
    embed = Embedder.__call__
    done = []

    def once(self, table, progress=None):
        if len(done) == shards:
            raise RuntimeError("interrupted")
        done.append(True)
        return embed(self, table, progress)

    with monkeypatch.context() as patch:
        patch.setattr(Embedder, "__call__", once)
        with pytest.raises(RuntimeError, match="interrupted"):
            embed_corpus(input, output, model=model, shard_size=8)
    assert output.with_name(output.name + ".partial").is_dir()


def test_resuming_after_the_weights_changed_in_the_same_folder_is_refused(small, tmp_path, monkeypatch):
    model = tmp_path / "model"
    for name in os.listdir(small):
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_bytes((small / name).read_bytes())
    write_corpus(tmp_path / "c.jsonl")
    interrupt_after_shards(monkeypatch, tmp_path / "c.jsonl", tmp_path / "out.parquet", model)
    retrained, _ = layerfuse.load_model(model)
    with torch.no_grad():
        retrained.pooler.dense.bias.add_(1.0)
        retrained.encoder.layer[0].output.dense.bias.add_(0.5)
    retrained.save_pretrained(model)
    with pytest.raises(layerfuse.ArgumentValueError, match="it was made with other settings"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=model, shard_size=8, resume=True)


def test_resuming_after_the_input_changed_in_place_is_refused(small, tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus)
    interrupt_after_shards(monkeypatch, corpus, tmp_path / "out.parquet", small)
    stat = corpus.stat()
    corpus.write_bytes(corpus.read_bytes().replace(b"doc0", b"docX"))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(layerfuse.ArgumentValueError, match="it was made with other settings"):
        embed_corpus(corpus, tmp_path / "out.parquet", model=small, shard_size=8, resume=True)


def test_a_resumed_run_with_the_same_model_and_input_writes_the_uninterrupted_output(small, tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.jsonl")
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "whole.parquet", model=small, shard_size=8)
    interrupt_after_shards(monkeypatch, tmp_path / "c.jsonl", tmp_path / "out.parquet", small)
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8, resume=True)
    assert pq.read_table(tmp_path / "out.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))


def test_device_cpu_is_the_default_and_a_resume_on_another_device_is_refused(small, tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.jsonl")
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(4)), tmp_path / "info.pt")
    run = ["run", str(tmp_path / "c.jsonl"), "--model", str(small), "--layer", "1", "--info", str(tmp_path / "info.pt")]
    assert main([*run, "-o", str(tmp_path / "default.parquet"), "--quiet"]) == 0
    assert main([*run, "-o", str(tmp_path / "cpu.parquet"), "--quiet", "--device", "cpu"]) == 0
    assert pq.read_table(tmp_path / "cpu.parquet").equals(pq.read_table(tmp_path / "default.parquet"))

    interrupt_after_shards(monkeypatch, tmp_path / "c.jsonl", tmp_path / "out.parquet", small)
    partial = tmp_path / "out.parquet.partial"
    assert json.loads((partial / "manifest.json").read_text())["job"]["device"] == "cpu"

    def on_cuda(manifest):
        job = {**manifest["job"], "device": "cuda"}
        return {**manifest, "job": job, "sha256": manifest_digest(job, manifest["shards"])}

    edit_manifest(partial, on_cuda)  # as if the run had begun on a GPU
    with pytest.raises(layerfuse.ArgumentValueError, match=r"it was made with other settings \(device\)"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8, resume=True)


def flat_embeddings(path: Path) -> numpy.ndarray:
    """Every float of a Parquet output's embeddings, pooled or per token, in order."""
    column = pq.read_table(path).column("embedding").combine_chunks()
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return column.to_numpy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_the_local_engine_on_cuda_gives_the_cpu_embeddings(small, tmp_path, pooling):
    write_corpus(tmp_path / "c.jsonl")
    info = torch.randn(30, 32, generator=torch.Generator().manual_seed(5))  # one row per corpus row
    options = dict(model=small, fusion=FusionConfig(layer=1), info=info, pooling=pooling, batch_size=4)
    with Embedder.load(device="cuda", **options) as embedder:
        assert embedder.model.device.type == embedder.rows_info.device.type == "cuda"
        assert embedder.fusion.info.tensor.device.type == "cuda"
    cpu = embed_corpus(tmp_path / "c.jsonl", tmp_path / "cpu.parquet", shard_size=8, **options)
    cuda = embed_corpus(tmp_path / "c.jsonl", tmp_path / "cuda.parquet", shard_size=8, device="cuda", **options)
    assert (cuda.written, cuda.rejected) == (cpu.written, cpu.rejected) and cpu.written == 27
    on_cpu, on_cuda = pq.read_table(tmp_path / "cpu.parquet"), pq.read_table(tmp_path / "cuda.parquet")
    assert on_cuda.column("row").equals(on_cpu.column("row"))
    lengths = [len(value) for value in on_cpu.column("embedding").to_pylist()]
    assert [len(value) for value in on_cuda.column("embedding").to_pylist()] == lengths
    numpy.testing.assert_allclose(
        flat_embeddings(tmp_path / "cuda.parquet"), flat_embeddings(tmp_path / "cpu.parquet"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(output="c.parquet", overwrite=True), "the input and the output are both"),
        (dict(rejects="c.parquet", overwrite=True), "the input and the rejects file are both"),
        (dict(rejects="out.parquet"), "the output and the rejects file are both"),
        (dict(rejects="out.parquet.partial"), "the rejects file and the partial folder are both"),
    ],
)
def test_paths_that_would_overwrite_each_other_are_refused(small, tmp_path, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"text": sentences(10)}), tmp_path / "c.parquet")
    corpus = (tmp_path / "c.parquet").read_bytes()
    options = {"output": "out.parquet", **options}
    with pytest.raises(layerfuse.ArgumentValueError, match=message):
        embed_corpus("c.parquet", options.pop("output"), model=small, **options)
    assert sorted(os.listdir(tmp_path)) == ["c.parquet"] and (tmp_path / "c.parquet").read_bytes() == corpus


@pytest.mark.parametrize("fails", ["write_output", "remove"])
def test_a_run_killed_while_writing_its_results_resumes(small, tmp_path, monkeypatch, fails):
    write_corpus(tmp_path / "c.jsonl")
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "whole.parquet", model=small, shard_size=8)

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        if fails == "write_output":
            patch.setattr("layerfuse.run.local.write_output", killed)
        else:
            patch.setattr(ShardStore, "remove", killed)
        with pytest.raises(RuntimeError, match="killed"):
            embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8)
    assert (tmp_path / "out.rejects.jsonl").exists()
    embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8, resume=True)
    assert pq.read_table(tmp_path / "out.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert (tmp_path / "out.rejects.jsonl").read_text() == (tmp_path / "whole.rejects.jsonl").read_text()
    assert not (tmp_path / "out.parquet.partial").exists()


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


DAMAGE = {
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text("{oops"), "manifest.json is not valid JSON"),
    "manifest a list": (lambda f: (f / "manifest.json").write_text("[]"), "has format version None"),
    "no shards": (lambda f: edit_manifest(f, lambda m: {**m, "shards": None}), "lacks the job's settings or the list"),
    "rows a string": (
        lambda f: edit_manifest(f, lambda m: {**m, "shards": [{**m["shards"][0], "rows": "8"}, m["shards"][1]]}),
        "entry 0 of its manifest.json is not the entry of shard 0",
    ),
    "first shard dropped": (
        lambda f: edit_manifest(f, lambda m: {**m, "shards": m["shards"][1:]}),
        "entry 0 of its manifest.json is not the entry of shard 0",
    ),
    "shard doubled": (
        lambda f: edit_manifest(f, lambda m: {**m, "shards": [m["shards"][0]] * 2}),
        "entry 1 of its manifest.json is not the entry of shard 1",
    ),
    "shards swapped": (
        lambda f: edit_manifest(f, lambda m: {**m, "shards": m["shards"][::-1]}),
        "entry 0 of its manifest.json is not the entry of shard 0",
    ),
    "a name outside": (
        lambda f: edit_manifest(f, lambda m: {**m, "shards": [{**m["shards"][0], "name": "../x"}, m["shards"][1]]}),
        "entry 0 of its manifest.json is not the entry of shard 0",
    ),
    "shard truncated": (
        lambda f: (f / "shard-000001.parquet").write_bytes((f / "shard-000001.parquet").read_bytes()[:100]),
        "shard-000001.parquet is not the file the run wrote",
    ),
    "rejects edited": (
        lambda f: (f / "shard-000000.rejects.jsonl").write_text(""),
        "shard-000000.rejects.jsonl is not the file the run wrote",
    ),
    "shard deleted": (lambda f: (f / "shard-000000.parquet").unlink(), "shard-000000.parquet cannot be read"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_partial_folder_is_refused_on_resuming(small, tmp_path, monkeypatch, case):
    damage, message = DAMAGE[case]
    write_corpus(tmp_path / "c.jsonl")
    interrupt_after_shards(monkeypatch, tmp_path / "c.jsonl", tmp_path / "out.parquet", small, shards=2)
    damage(tmp_path / "out.parquet.partial")
    with pytest.raises(layerfuse.FileFormatError, match=f"cannot resume the run in .*: .*{message}"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8, resume=True)
    assert not (tmp_path / "out.parquet").exists()


def test_a_shard_changed_after_resuming_is_refused_before_the_output_is_written(small, tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.jsonl")
    interrupt_after_shards(monkeypatch, tmp_path / "c.jsonl", tmp_path / "out.parquet", small, shards=2)
    shard = tmp_path / "out.parquet.partial" / "shard-000000.parquet"
    embed = Embedder.__call__

    def tamper(self, table, progress=None):
        shard.write_bytes(shard.read_bytes()[:-8])
        return embed(self, table, progress)

    monkeypatch.setattr(Embedder, "__call__", tamper)
    with pytest.raises(layerfuse.FileFormatError, match="shard-000000.parquet is not the file the run wrote"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "out.parquet", model=small, shard_size=8, resume=True)
    assert not (tmp_path / "out.parquet").exists()
