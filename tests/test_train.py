"""Training engine: resume bit-identity, gradient accumulation, frozen base, teacher self, NaN and vocab errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import make_adapter, make_base, make_data
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.training.train_state import checkpoint_dirs
from nexus.engines.train import NonFiniteLossError, train
from nexus.training.train_config import TrainConfig
from nexus.errors import NexusError


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {
        "root": root,
        "base": base,
        "adapter": make_adapter(base, root / "adapter"),
        "data": make_data(root / "data.jsonl", n=12),
    }


def _config(work, out, **kw) -> TrainConfig:
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=4, lr=3e-3, log_every=1, save_every=0, seed=3)
    args.update(kw)
    return TrainConfig(**args)


def _adapter(path):
    return load_file(str(path / ADAPTER_WEIGHTS_NAME))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_identical(work, tmp_path):
    kw = dict(max_steps=10, grad_accum=2, sfa_interval=3, train_routers=True, router_lr=1e-3,
              router_kl_weight=0.5, warmup_steps=2, weight_decay=0.01)
    straight = train(_config(work, tmp_path / "a", **kw))
    first = train(_config(work, tmp_path / "b", stop_after=5, save_every=2, keep_last=2, **kw))
    assert first.interrupted and first.final is None and first.step == 5
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-4", "step-5"]  # rotated, keep_last=2
    resumed = train(_config(work, tmp_path / "b", resume=True, **kw))
    assert resumed.step == 10 and not resumed.interrupted
    a, b = _adapter(straight.final), _adapter(resumed.final)
    assert a.keys() == b.keys() and any("router" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in mb] == list(range(1, 11))
    for x, y in zip(ma, mb):
        assert (x["loss"], x["kd"], x["router_kl"], x["sfa_merges"]) == (y["loss"], y["kd"], y["router_kl"], y["sfa_merges"])
    assert ma[2]["sfa_merge_steps"] == [3]


def test_grad_accum_matches_big_batch(work, tmp_path):
    big = train(_config(work, tmp_path / "big", batch_size=4, grad_accum=1, max_steps=3, router_kl_weight=0.3))
    acc = train(_config(work, tmp_path / "acc", batch_size=1, grad_accum=4, max_steps=3, router_kl_weight=0.3))
    a, b = _adapter(big.final), _adapter(acc.final)
    init = _adapter(work["adapter"])
    for k in a:
        assert not torch.equal(a[k], init[k]), f"{k} did not train"
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for x, y in zip(_metrics(tmp_path / "big"), _metrics(tmp_path / "acc")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_frozen_base_untouched_and_self_teacher_is_base(work, tmp_path):
    from nexus.data import collate
    from nexus.training.teachers import SelfTeacher
    from nexus.loading import load_model
    from nexus.shared_expert import is_shared_parameter

    result = train(_config(work, tmp_path / "run", max_steps=3, train_routers=True, router_lr=1e-2, weight_decay=0.1))
    model = result.model
    base = load_model(work["base"])
    base_params = dict(base.named_parameters())
    changed = []
    for name, p in model.named_parameters():
        if is_shared_parameter(name):
            continue
        if "router" in name:
            changed.append(not torch.equal(p, base_params[name]))
        else:
            assert torch.equal(p, base_params[name]), f"frozen parameter {name} changed"
    assert changed and all(changed), "trained routers should differ from the base"
    # The self teacher (shared experts off, original routers swapped in) is exactly the base.
    from nexus.family import resolve_family
    from nexus.shared_expert import router_parameters

    family = resolve_family(model.config)
    blocks = family.moe_blocks(model)
    originals = {n: p.detach().clone() for n, p in router_parameters(base, family, family.moe_blocks(base)).items()}
    teacher = SelfTeacher(model, family, blocks, originals)
    batch = collate([[5, 9, 17, 33, 2, 40], [7, 8, 9]], 0)
    with torch.no_grad():
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = teacher.outputs(batch, "cpu")
    assert torch.equal(got.head.logits(got.hidden), want)  # final hidden states and the output head
    assert not torch.allclose(adapted, want)
    assert sorted(got.router_probs) == [b.layer for b in blocks]
    # ... and the model is left as it was (routers restored, shared experts on).
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, adapted)


def test_gradient_checkpointing_gives_same_result(work, tmp_path):
    plain = train(_config(work, tmp_path / "p", max_steps=2, router_kl_weight=0.2))
    ckpt = train(_config(work, tmp_path / "c", max_steps=2, router_kl_weight=0.2, gradient_checkpointing=True))
    a, b = _adapter(plain.final), _adapter(ckpt.final)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert ckpt.model.training is False  # the base stays in eval mode


def test_nan_loss_stops_and_keeps_last_checkpoint(work, tmp_path, monkeypatch):
    import nexus.engines.train as engine

    real, calls = engine.distill_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        parts = real(*args, **kwargs)
        if calls["n"] == 3:
            parts.ce = parts.ce * float("nan")
        return parts

    monkeypatch.setattr(engine, "distill_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step 3.*step-2"):
        train(_config(work, tmp_path / "run", max_steps=6, save_every=2))
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-2"]
    tensors = _adapter(tmp_path / "run" / "checkpoints" / "step-2" / "adapter")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "run" / "final").exists()


def test_teacher_with_other_vocab_is_refused(work, tmp_path, gpt_oss_config):
    from transformers import AutoModelForCausalLM

    cfg = gpt_oss_config.__class__.from_dict(gpt_oss_config.to_dict())
    cfg.vocab_size = 300
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "teacher")
    with pytest.raises(NexusError, match="vocabulary size 300"):
        train(_config(work, tmp_path / "run", teacher=str(tmp_path / "teacher")))


def test_resume_with_other_settings_is_refused(work, tmp_path):
    train(_config(work, tmp_path / "run", max_steps=2))
    with pytest.raises(NexusError, match="batch_size"):
        train(_config(work, tmp_path / "run", max_steps=3, batch_size=3, resume=True))


def test_bf16_base_with_fp32_shared_experts(work, tmp_path):
    result = train(_config(work, tmp_path / "bf16", max_steps=2, bf16=True, train_routers=True, router_kl_weight=0.2))
    model = result.model
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if "nexus_shared" in n or "router" in n)
    rec = _metrics(tmp_path / "bf16")[-1]
    assert all(map(torch.isfinite, map(torch.tensor, (rec["loss"], rec["kd"], rec["router_kl"]))))
    # Back to fp32 in the same process: accelerate's global state is reset between engine calls.
    train(_config(work, tmp_path / "fp32", max_steps=1))


def test_cli_train_options_come_from_the_config(work, tmp_path):
    from click.testing import CliRunner

    from nexus.cli import cli

    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    for field in ("--grad-accum", "--router-kl-weight", "--sfa-interval", "--keep-last", "--gradient-checkpointing"):
        assert field in help_text
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]),
                                 "--data", str(work["data"]), "--output", str(run), "--seq-len", "32",
                                 "--batch-size", "2", "--max-steps", "2", "--schedule", "constant", "--train-routers"])
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    saved = json.loads((run / "run_config.json").read_text())["config"]
    assert saved["schedule"] == "constant" and saved["train_routers"] is True and saved["max_steps"] == 2
    r = CliRunner().invoke(cli, ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]),
                                 "--output", str(tmp_path / "x"), "--seq-len", "32"])
    assert r.exit_code == 1 and "--data is required" in r.output


def test_report_to_logs_through_accelerate_trackers(work, tmp_path):
    from accelerate.tracking import GeneralTracker

    from nexus.training.distributed import make_accelerator

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.config, self.logged = None, []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    tracker = Recorder()
    accelerator = make_accelerator(log_with=[tracker])
    train(_config(work, tmp_path / "run", max_steps=2, router_kl_weight=0.1, report_to="recorder"), accelerator=accelerator)
    assert tracker.config["max_steps"] == 2
    assert [s for s, _ in tracker.logged] == [1, 2]
    assert {"loss", "kd", "lr", "grad_norm", "router_drift/layer_1"} <= set(tracker.logged[0][1])


def test_teacher_with_other_tokenizer_of_same_size_is_refused(work, tmp_path):
    import shutil

    from helpers_train import demo_paragraphs
    from nexus.data import load_tokenizer
    from nexus.demo import train_tokenizer
    from nexus.training.teachers import check_same_vocab
    from nexus.loading import load_config

    teacher = tmp_path / "teacher"
    shutil.copytree(work["base"], teacher)
    train_tokenizer(demo_paragraphs(200)[::-1][:40], 256).save_pretrained(teacher)
    config = load_config(work["base"])
    check_same_vocab(config, load_tokenizer(work["base"]), work["base"], config)  # itself: accepted
    with pytest.raises(NexusError, match="tokenizer of teacher .* differs"):
        check_same_vocab(config, load_tokenizer(work["base"]), teacher, load_config(teacher))


def test_sfa_start_anchor_pulls_toward_the_starting_weights():
    from nexus.engines.average import SFA

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sfa = SFA({"w": p}, interval=2, beta=0.25)  # the paper's rule: the anchor never moves
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    assert sfa.maybe_merge(2)
    torch.testing.assert_close(p.detach(), torch.tensor([4.0, 5.0]))  # 0.75*[5,6] + 0.25*[1,2]
    with torch.no_grad():
        p.copy_(torch.tensor([9.0, 10.0]))
    sfa.maybe_merge(4)
    torch.testing.assert_close(p.detach(), torch.tensor([7.0, 8.0]))  # 0.75*[9,10] + 0.25*[1,2]
    with pytest.raises(NexusError, match="sfa-anchor"):
        SFA({"w": p}, interval=2, beta=0.25, anchor="nope")


def test_sfa_merges_with_previous_merge_point():
    from nexus.engines.average import SFA

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sfa = SFA({"w": p}, interval=2, beta=0.25, anchor="previous")
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    assert not sfa.maybe_merge(1)
    assert sfa.maybe_merge(2)
    torch.testing.assert_close(p.detach(), torch.tensor([4.0, 5.0]))  # 0.75*[5,6] + 0.25*[1,2]
    with torch.no_grad():
        p.copy_(torch.tensor([8.0, 9.0]))
    sfa.maybe_merge(4)
    torch.testing.assert_close(p.detach(), torch.tensor([7.0, 8.0]))  # snapshot is now the step-2 merge
    state = sfa.state_dict()
    other = SFA({"w": torch.nn.Parameter(torch.zeros(2))}, interval=2, beta=0.25)
    other.load_state_dict(state)
    assert other.merges == 2 and other.merge_steps == [2, 4] and torch.equal(other.snapshot["w"], p.detach())


@pytest.mark.parametrize("kind, settings, message", [
    ("MEGATRON_LM", {}, "MEGATRON_LM is not supported .* Use FSDP2"),
    ("FSDP", {"fsdp_version": 1}, "FSDP version 1 is not supported .* fsdp_version: 2"),
    ("DEEPSPEED", {"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported .* FSDP2 shards the frozen base"),
    ("DEEPSPEED", {"zero_optimization": {"stage": 0}}, "ZeRO stage 0 is not supported .* use stage 2"),
    ("DEEPSPEED", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer .*'cpu'.* set it to 'none'"),
    ("DEEPSPEED", {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "sets its own 'optimizer'.* remove the 'optimizer' section"),
])
def test_unsupported_engines_are_refused_before_any_work(work, tmp_path, kind, settings, message):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=settings.get("fsdp_version")),
                            deepspeed_plugin=SimpleNamespace(deepspeed_config=dict(settings)))
    fake = SimpleNamespace(distributed_type=DistributedType[kind], state=state, num_processes=2)
    with pytest.raises(NexusError, match=message):
        train(_config(work, tmp_path / "run"), accelerator=fake)
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_gets_the_batch_accumulation_and_clipping_nexus_owns():
    from types import SimpleNamespace

    from nexus.training import zero

    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)), num_processes=4)
    assert zero.configure(fake, batch_size=3, max_grad_norm=0.5) == 2
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 12
    # nexus accumulates the window itself and calls DeepSpeed's step() once per optimizer step.
    assert ds["gradient_accumulation_steps"] == 1 and ds["managed_gradient_accumulation"] is False
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("old, new, ok", [("ddp", "fsdp2", True), ("fsdp2", "ddp", True), ("deepspeed", "deepspeed", True),
                                          ("deepspeed", "ddp", False), ("fsdp2", "deepspeed", False)])
def test_resume_refuses_another_optimizer_state_format(work, tmp_path, old, new, ok):
    import json

    from nexus.constants import RUN_CONFIG_NAME
    from nexus.training.run_record import check_resume as _check_resume

    config = _config(work, tmp_path)
    (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps({"config": config.to_dict(), "world_size": 2, "engine": old}))
    if ok:
        _check_resume(tmp_path, config, 2, new)
    else:
        with pytest.raises(NexusError, match=f"cannot resume .*engine \\({old} vs {new}\\)"):
            _check_resume(tmp_path, config, 2, new)
    with pytest.raises(NexusError, match="world_size \\(2 vs 1\\)"):
        _check_resume(tmp_path, config, 1, old)


def test_launch_config_precision_is_overridden_by_the_bf16_flag_with_a_warning(monkeypatch, caplog):
    from nexus.training.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with caplog.at_level("WARNING", logger="nexus.training.distributed"):
        accelerator = make_accelerator(bf16=False)
    assert accelerator.mixed_precision == "no"
    assert "mixed precision fp16; nexus uses --bf16 (off)" in caplog.text
