"""``evaluate``'s KL(base || adapted) against a float64 reference from the definition: the
direction matters (KL is not symmetric), so the reference also checks the reverse differs."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import load_file, save_file

from helpers_train import make_adapter, make_base, make_data


def test_evaluate_kl_is_base_to_adapted_per_predicted_token(gpt_oss_mxfp4_dir, tmp_path):
    from nexus.adapter import load_adapter
    from nexus.data import load_token_data, load_tokenizer
    from nexus.engines.evaluate import EvaluateConfig, evaluate
    from nexus.loading import load_model

    base = make_base(gpt_oss_mxfp4_dir, tmp_path / "base")
    # A random tiny model predicts almost uniformly, where KL is symmetric to second order: sharpen
    # its predictions (a larger output head) so that the direction of the KL shows.
    for shard in base.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors["lm_head.weight"] * 10
            save_file(tensors, str(shard), metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", scale=0.2)
    data = make_data(tmp_path / "data.jsonl", n=4)
    result = evaluate(EvaluateConfig(model=base, data=data, adapter=adapter, seq_len=32, batch_size=4))

    rows = [r for r in load_token_data(data, load_tokenizer(base), 32).rows if len(r) >= 2]
    plain, adapted = load_model(base), load_model(base)
    load_adapter(adapted, adapter)
    forward, reverse, n = 0.0, 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            log_p = torch.log_softmax(plain(input_ids=ids).logits[0, :-1].double(), -1)
            log_q = torch.log_softmax(adapted(input_ids=ids).logits[0, :-1].double(), -1)
            forward += float((log_p.exp() * (log_p - log_q)).sum())
            reverse += float((log_q.exp() * (log_q - log_p)).sum())
            n += len(row) - 1
    assert abs(forward - reverse) > 5e-3 * forward, "the test needs distributions where the direction shows"
    assert result["kl_base_adapted"] == pytest.approx(forward / n, rel=1e-4)
