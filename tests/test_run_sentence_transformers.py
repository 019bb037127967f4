"""`layerfuse run` on a sentence-transformers folder gives `SentenceTransformer(folder).encode`'s embeddings:
its pooling, max_seq_length and Normalize read from the folder, with and without a fusion; a folder it
cannot reproduce is refused. The reference is sentence-transformers itself, and a hook written here."""

from __future__ import annotations

import json
import re

import numpy
import pyarrow.parquet as pq
import pytest
import torch

import layerfuse
from layerfuse.cli import main
from layerfuse.models import embedded_model_path
from layerfuse.run import embed_corpus
from test_run import small  # noqa: F401  (a fixture)

sentence_transformers = pytest.importorskip("sentence_transformers")
try:
    from sentence_transformers.sentence_transformer import modules
except ImportError:  # sentence-transformers before 6
    from sentence_transformers import models as modules

WORDS = "the a model layer fusion text corpus quick brown fox jumps over lazy dog vector batch token".split()
POOLINGS = ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]


def texts_in_encode_order(lengths: list[int], seed: int = 0) -> list[str]:
    """Texts of `lengths` words, longest first with distinct lengths: `encode` keeps this order when it sorts."""
    generator = numpy.random.default_rng(seed)
    texts = [" ".join(generator.choice(WORDS, length)) for length in lengths]
    assert len({len(text) for text in texts}) == len(texts)
    return sorted(texts, key=len, reverse=True)


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def read_embeddings(path) -> torch.Tensor:
    column = pq.read_table(path).column("embedding").combine_chunks()
    return torch.from_numpy(column.flatten().to_numpy().reshape(len(column), -1).copy())


def run(tmp_path, texts, **options):
    """`embed_corpus` of `texts` (batches as `encode` makes them, unless `bucket`), its embeddings and summary."""
    options = {"bucket": False, "batch_size": 4} | options
    output = tmp_path / "run.parquet"
    summary = embed_corpus(write_corpus(tmp_path / "corpus.jsonl", texts), output, overwrite=True, **options)
    return read_embeddings(output), summary


@pytest.fixture(scope="module")
def embedded():
    return sentence_transformers.SentenceTransformer(embedded_model_path(), device="cpu")


@pytest.fixture(scope="module")
def transformer_folder(small):  # noqa: F811
    """A 2-block BERT (hidden 32, 64 positions) with the embedded model's tokenizer, saved (tests/test_run.py's)."""
    return small


def st_folder(transformer_folder, folder, pooling, *, normalize=False, max_seq_length=12):
    """A sentence-transformers folder saved by sentence-transformers itself, and the model it loads back as."""
    parts = [modules.Transformer(str(transformer_folder), max_seq_length=max_seq_length), modules.Pooling(32, pooling)]
    parts += [modules.Normalize()] if normalize else []
    sentence_transformers.SentenceTransformer(modules=parts, device="cpu").save(str(folder))
    return folder, sentence_transformers.SentenceTransformer(str(folder), device="cpu")


# The embedded model: mean pooling, max_seq_length 256, Normalize


def test_the_embedded_folder_gives_what_encode_gives_truncated_at_its_max_seq_length(embedded, tmp_path):
    texts = texts_in_encode_order([300, 270, 40, 25, 12, 7, 3, 1])
    expected = embedded.encode(texts, batch_size=4, convert_to_tensor=True)
    got, summary = run(tmp_path, texts)
    assert torch.equal(got, expected)
    assert (summary.pooling, summary.normalize, summary.max_length, summary.truncated) == ("mean", True, 256, 2)
    bucketed, _ = run(tmp_path, texts[::-1], bucket=True)
    torch.testing.assert_close(bucketed, expected.flip(0), rtol=0, atol=1e-6)


def test_a_fused_run_of_the_embedded_folder_gives_what_encode_gives_with_the_same_fusion(embedded, tmp_path):
    texts = texts_in_encode_order([290, 33, 20, 14, 9, 4])
    info = torch.randn(len(texts), 384, generator=torch.Generator().manual_seed(3))
    config = layerfuse.FusionConfig(layer=3, positions="tokens")
    got, _ = run(tmp_path, texts, fusion=config, info=info)
    expected = []
    for start in range(0, len(texts), 4):
        batch, rows = texts[start : start + 4], info[start : start + 4]
        real = embedded.tokenize(batch)["attention_mask"].bool()

        def add(module, args, output, rows=rows, real=real):
            state = (output[0] if isinstance(output, tuple) else output).clone()
            state[real] += rows[:, None].expand_as(state)[real]
            return (state, *output[1:]) if isinstance(output, tuple) else state

        handle = embedded[0].auto_model.encoder.layer[2].register_forward_hook(add)
        try:
            expected.append(embedded.encode(batch, batch_size=4, convert_to_tensor=True))
        finally:
            handle.remove()
    expected = torch.cat(expected)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, embedded.encode(texts, batch_size=4, convert_to_tensor=True), atol=1e-3)


# Folders written by sentence-transformers: every pooling, with and without Normalize


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_folder_of_any_pooling_gives_what_encode_gives(transformer_folder, tmp_path, pooling, normalize):
    folder, st = st_folder(transformer_folder, tmp_path / "st", pooling, normalize=normalize)
    texts = texts_in_encode_order([30, 20, 11, 8, 5, 3, 2])
    got, summary = run(tmp_path, texts, model=folder)
    assert torch.equal(got, st.encode(texts, batch_size=4, convert_to_tensor=True))
    assert (summary.pooling, summary.normalize, summary.max_length) == (pooling, normalize, 12)
    assert summary.truncated > 0


