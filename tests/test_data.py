"""nexus.data: one-line errors naming the file and line, tokenizer refusal, the held-out split,
content fingerprints, reading only what a token budget needs, and the token cache."""

from __future__ import annotations

import json
import os

import pytest

from nexus.data import load_token_data, load_tokenizer, token_cache, tokenize_documents
from nexus.data_sources import data_fingerprint, is_heldout, split_specs
from nexus.errors import NexusError
from helpers_train import demo_paragraphs, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(demo_paragraphs(100), 256)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl line 2: invalid JSON"),
    ("latin.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "latin.jsonl line 2: bytes that are not UTF-8"),
    ("latin.txt", b"fine\ncaf\xe9 au lait\n", "latin.txt line 2: bytes that are not UTF-8"),
    ("int.jsonl", b'{"text": "fine"}\n\n{"text": 123}\n', "int.jsonl line 3: 'text' is not a string but int 123"),
    ("allint.jsonl", b'{"text": 1}\n{"text": 2}\n', "allint.jsonl line 1: 'text' is not a string"),
    ("list.jsonl", b'{"text": "fine"}\n[1, 2]\n', "list.jsonl line 2: a JSON list, not an object"),
    ("col.jsonl", b'{"content": "fine"}\n', "no column 'text' (columns: content); pass --text-column"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, tok, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NexusError) as err:
        load_token_data(path, tok, 32)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.parametrize("spec", ["missing.jsonl", "./missing", "~/nexus-missing-dir/x", "a/b/c", "missing.txt@train"])
def test_missing_local_paths_fail_without_the_hub(tmp_path, tok, monkeypatch, spec):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be asked about a local path")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NexusError, match="does not exist; check the path"):
        load_token_data(spec, tok, 32)


def test_tilde_is_expanded(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _jsonl(tmp_path / "d.jsonl", demo_paragraphs(5))
    assert len(load_token_data("~/d.jsonl", tok, 32).rows) > 0


def test_hub_name_is_looked_up_offline(tok):
    with pytest.raises(NexusError, match="nor a dataset in the local datasets cache"):
        load_token_data("nobody-nexus/no-such-dataset", tok, 32)


def test_model_without_tokenizer_files_is_refused(tmp_path):
    from helpers_conformance import build_checkpoint

    from nexus.family import resolve_family

    model = build_checkpoint(resolve_family(name="qwen3_moe"), tmp_path / "q3")
    assert not list(model.glob("tokenizer*"))
    with pytest.raises(NexusError, match=f"tokenizer in {model} has an empty vocabulary"):
        load_tokenizer(model)


def test_tokenizer_that_maps_the_data_to_unknown_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "zebra": 2, "yak": 3}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # a vocabulary, but not one for this data
    data = _jsonl(tmp_path / "d.jsonl", demo_paragraphs(5))
    with pytest.raises(NexusError, match=rf"tokenizer from {tmp_path} encodes .*d.jsonl into only 0 distinct"):
        load_token_data(data, tok, 32)


def test_heldout_split_is_a_disjoint_deterministic_partition_by_document(tmp_path, tok):
    texts = demo_paragraphs(60)
    texts = texts + texts[:10]  # duplicated documents must land on the same side
    data = _jsonl(tmp_path / "d.jsonl", texts)
    train_spec, eval_spec = split_specs(str(data))
    train_docs = tokenize_documents(train_spec, tok)
    eval_docs = tokenize_documents(eval_spec, tok)
    every = tokenize_documents(data, tok)
    assert eval_docs and train_docs
    assert len(train_docs) + len(eval_docs) == len(every)
    assert not {tuple(d) for d in train_docs} & {tuple(d) for d in eval_docs}
    expected = [tuple(d) for d, t in zip(every, texts) if is_heldout(t)]
    assert [tuple(d) for d in eval_docs] == expected
    assert 0.02 < len(eval_docs) / len(every) < 0.3


def test_fingerprint_follows_content_not_mtime(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", demo_paragraphs(5))
    first = data_fingerprint(data)
    os.utime(data, (1, 1))
    assert data_fingerprint(data) == first  # touched, not changed
    stat = data.stat()
    original = data.read_text()
    data.write_text(original.replace("the", "THE", 1))  # same size, edited in place
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_fingerprint(data) != first
    data.write_text(original + json.dumps({"text": "one more row"}) + "\n")
    assert data_fingerprint(data) not in (first,)
    assert data_fingerprint(f"{data}@train") == data_fingerprint(data)


def test_a_token_budget_stops_reading(tmp_path, tok):
    # A bad row far down the file: a budgeted read never gets there, a full read does.
    lines = [json.dumps({"text": t}) for t in demo_paragraphs(200)] + ['{"text": 5}']
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    small = load_token_data(data, tok, 32, max_tokens=300)
    assert 300 <= small.num_tokens < 3000
    with pytest.raises(NexusError, match="line 201"):
        load_token_data(data, tok, 32)


def test_token_cache_tokenises_once_and_follows_the_data(tmp_path, tok, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", demo_paragraphs(30))
    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with token_cache(tmp_path / "cache"):
        first = load_token_data(data, tok, 32)
        n = len(calls)
        assert n > 0 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
        again = load_token_data(f"{data}@heldout", tok, 32)  # the other side of the split: from the cache
        assert len(calls) == n and again.rows
        assert load_token_data(data, tok, 32).rows == first.rows and len(calls) == n
        _jsonl(data, demo_paragraphs(31))
        assert len(load_token_data(data, tok, 32).rows) >= len(first.rows) and len(calls) > n
    assert load_token_data(data, tok, 32).rows and len(list((tmp_path / "cache").glob("*"))) == 2
