"""A resume on data whose content changed at the same path (``--data``, ``--kd-data``) is refused,
naming the data and both content fingerprints, unless ``--allow-data-change`` (a warning); the run
records the fingerprints ``nexus run`` stamps its train stage with."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from helpers_train import make_adapter, make_base, make_data
from nexus.constants import RUN_CONFIG_NAME
from nexus.data_sources import data_fingerprint
from nexus.engines.train import train
from nexus.errors import NexusError
from nexus.training.train_config import TrainConfig


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter"), "data": make_data(root / "data.jsonl", 8),
            "general": make_data(root / "general.jsonl", 12)}


def _config(work, tmp_path, **kw) -> TrainConfig:
    data, kd_data = tmp_path / "data.jsonl", tmp_path / "general.jsonl"
    for src, dst in ((work["data"], data), (work["general"], kd_data)):
        if not dst.exists():
            shutil.copy(src, dst)
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(data), output=str(tmp_path / "run"),
                seq_len=16, batch_size=1, max_steps=4, save_every=1, log_every=1, seed=1)
    args.update(kw)
    if args.pop("with_kd_data", False):
        args["kd_data"] = str(kd_data)
    return TrainConfig(**args)


def _edit_in_place(path) -> None:
    """Change one document, keeping the path (and the number of rows)."""
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"text": "A different first document, edited in place. " * 4})
    path.write_text("\n".join(lines) + "\n")


def _recorded(config) -> dict:
    return json.loads((Path(config.output) / RUN_CONFIG_NAME).read_text())


@pytest.mark.parametrize("stream", ["data", "kd_data"])
def test_resume_on_changed_content_is_refused_naming_old_and_new(work, tmp_path, stream):
    kd = stream == "kd_data"
    first = _config(work, tmp_path, stop_after=2, with_kd_data=kd)
    assert train(first).step == 2
    path = getattr(first, stream)
    old = data_fingerprint(path)
    key = f"{stream}_fingerprint"
    assert _recorded(first)[key] == old  # the value nexus run stamps its train stage with
    _edit_in_place(Path(path))
    new = data_fingerprint(path)
    assert new != old
    flag = "--" + stream.replace("_", "-")
    with pytest.raises(NexusError, match=rf"cannot resume .*content of the data changed.*{flag} {path} \(fingerprint "
                                         rf"{old} then, {new} now\).*--allow-data-change") as info:
        train(_config(work, tmp_path, resume=True, with_kd_data=kd))
    assert "\n" not in str(info.value)
    assert _recorded(first)[key] == old  # nothing was rewritten


def test_allow_data_change_resumes_with_a_warning_and_records_the_new_content(work, tmp_path, caplog):
    first = _config(work, tmp_path, stop_after=2)
    train(first)
    old = data_fingerprint(first.data)
    _edit_in_place(tmp_path / "data.jsonl")
    new = data_fingerprint(first.data)
    with caplog.at_level(logging.WARNING, logger="nexus"):
        result = train(_config(work, tmp_path, resume=True, allow_data_change=True))
    assert result.step == 4 and result.final is not None
    warned = [r.getMessage() for r in caplog.records if "--allow-data-change" in r.getMessage()]
    assert len(warned) == 1 and f"fingerprint {old} then, {new} now" in warned[0]
    assert _recorded(first)["data_fingerprint"] == new


def test_unchanged_content_resumes_even_when_the_file_was_rewritten(work, tmp_path):
    first = _config(work, tmp_path, stop_after=2, with_kd_data=True)
    train(first)
    data = tmp_path / "data.jsonl"
    data.write_bytes(data.read_bytes())  # same content, new modification time
    assert train(_config(work, tmp_path, resume=True, with_kd_data=True)).step == 4


def test_a_run_recorded_without_fingerprints_resumes_with_a_warning(work, tmp_path, caplog):
    first = _config(work, tmp_path, stop_after=2)
    train(first)
    record = _recorded(first)
    del record["data_fingerprint"]
    (Path(first.output) / RUN_CONFIG_NAME).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="nexus"):
        assert train(_config(work, tmp_path, resume=True)).step == 4
    assert any("records no content fingerprint of --data" in r.getMessage() for r in caplog.records)


def test_allow_data_change_without_resume_is_refused():
    with pytest.raises(NexusError, match="--allow-data-change applies to --resume"):
        TrainConfig(model="m", adapter="a", output="o", allow_data_change=True)
