"""``--train-native-shared``: a family's own shared expert (Qwen2-MoE) trains beside NEXUS's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.demo import build_checkpoint
from nexus.engines.train import train
from nexus.training.train_config import TrainConfig
from nexus.errors import NexusError
from nexus.family import resolve_family
from nexus.loading import load_model


def _config(base, adapter, data, out, **kw):
    return TrainConfig(model=str(base), adapter=str(adapter), data=str(data), output=str(out), seq_len=32,
                       batch_size=2, max_steps=2, lr=3e-3, log_every=1, save_every=0, seed=0, **kw)


def test_native_shared_expert_trains_and_round_trips(tmp_path):
    family = resolve_family(name="qwen2_moe")
    raw = build_checkpoint(family, tmp_path / "raw")
    base = make_base(raw, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", intermediate_size=32)
    data = make_data(tmp_path / "data.jsonl", n=8)

    result = train(_config(base, adapter, data, tmp_path / "run", train_native_shared=True))
    before = load_model(base)
    after = result.model
    native = [n for n, _ in before.named_parameters() if ".shared_expert" in n]
    assert native, "the Qwen2-MoE example has a native shared expert"
    saved = load_file(str(result.final / ADAPTER_WEIGHTS_NAME))
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    for name in b:
        if name in native:
            assert not torch.equal(b[name], a[name]), f"{name} did not train"
            assert torch.equal(saved[name], a[name].detach().cpu())
        else:
            assert torch.equal(b[name], a[name]), f"frozen {name} changed"

    # Loading the adapter puts the trained native shared expert back.
    import nexus

    reloaded = nexus.load_adapter(load_model(base), result.final)
    r = dict(reloaded.named_parameters())
    for name in native:
        assert torch.equal(r[name], a[name].detach())


def test_native_shared_refused_without_one(gpt_oss_mxfp4_dir, tmp_path):
    base = make_base(gpt_oss_mxfp4_dir, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    data = make_data(tmp_path / "data.jsonl", n=4)
    with pytest.raises(NexusError, match="no shared expert of its own"):
        train(_config(base, adapter, data, tmp_path / "run", train_native_shared=True))
