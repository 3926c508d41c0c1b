"""The input embedding table kept in host memory (``embeddings_on="host"``): the same numbers as
the resident table, the table left on the host by ``.to(device)`` and untouched by training, only
the looked-up rows sent to the device (a ledger counts them; on a CPU nothing moves)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_conformance import input_ids
from helpers_train import make_adapter, make_base, make_data
from nexus.adapter import load_adapter
from nexus.constants import ADAPTER_WEIGHTS_NAME, RUN_CONFIG_NAME
from nexus.engines.train import train
from nexus.errors import NexusError
from nexus.host_embedding import HostEmbedding, keep_embeddings_on_host
from nexus.loading import load_model
from nexus.shared_expert import is_shared_parameter
from nexus.training.train_config import TrainConfig

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("host_embedding")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter"),
            "data": make_data(root / "data.jsonl", n=12)}


def _student(work, **kw):
    model = load_model(work["base"], **kw)
    load_adapter(model, work["adapter"])
    for name, p in model.named_parameters():
        p.requires_grad_(is_shared_parameter(name))
    return model


def _config(work, out, **kw) -> TrainConfig:
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=3, lr=3e-3, log_every=1, save_every=0, seed=3)
    args.update(kw)
    return TrainConfig(**args)


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_logits_and_gradients_equal_the_resident_table(work):
    ids = input_ids(load_model(work["base"]).config, batch=2, seq=9)
    outs = []
    for kw in ({}, {"embeddings_on": "host"}):
        model = _student(work, **kw)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert model.get_input_embeddings().ledger.lookups == 1
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def test_to_device_leaves_the_table_on_the_host_and_sends_only_the_rows(work):
    # "meta" stands in for an accelerator: every tensor but the table goes there.
    model = load_model(work["base"], embeddings_on="host")
    table = model.get_input_embeddings().weight.detach().clone()
    model.to("meta")
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "cpu" and torch.equal(emb.weight, table)
    assert model.lm_head.weight.device.type == "meta"
    assert emb.compute_device.type == "meta"
    ids = torch.tensor([[3, 5, 7], [9, 11, 13]])
    rows = emb(ids)
    assert rows.device.type == "meta" and rows.shape == (2, 3, table.shape[1])
    assert (emb.ledger.lookups, emb.ledger.rows, emb.ledger.nbytes) == (1, 6, 6 * table.shape[1] * 4)
    assert emb.weight.device.type == "cpu"
    # A dtype cast applies to the table, where it is.
    model.to(torch.bfloat16)
    assert emb.weight.dtype == torch.bfloat16 and emb.weight.device.type == "cpu"
    # load_model places everything else on the device it is given.
    loaded = load_model(work["base"], device="meta", embeddings_on="host")
    assert loaded.get_input_embeddings().weight.device.type == "cpu"
    assert {p.device.type for n, p in loaded.named_parameters() if n != EMBED} == {"meta"}
    # DDP refuses a module whose parameters lie on several device types, except those it is told to ignore.
    ignored = set(loaded._ddp_params_and_buffers_to_ignore)
    assert EMBED in ignored and {p.device.type for n, p in loaded.named_parameters() if n not in ignored} == {"meta"}
    # Shared experts attached afterwards go where the model computes, not where its first parameter is.
    from nexus.family import resolve_family
    from nexus.host_embedding import compute_device
    from nexus.shared_expert import attach_shared_experts

    assert loaded.device.type == "cpu" and compute_device(loaded).type == "meta"
    attach_shared_experts(loaded, resolve_family(loaded.config), 16, "scalar")
    assert {p.device.type for n, p in loaded.named_parameters() if is_shared_parameter(n)} == {"meta"}


@pytest.mark.parametrize("options", [
    {"gradient_checkpointing": True, "router_kl_weight": 0.3},
    {"experts_on": "host", "train_routers": True},
], ids=["checkpointing-self-teacher", "host-experts"])
def test_training_equals_the_resident_table_and_leaves_it_unchanged(work, tmp_path, options):
    resident = train(_config(work, tmp_path / "device", **options))
    host = train(_config(work, tmp_path / "host", embeddings_on="host", **options))
    trained, want = (load_file(str(r.final / ADAPTER_WEIGHTS_NAME)) for r in (host, resident))
    assert trained.keys() == want.keys() and all(torch.equal(trained[k], want[k]) for k in want)
    start = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert any(not torch.equal(t, start[k]) for k, t in trained.items() if k in start)
    assert _metrics(tmp_path / "device") == _metrics(tmp_path / "host")
    emb = host.model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.ledger.lookups > 0
    assert torch.equal(emb.weight, load_model(work["base"]).get_input_embeddings().weight)
    assert json.loads((tmp_path / "host" / RUN_CONFIG_NAME).read_text())["config"]["embeddings_on"] == "host"


def test_tied_embeddings_are_refused(gpt_oss_config):
    from transformers import AutoModelForCausalLM

    config = gpt_oss_config.__class__.from_dict({**gpt_oss_config.to_dict(), "tie_word_embeddings": True})
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(NexusError, match="tiny-gpt-oss: its output head shares the input embedding table "
                                         r"\(tie_word_embeddings\).*--embeddings-on device"):
        keep_embeddings_on_host(model, "tiny-gpt-oss")
    assert not isinstance(model.get_input_embeddings(), HostEmbedding)


def test_bad_values_and_engines_are_refused(work, tmp_path):
    from types import SimpleNamespace

    from nexus.trainers import NexusConfig
    from nexus.training.run_inputs import load_student

    with pytest.raises(NexusError, match="--embeddings-on must be one of device, host, got 'disk'"):
        _config(work, tmp_path / "run", embeddings_on="disk")
    with pytest.raises(NexusError, match="embeddings_on must be one of device, host, got 'gpu'"):
        load_model(work["base"], embeddings_on="gpu")
    with pytest.raises(NexusError, match="NexusConfig: embeddings_on must be one of device, host"):
        NexusConfig(embeddings_on="disk")
    for kind, engine in (("fsdp2", "FSDP2"), ("deepspeed", "DeepSpeed ZeRO")):
        strategy = SimpleNamespace(kind=kind, load_device="cpu")
        with pytest.raises(NexusError, match=f"--embeddings-on host is not supported under {engine}"):
            load_student(_config(work, tmp_path / "run", embeddings_on="host"), strategy, None)


def test_trainer_wrapper_keeps_the_table_on_the_host(gpt_oss_mxfp4_dir):
    from nexus.trainers import NexusConfig, get_nexus_model

    outs = []
    for where in ("device", "host"):
        model = get_nexus_model(load_model(gpt_oss_mxfp4_dir),
                                NexusConfig(seed=1, init_strategy="random", embeddings_on=where))
        ids = input_ids(model.config, batch=2, seq=9)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert isinstance(model.get_base_model().get_input_embeddings(), HostEmbedding)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
