"""collect: streaming router statistics against per-token recomputation from transformers' own router."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nexus.data import TokenData, collate
from nexus.engines.collect import CollectArgs, collect_router_stats
from nexus.errors import NexusError
from nexus.router_stats import LayerStats, RouterStats

from helpers_prepare import random_rows, router_reference as reference

FIELDS = ("count", "sum_p", "sum_pp", "topk_count", "topk_weight")


@pytest.fixture(scope="module")
def model(gpt_oss_mxfp4_dir):
    from nexus.loading import load_model

    return load_model(gpt_oss_mxfp4_dir)


@pytest.fixture(scope="module")
def data():
    return TokenData(random_rows(14, 8, 40, seed=0), pad_id=0)


def assert_stats_equal(a: RouterStats, b: RouterStats, rtol: float = 1e-12, atol: float = 1e-12):
    assert a.layout() == b.layout()
    for layer in a.layers:
        for name in FIELDS:
            x, y = getattr(a.layers[layer], name), getattr(b.layers[layer], name)
            assert torch.allclose(x, y, rtol=rtol, atol=atol), f"layer {layer} {name}: max diff {(x - y).abs().max().item():.3g}"


def test_sums_equal_per_token_recomputation(model, gpt_oss, data):
    stats = collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=4), progress=False)
    ref = reference(model, (b for _, b in data.batches(4)))
    assert stats.tokens == data.num_tokens
    assert sorted(stats.layers) == [0, 1, 2]
    for layer, r in ref.items():
        s = stats.layers[layer]
        p = r["p"]
        assert s.count.item() == p.shape[0]
        torch.testing.assert_close(s.sum_p, p.sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.sum_pp, p.T @ p, rtol=1e-12, atol=1e-12)
        # the router's own top-k (on logits) and its renormalised weights
        counts = torch.bincount(r["idx"].reshape(-1), minlength=8).double()
        torch.testing.assert_close(s.topk_count, counts, rtol=0, atol=0)
        weights = torch.zeros(8, dtype=torch.float64).index_add_(0, r["idx"].reshape(-1), r["w"].reshape(-1))
        torch.testing.assert_close(s.topk_weight, weights, rtol=1e-6, atol=1e-6)
        assert s.topk_count.sum().item() == 2 * p.shape[0]  # top-2 per token
        torch.testing.assert_close(s.covariance(), torch.cov(p.T), rtol=1e-9, atol=1e-12)


def test_resumed_run_equals_straight_run(model, gpt_oss, data, tmp_path):
    args = CollectArgs(batch_size=3, checkpoint_every=1)
    straight = collect_router_stats(model, gpt_oss, data, args, tmp_path / "straight", progress=False)
    first = collect_router_stats(model, gpt_oss, data, args, tmp_path / "resumed", max_batches=2, progress=False)
    assert not first.meta["complete"] and first.meta["next_batch"] == 2
    on_disk = RouterStats.load(tmp_path / "resumed")
    assert on_disk.meta["next_batch"] == 2 and on_disk.tokens == first.tokens < straight.tokens
    second = collect_router_stats(model, gpt_oss, data, args, tmp_path / "resumed", progress=False)
    assert second.meta["complete"] and second.tokens == straight.tokens == data.num_tokens
    assert_stats_equal(second, straight)
    assert_stats_equal(RouterStats.load(tmp_path / "resumed"), straight)
    # complete statistics are not recomputed
    again = collect_router_stats(model, gpt_oss, data, args, tmp_path / "resumed", progress=False)
    assert_stats_equal(again, straight)


def test_rank_halves_merge_to_one_run(model, gpt_oss, data, monkeypatch):
    """Two ranks of batch 2 (each its half of every global batch) merged == one process of batch 4."""
    import nexus.engines.collect as rs

    straight = collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=4), progress=False)
    halves = []
    for rank in (0, 1):
        # one process playing rank `rank` of 2: without a target every token of its share counts
        monkeypatch.setattr(rs, "_distributed", lambda r=rank: (r, 2, lambda t: t, lambda t: t.repeat(2), lambda: None))
        halves.append(collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=2), progress=False))
    assert 0 < halves[0].tokens and 0 < halves[1].tokens
    assert halves[0].tokens + halves[1].tokens == straight.tokens
    merged = halves[0].merge(halves[1])
    # the same tokens, forwarded in batches of other widths: float32 forward round-off only
    assert all(merged.layers[i].count.item() == straight.layers[i].count.item() for i in merged.layers)
    assert_stats_equal(merged, straight, rtol=1e-6, atol=1e-9)


def test_padding_is_never_counted(model, gpt_oss):
    """Each batch padded to twice its width gives the statistics of the unpadded batch."""
    rows = random_rows(6, 10, 20, seed=3)

    class Padded(TokenData):
        def batches(self, batch_size, seed=None, start=0, rank=0, world_size=1):
            for i, b in super().batches(batch_size, seed, start, rank, world_size):
                yield i, {
                    "input_ids": torch.cat([b["input_ids"], torch.full_like(b["input_ids"], self.pad_id)], 1),
                    "attention_mask": torch.cat([b["attention_mask"], torch.zeros_like(b["attention_mask"])], 1),
                }

    plain = collect_router_stats(model, gpt_oss, TokenData(rows, 0), CollectArgs(batch_size=3), progress=False)
    padded = collect_router_stats(model, gpt_oss, Padded(rows, 0), CollectArgs(batch_size=3), progress=False)
    assert padded.tokens == plain.tokens == sum(map(len, rows))
    assert_stats_equal(padded, plain, rtol=1e-5, atol=1e-9)


def test_target_tokens_exact_first_tokens_row_major(model, gpt_oss, data):
    target = 4 + 5 + 3  # lands inside a batch
    rows = random_rows(4, 4, 5, seed=7)
    rows[0], rows[1] = rows[0][:4], rows[1][:5] + [9]  # lengths 4, 6
    stats = collect_router_stats(model, gpt_oss, TokenData(rows, 0), CollectArgs(target_tokens=target, batch_size=3),
                                 progress=False)
    assert stats.tokens == target and stats.meta["complete"]
    batch = collate(rows[:3], 0)
    mask = batch["attention_mask"].reshape(-1).bool()
    batch["keep"] = mask & (mask.cumsum(0) <= target)  # the first `target` real tokens, row by row
    ref = reference(model, [batch])
    for layer, r in ref.items():
        assert r["p"].shape[0] == target
        torch.testing.assert_close(stats.layers[layer].sum_pp, r["p"].T @ r["p"], rtol=1e-12, atol=1e-12)


def test_data_exhausted_warns_with_token_count(model, gpt_oss, data, caplog):
    with caplog.at_level(logging.WARNING, logger="nexus.engines.collect"):
        stats = collect_router_stats(model, gpt_oss, data, CollectArgs(target_tokens=10**6, batch_size=8), progress=False)
    assert stats.meta["complete"] and stats.tokens == data.num_tokens
    assert f"after {data.num_tokens} tokens" in caplog.text


def test_other_arguments_refused_unless_overwrite(model, gpt_oss, data, tmp_path):
    collect_router_stats(model, gpt_oss, data, CollectArgs(target_tokens=50, batch_size=4), tmp_path, progress=False)
    with pytest.raises(NexusError, match="target_tokens: 50 -> 60.*--overwrite"):
        collect_router_stats(model, gpt_oss, data, CollectArgs(target_tokens=60, batch_size=4), tmp_path, progress=False)
    stats = collect_router_stats(model, gpt_oss, data, CollectArgs(target_tokens=60, batch_size=4), tmp_path,
                                 overwrite=True, progress=False)
    assert stats.tokens == 60 == RouterStats.load(tmp_path).tokens


def test_save_load_roundtrip_and_metadata(model, gpt_oss, data, tmp_path):
    import json

    from nexus.fingerprint import config_fingerprint

    stats = collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=8), tmp_path, progress=False,
                                 source={"data": "random ids"})
    meta = json.loads((tmp_path / "router_stats.json").read_text())
    assert meta["family"] == "gpt_oss" and meta["complete"] is True
    assert meta["base_fingerprint"] == config_fingerprint(model.config)
    assert meta["tokens"] == data.num_tokens and meta["source"]["data"] == "random ids"
    assert [x["layer"] for x in meta["layers"]] == [0, 1, 2] and meta["nexus_version"]
    loaded = RouterStats.load(tmp_path / "router_stats.safetensors")
    assert_stats_equal(loaded, stats, rtol=0, atol=0)
    assert all(getattr(s, n).dtype == torch.float64 for s in loaded.layers.values() for n in FIELDS)


def test_merge_is_addition_and_refuses_other_layouts():
    a = RouterStats({0: LayerStats.zeros(0, 4, 2, "softmax")})
    b = RouterStats({0: LayerStats.zeros(0, 4, 2, "softmax")})
    p, q = torch.softmax(torch.randn(5, 4), -1), torch.softmax(torch.randn(7, 4), -1)
    a.layers[0].update(p)
    b.layers[0].update(q)
    a.merge(b)
    both = torch.cat([p, q]).double()
    assert a.tokens == 12
    torch.testing.assert_close(a.layers[0].sum_pp, both.T @ both)
    with pytest.raises(NexusError, match="different MoE layers"):
        a.merge(RouterStats({0: LayerStats.zeros(0, 8, 2, "softmax")}))


def test_load_missing_stats_is_a_clear_error(tmp_path):
    with pytest.raises(NexusError, match="run `nexus collect` first"):
        RouterStats.load(tmp_path)


@pytest.mark.slow
def test_two_process_run_equals_one_process(gpt_oss_mxfp4_dir, gpt_oss_config, tmp_path):
    """A real 2-process (gloo) run through torchrun == one process with the same global batch."""
    from helpers_prepare import model_with_tokenizer, write_jsonl

    model_dir = model_with_tokenizer(gpt_oss_mxfp4_dir, tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", n=40)
    nexus = str(Path(sys.executable).with_name("nexus"))
    common = ["-q", "collect", "--model", str(model_dir), "--data", str(data), "--seq-len", "32",
              "--target-tokens", "301", "--checkpoint-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd in ([nexus, *common, "--batch-size", "4", "--output", str(tmp_path / "one")],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", nexus,
                 *common, "--batch-size", "2", "--output", str(tmp_path / "two")]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one, two = RouterStats.load(tmp_path / "one"), RouterStats.load(tmp_path / "two")
    assert two.meta["world_size"] == 2 and one.tokens == two.tokens == 301
    assert_stats_equal(one, two, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_benchmark_router_stats_quick(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_router_stats.py"), "--quick",
                          "--results-dir", str(tmp_path)], check=True, capture_output=True, text=True)
    assert "ratio" in out.stdout and list(tmp_path.glob("router_stats-*.json"))


def test_topk_counts_follow_the_family_selection():
    """With a selection bias (DeepSeek-V3 style) the counted experts are the family's choice,
    the weights the unbiased probabilities renormalised over them, the moments unchanged."""
    from nexus.types import RouterCapture

    logits = torch.randn(50, 6)
    cap = RouterCapture(module=None, extract=None, scoring="sigmoid", selection_bias=torch.tensor([0, 0, 0, 0, 0, 5.0]))
    biased, plain = LayerStats.zeros(0, 6, 2, "sigmoid"), LayerStats.zeros(0, 6, 2, "sigmoid")
    p = cap.probabilities(logits)
    biased.update(p, cap.select(logits, 2))
    plain.update(p)
    assert biased.topk_count[5].item() == 50  # the bias puts expert 5 in every token's top-2
    assert plain.topk_count[5].item() < 50
    torch.testing.assert_close(biased.sum_pp, plain.sum_pp, rtol=0, atol=0)
    idx = cap.select(logits, 2)
    w = p.double().gather(1, idx)
    w = w / w.sum(1, keepdim=True)
    ref = torch.zeros(6, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1))
    torch.testing.assert_close(biased.topk_weight, ref)


def _saved_stats(directory: Path) -> Path:
    stats = RouterStats({0: LayerStats.zeros(0, 4, 2, "softmax")}, {"family": "toy", "complete": True})
    stats.layers[0].update(torch.softmax(torch.randn(30, 4, generator=torch.Generator().manual_seed(0)), -1))
    stats.save(directory)
    return directory / "router_stats.safetensors"


def _rewrite(file: Path, tensors: dict, meta: str | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt", **({"nexus_meta": meta} if meta is not None else {})})


@pytest.mark.parametrize("how, match", [
    ("truncated", "not a readable safetensors file .*truncated or corrupt"),
    ("json", "not a readable safetensors file .*it is not router statistics"),
    ("no metadata", "was not written by `nexus collect`"),
    ("bad metadata", "holds damaged router statistics"),
    ("missing tensor", "holds damaged router statistics"),
    ("mis-shaped", r"layer 0: sum_pp not shaped for 4 experts"),
])
def test_damaged_or_foreign_stats_file_is_one_clear_error(tmp_path, how, match):
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = _saved_stats(tmp_path / "stats")
    tensors = load_file(file)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()["nexus_meta"]
    if how == "truncated":
        raw = file.read_bytes()
        file.write_bytes(raw[: len(raw) - 40])
    elif how == "json":
        file.write_text('{"layers": []}')
    elif how == "no metadata":
        _rewrite(file, tensors, None)
    elif how == "bad metadata":
        _rewrite(file, tensors, "{truncated")
    elif how == "missing tensor":
        del tensors["layers.0.sum_pp"]
        _rewrite(file, tensors, meta)
    else:
        tensors["layers.0.sum_pp"] = torch.zeros(3, 3, dtype=torch.float64)
        _rewrite(file, tensors, meta)
    for given in (tmp_path / "stats", file):
        with pytest.raises(NexusError, match=match) as info:
            RouterStats.load(given)
        assert str(file) in str(info.value) and "\n" not in str(info.value)


def test_select_on_files_that_are_not_statistics(gpt_oss_mxfp4_dir, tmp_path):
    from nexus.engines.select import SelectConfig, run_select

    not_stats = tmp_path / "selection.json"
    not_stats.write_text('{"layers": []}')
    with pytest.raises(NexusError, match="it is not router statistics"):
        run_select(SelectConfig(stats=not_stats, output=tmp_path / "out", plots=False))
    with pytest.raises(NexusError, match="not written by `nexus collect`"):
        run_select(SelectConfig(stats=gpt_oss_mxfp4_dir / "model.safetensors", output=tmp_path / "out", plots=False))
    with pytest.raises(NexusError, match="run `nexus collect` first"):
        run_select(SelectConfig(stats=gpt_oss_mxfp4_dir, output=tmp_path / "out", plots=False))
    assert not (tmp_path / "out").exists()


def test_stats_record_the_base_weights_fingerprint(model, gpt_oss, data, gpt_oss_mxfp4_dir):
    from nexus.engines.select import select_experts
    from nexus.fingerprint import weights_fingerprint

    stats = collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=7), progress=False)
    fp, tensors = stats.meta["base_weights_fingerprint"], stats.meta["base_weights_tensors"]
    assert len(fp) == 16 and (fp, tensors) == weights_fingerprint(gpt_oss_mxfp4_dir, tensors)
    doc = select_experts(stats, top_k=2)
    assert (doc["base_weights_fingerprint"], doc["base_weights_tensors"]) == (fp, tensors)
