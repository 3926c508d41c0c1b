"""A document over the per-document size limit is refused at once, naming the file, the line and
the limit, before it is tokenised (a 50 MB line took 10 GB of memory to encode)."""

from __future__ import annotations

import json

import pytest

import nexus.data_sources
from nexus.data import check_data, load_tokenizer
from nexus.errors import NexusError


def test_a_document_over_the_limit_is_refused(gpt_oss_mxfp4_dir, tmp_path, monkeypatch):
    from helpers_prepare import model_with_tokenizer

    tokenizer = load_tokenizer(model_with_tokenizer(gpt_oss_mxfp4_dir, tmp_path / "base"))
    monkeypatch.setattr(nexus.data_sources, "MAX_DOCUMENT_CHARS", 1000)
    data = tmp_path / "d.jsonl"
    rows = [{"text": "a short document about budgets."}, {"text": "x" * 1000}, {"text": "y" * 1001}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(NexusError) as err:
        check_data(str(data), tokenizer)
    message = str(err.value)
    assert f"{data} line 3" in message and "1,001 characters" in message and "limit of 1,000" in message
