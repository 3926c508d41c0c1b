"""Teacher cache: training from it equals online distillation; resumable shards; refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.engines.precompute import PrecomputeConfig, precompute
from nexus.engines.train import train
from nexus.teacher_cache import TeacherCache
from nexus.training.train_config import TrainConfig
from nexus.errors import NexusError


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    data = make_data(root / "data.jsonl", n=8)
    cache = precompute(PrecomputeConfig(teacher=str(base), data=str(data), output=str(root / "cache"), top_k=256,
                                        seq_len=32, batch_size=3, rows_per_shard=4, router_logits=True))
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "adapter"), "data": data, "cache": cache}


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cache_layout_and_contents(work):
    from nexus.data import load_token_data, load_tokenizer
    from nexus.loading import load_model

    meta = json.loads((work["cache"] / "metadata.json").read_text())
    assert meta["complete"] and meta["top_k"] == 256 and meta["router_layers"] == [0, 1, 2]
    cache = TeacherCache(work["cache"])
    model = load_model(work["base"])
    tok = load_tokenizer(work["base"], model.config)
    rows = load_token_data(work["data"], tok, 32).rows
    assert cache.rows == rows and meta["num_shards"] == -(-len(rows) // 4)
    batch = cache.collate([1, len(rows) - 1])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits[0, :-1], -1)
    got = torch.full_like(want, float("nan")).scatter(-1, batch["teacher_topk_indices"][0], batch["teacher_topk_logprobs"][0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_training_from_cache_equals_online_teacher(work, tmp_path):
    common = dict(model=str(work["base"]), adapter=str(work["adapter"]), seq_len=32, batch_size=2, max_steps=3,
                  log_every=1, save_every=0, lr=3e-3, router_kl_weight=0.5, temperature=1.0)
    online = train(TrainConfig(output=str(tmp_path / "online"), teacher=str(work["base"]), data=str(work["data"]), **common))
    train(TrainConfig(output=str(tmp_path / "self"), teacher="self", data=str(work["data"]), **common))
    cached = train(TrainConfig(output=str(tmp_path / "cached"), teacher=str(work["cache"]), **common))
    mo, ms, mc = _metrics(tmp_path / "online"), _metrics(tmp_path / "self"), _metrics(tmp_path / "cached")
    for a, b, c in zip(mo, ms, mc):
        for key in ("loss", "ce", "kd", "router_kl"):
            assert a[key] == pytest.approx(c[key], rel=1e-5, abs=1e-7), key
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["router_drift"] == pytest.approx(c["router_drift"], rel=1e-4, abs=1e-7)
    fa = load_file(str(online.final / ADAPTER_WEIGHTS_NAME))
    fc = load_file(str(cached.final / ADAPTER_WEIGHTS_NAME))
    for k in fa:
        torch.testing.assert_close(fa[k], fc[k], rtol=1e-4, atol=1e-6)


def test_precompute_resumes_missing_shards_only(work, tmp_path):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(work["cache"], out)
    shard = out / "shard-00001.parquet"
    reference = shard.read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet") if p != shard}
    shard.unlink()
    meta = json.loads((out / "metadata.json").read_text())
    meta["complete"] = False
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(NexusError, match="incomplete"):
        TeacherCache(out)
    args = dict(teacher=str(work["base"]), data=str(work["data"]), output=str(out), top_k=256, seq_len=32,
                batch_size=3, rows_per_shard=4, router_logits=True)
    precompute(PrecomputeConfig(**args))
    assert shard.read_bytes() == reference
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet") if p != shard} == stamps
    assert TeacherCache(out).meta["complete"]
    with pytest.raises(NexusError, match="top_k"):
        precompute(PrecomputeConfig(**{**args, "top_k": 8}))


def test_cache_refuses_other_tokenizer_data_or_temperature(work, tmp_path):
    import shutil

    from nexus.demo import train_tokenizer
    from helpers_train import demo_paragraphs

    other = tmp_path / "other"
    shutil.copytree(work["base"], other)
    for name in os.listdir(other):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.unlink(other / name)
    train_tokenizer(demo_paragraphs(200)[::-1][:50], 256).save_pretrained(other)
    common = dict(adapter=str(work["adapter"]), teacher=str(work["cache"]), max_steps=1, seq_len=32)
    with pytest.raises(NexusError, match="tokenizer"):
        train(TrainConfig(model=str(other), output=str(tmp_path / "r1"), **common))
    wrong = make_data(tmp_path / "wrong.jsonl", n=5)
    with pytest.raises(NexusError, match="does not match the rows"):
        train(TrainConfig(model=str(work["base"]), output=str(tmp_path / "r2"), data=str(wrong), **common))
    with pytest.raises(NexusError, match="temperature"):
        train(TrainConfig(model=str(work["base"]), output=str(tmp_path / "r3"), temperature=2.0, **common))


def test_cache_holds_log_probs_at_its_temperature(work, tmp_path):
    from nexus.loading import load_model

    out = precompute(PrecomputeConfig(teacher=str(work["base"]), data=str(work["data"]), output=str(tmp_path / "t2"),
                                      top_k=8, seq_len=32, batch_size=3, rows_per_shard=4, temperature=2.0))
    batch = TeacherCache(out).collate([0])
    with torch.no_grad():
        logits = load_model(work["base"])(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits[0, :-1] / 2.0, -1).topk(8)
    torch.testing.assert_close(batch["teacher_topk_logprobs"][0], want.values, rtol=0, atol=1e-5)
    assert torch.equal(batch["teacher_topk_indices"][0], want.indices)


def test_interrupted_precompute_keeps_whole_shards_and_the_same_command_finishes(work, tmp_path, monkeypatch):
    import signal

    import nexus.losses
    from nexus.errors import Interrupted
    from nexus.io import lock_path

    real, calls = nexus.losses.topk_logprobs, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of shard 1 (two batches of 3 rows per 4-row shard)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(nexus.losses, "topk_logprobs", signalled)
    args = dict(teacher=str(work["base"]), data=str(work["data"]), output=str(tmp_path / "cache"), top_k=256,
                seq_len=32, batch_size=3, rows_per_shard=4, router_logits=True)
    with pytest.raises(Interrupted, match="stopped by SIGINT: 1 of .* shards .*run the same command again") as info:
        precompute(PrecomputeConfig(**args))
    assert info.value.exit_code == 130
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard-*")) == ["shard-00000.parquet"]
    assert not lock_path(tmp_path / "cache").exists()
    monkeypatch.setattr(nexus.losses, "topk_logprobs", real)
    precompute(PrecomputeConfig(**args))
    done, reference = TeacherCache(tmp_path / "cache"), TeacherCache(work["cache"])
    assert done.rows == reference.rows
    idx = list(range(len(done.rows)))
    key = "teacher_topk_logprobs"
    torch.testing.assert_close(done.collate(idx)[key], reference.collate(idx)[key])