def test_explicit_options_override_the_folders_own(transformer_folder, tmp_path):
    folder, _ = st_folder(transformer_folder, tmp_path / "st", "cls")
    _, other = st_folder(transformer_folder, tmp_path / "other", "max", normalize=True, max_seq_length=8)
    texts = texts_in_encode_order([30, 20, 11, 8, 5])
    got, summary = run(tmp_path, texts, model=folder, pooling="max", normalize=True, max_length=8)
    assert torch.equal(got, other.encode(texts, batch_size=4, convert_to_tensor=True))
    assert (summary.pooling, summary.normalize, summary.max_length) == ("max", True, 8)


def test_normalize_l2_normalises_a_plain_models_pooled_embeddings(transformer_folder, tmp_path):
    texts = texts_in_encode_order([20, 8, 3])
    plain, summary = run(tmp_path, texts, model=transformer_folder, pooling="cls")
    normalized, _ = run(tmp_path, texts, model=transformer_folder, pooling="cls", normalize=True)
    assert not summary.normalize
    torch.testing.assert_close(normalized, plain / plain.norm(dim=1, keepdim=True), rtol=0, atol=1e-7)
    assert not torch.allclose(plain.norm(dim=1), torch.ones(3))


def test_the_cli_runs_a_folder_as_encode_and_reports_how(transformer_folder, tmp_path, capsys):
    folder, st = st_folder(transformer_folder, tmp_path / "st", "cls")
    texts = texts_in_encode_order([30, 20, 11, 4])
    corpus = write_corpus(tmp_path / "c.jsonl", texts)
    output = tmp_path / "out.parquet"
    assert main(["run", str(corpus), "-o", str(output), "--model", str(folder), "--batch-size", "4", "--quiet"]) == 0
    assert "embeddings: cls pooling, at most 12 tokens" in capsys.readouterr().out
    torch.testing.assert_close(read_embeddings(output), st.encode(texts, convert_to_tensor=True), rtol=0, atol=1e-6)
    argv = ["run", str(corpus), "-o", str(output), "--model", str(folder), "--overwrite", "--quiet", "--normalize"]
    assert main(argv) == 0
    assert "embeddings: cls pooling, L2-normalised, at most 12 tokens" in capsys.readouterr().out


# Folders that cannot be reproduced: refused, saying why, before any work


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def add_dense(folder):
    listed = json.loads((folder / "modules.json").read_text())
    listed.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(listed))


UNREPRODUCIBLE = {
    "a Dense module": (add_dense, r"holds the modules .*Transformer, .*Pooling, .*Dense: layerfuse run reproduces"),
    "a default prompt": (
        lambda folder: edit_json(folder / "config_sentence_transformers.json", default_prompt_name="query"),
        r'sets default_prompt_name = "query", which layerfuse run does not reproduce',
    ),
    "lower-casing": (
        lambda folder: edit_json(folder / "sentence_bert_config.json", do_lower_case=True),
        "sets do_lower_case = true, which layerfuse run does not reproduce",
    ),
    "two pooling modes": (
        lambda folder: edit_json(folder / "1_Pooling" / "config.json", pooling_mode=["cls", "mean"]),
        r'sets pooling_mode = \["cls", "mean"\], which layerfuse run does not reproduce',
    ),
}


@pytest.mark.parametrize("case", UNREPRODUCIBLE)
def test_a_folder_that_cannot_be_reproduced_is_refused_saying_why(transformer_folder, tmp_path, capsys, case):
    folder, _ = st_folder(transformer_folder, tmp_path / "st", "cls")
    change, message = UNREPRODUCIBLE[case]
    change(folder)
    corpus = write_corpus(tmp_path / "c.jsonl", ["a text"])
    with pytest.raises(layerfuse.ArchitectureError, match=message):
        embed_corpus(corpus, tmp_path / "out.parquet", model=folder)
    assert main(["run", str(corpus), "-o", str(tmp_path / "out.parquet"), "--model", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("layerfuse run: error: ") and re.search(message, error), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.jsonl", "st"]


def test_a_folder_of_an_older_sentence_transformers_reads_as_its_newer_form(transformer_folder, tmp_path):
    folder, st = st_folder(transformer_folder, tmp_path / "st", "weightedmean")
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_weightedmean_tokens": True,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (folder / "0_Transformer").mkdir()
    for path in list(folder.iterdir()):
        if path.is_file() and path.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
            path.rename(folder / "0_Transformer" / path.name)
    listed = json.loads((folder / "modules.json").read_text())
    listed[0] |= {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}
    listed[1] |= {"type": "sentence_transformers.models.Pooling"}
    (folder / "modules.json").write_text(json.dumps(listed))
    texts = texts_in_encode_order([30, 9, 4])
    got, summary = run(tmp_path, texts, model=folder)
    assert summary.pooling == "weightedmean"
    assert torch.equal(got, st.encode(texts, batch_size=4, convert_to_tensor=True))


def test_per_token_states_of_a_normalizing_folder_are_its_token_embeddings(transformer_folder, tmp_path):
    folder, st = st_folder(transformer_folder, tmp_path / "st", "mean", normalize=True)
    texts = texts_in_encode_order([30, 9, 4])
    output = tmp_path / "tokens.parquet"
    summary = embed_corpus(
        write_corpus(tmp_path / "c.jsonl", texts), output, model=folder, pooling="none", bucket=False
    )
    assert (summary.pooling, summary.normalize) == ("none", False)
    expected = st.encode(texts, batch_size=32, output_value="token_embeddings")
    for states, want in zip(pq.read_table(output).column("embedding").to_pylist(), expected):
        assert torch.equal(torch.tensor(states), want)
    with pytest.raises(layerfuse.ArgumentValueError, match="pooling 'none' makes none"):
        embed_corpus(tmp_path / "c.jsonl", tmp_path / "x.parquet", model=folder, pooling="none", normalize=True)
