"""``--kd-data``: distillation on a second (general) stream while CE stays on the domain data.

The loss terms against a manual computation with :mod:`nexus.losses` on the same batches, resume
bit-identity with the kd stream's position in the checkpoint, teacher caches tied to their own
data, the option checks, and the ``run`` plumbing.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers_train import demo_paragraphs, make_adapter, make_base, make_data, student_at_step0
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.engines.train import train
from nexus.errors import NexusError
from nexus.training.train_config import TrainConfig

SEQ = 32
T = 2.0


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_data")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    paragraphs = demo_paragraphs(16)
    return {
        "root": root,
        "base": base,
        "adapter": make_adapter(base, root / "adapter"),
        "data": _write(root / "domain.jsonl", paragraphs[:2]),
        "kd_data": _write(root / "general.jsonl", paragraphs[8:11]),
        "big_data": make_data(root / "big.jsonl", n=12),
    }


def _rows(work, key):
    from nexus.data import load_token_data, load_tokenizer

    data = load_token_data(work[key], load_tokenizer(work["base"]), SEQ)
    return data.rows, data.pad_id


def _config(work, out, **kw) -> TrainConfig:
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]),
                kd_data=str(work["kd_data"]), output=str(out), seq_len=SEQ, batch_size=2, max_steps=1, lr=3e-3,
                log_every=1, save_every=0, seed=3)
    args.update(kw)
    return TrainConfig(**args)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _forward_with_routers(model, batch):
    """Logits ``[B, S, V]`` and per MoE layer the router probabilities ``[B*S, E]`` (GPT-OSS: softmax)."""
    captured = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, out: captured.append(out[0]))
             for layer in model.model.layers]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, [torch.softmax(c.float(), -1) for c in captured]


def test_kd_term_comes_from_the_kd_batches_and_ce_from_the_domain_batches(work, tmp_path):
    from nexus.data import collate
    from nexus.loading import load_model
    from nexus.losses import cross_entropy_sum, kl_div_sum, router_kl_sum, shift_for_next_token

    domain_rows, pad = _rows(work, "data")
    kd_rows, _ = _rows(work, "kd_data")
    assert len(kd_rows) != len(domain_rows)  # kd batch size of its own
    rkl_w = 0.4
    train(_config(work, tmp_path / "run", batch_size=len(domain_rows), kd_batch_size=len(kd_rows), ce_weight=0.7,
                  kd_weight=1.3, temperature=T, router_kl_weight=rkl_w, max_grad_norm=1e9))
    rec = _metrics(tmp_path / "run")[0]

    domain, general = collate(domain_rows, pad), collate(kd_rows, pad)
    base, student = load_model(work["base"]), student_at_step0(work)
    with torch.no_grad():
        t_logits, t_probs = _forward_with_routers(base, general)
    s_dom = student(input_ids=domain["input_ids"], attention_mask=domain["attention_mask"], use_cache=False).logits
    s_gen, s_probs = _forward_with_routers(student, general)
    s, labels = shift_for_next_token(s_dom, domain["labels"])
    ce, n_pred = cross_entropy_sum(s, labels)
    sg, g_labels = shift_for_next_token(s_gen, general["labels"])
    tg, _ = shift_for_next_token(t_logits, general["labels"])
    kd = kl_div_sum(tg, sg, g_labels != -100, T)
    kd_ce, n_pred_kd = cross_entropy_sum(sg, g_labels)
    in_mask = general["attention_mask"].reshape(-1).bool()
    n_in_kd, n_layers = float(in_mask.sum()), len(t_probs)
    rkl = sum(router_kl_sum(p_t, p_s, in_mask) for p_t, p_s in zip(t_probs, s_probs))
    loss = 0.7 * ce / n_pred + 1.3 * T**2 * kd / n_pred_kd + rkl_w * rkl / (n_in_kd * n_layers)
    loss.backward()
    ce, kd, kd_ce, rkl, loss = ce.detach(), kd.detach(), kd_ce.detach(), rkl.detach(), loss.detach()
    grad_norm = float(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).norm())

    assert rec["ce"] == pytest.approx(float(ce / n_pred), rel=1e-5)
    assert rec["kd"] == pytest.approx(float(kd / n_pred_kd), rel=1e-4)
    assert rec["router_kl"] == pytest.approx(float(rkl) / (n_in_kd * n_layers), rel=1e-4)
    assert rec["kd_data_ce"] == pytest.approx(float(kd_ce / n_pred_kd), rel=1e-5)
    assert rec["loss"] == pytest.approx(float(loss), rel=1e-5)  # the logged loss is the back-propagated one
    assert rec["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert rec["tokens"] == int(domain["attention_mask"].sum()) and rec["kd_tokens"] == int(n_in_kd)
    assert rec["loss_sources"]["ce"] == "data" and rec["loss_sources"]["kd"] == "kd_data"
    assert rec["loss_sources"]["router_kl"] == "kd_data"
    # The distillation term on the domain batch would be another number: the stream matters.
    with torch.no_grad():
        t_dom, _ = shift_for_next_token(base(input_ids=domain["input_ids"],
                                             attention_mask=domain["attention_mask"]).logits, domain["labels"])
    assert float(kl_div_sum(t_dom, s.detach(), labels != -100, T) / n_pred) != pytest.approx(rec["kd"], rel=1e-2)
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["kd_num_rows"] == len(kd_rows) and run_config["config"]["kd_data"] == str(work["kd_data"])


def test_resume_with_kd_data_is_bit_identical(work, tmp_path):
    # A kd stream of 3 rows drawn 1 per micro-batch: it wraps into new epochs inside the run.
    kw = dict(data=str(work["big_data"]), max_steps=7, grad_accum=2, kd_batch_size=1, router_kl_weight=0.3,
              sfa_interval=3, warmup_steps=1)
    straight = train(_config(work, tmp_path / "a", **kw))
    first = train(_config(work, tmp_path / "b", stop_after=3, save_every=2, **kw))
    assert first.interrupted and first.step == 3
    state = json.loads((first.checkpoint / "state.json").read_text())
    assert state["next_kd_batch"] == 6 and state["next_batch"] == 6 and state["kd_tokens"] > 0
    resumed = train(_config(work, tmp_path / "b", resume=True, **kw))
    assert resumed.step == 7 and not resumed.interrupted
    a = load_file(str(straight.final / ADAPTER_WEIGHTS_NAME))
    b = load_file(str(resumed.final / ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in mb] == list(range(1, 8))
    for x, y in zip(ma, mb):
        assert (x["loss"], x["ce"], x["kd"], x["router_kl"], x["kd_data_ce"], x["kd_tokens"]) == \
               (y["loss"], y["ce"], y["kd"], y["router_kl"], y["kd_data_ce"], y["kd_tokens"])


def test_resume_with_another_kd_data_is_refused(work, tmp_path):
    train(_config(work, tmp_path / "r", max_steps=2, stop_after=1))
    with pytest.raises(NexusError, match="kd_data"):
        train(_config(work, tmp_path / "r", max_steps=2, kd_data=str(work["big_data"]), resume=True))


def test_teacher_cache_must_be_made_from_the_kd_data(work, tmp_path):
    from nexus.engines.precompute import PrecomputeConfig, precompute

    def cache_of(key):
        return precompute(PrecomputeConfig(teacher=str(work["base"]), data=str(work[key]), seq_len=SEQ, top_k=8,
                                           output=str(tmp_path / f"cache_{key}"), batch_size=4, temperature=T))

    domain_cache = cache_of("data")
    with pytest.raises(NexusError, match=r"--kd-data .*general.jsonl is not the data teacher cache .* was made from"):
        train(_config(work, tmp_path / "refused", teacher=str(domain_cache), temperature=T))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()

    # A cache of the kd data serves the kd stream; CE stays on --data.
    kd_rows, _ = _rows(work, "kd_data")
    domain_rows, _ = _rows(work, "data")
    train(_config(work, tmp_path / "ok", teacher=str(cache_of("kd_data")), temperature=T,
                  batch_size=len(domain_rows), kd_batch_size=len(kd_rows)))
    rec = _metrics(tmp_path / "ok")[0]
    assert rec["kd"] > 0 and rec["kd_tokens"] == sum(map(len, kd_rows)) and rec["tokens"] == sum(map(len, domain_rows))
    with pytest.raises(NexusError, match="--data is required with --kd-data"):
        train(_config(work, tmp_path / "nodata", data=None, teacher=str(cache_of("kd_data")), temperature=T))


@pytest.mark.parametrize("kw, message", [
    (dict(kd_data=None, kd_batch_size=2), "--kd-batch-size applies to --kd-data"),
    (dict(kd_data=None, kd_text_column="body"), "--kd-text-column applies to --kd-data"),
    (dict(kd_weight=0.0), "--kd-data feeds the distillation terms"),
    (dict(kd_batch_size=0), "--kd-batch-size must be at least 1"),
])
def test_kd_options_are_checked(work, tmp_path, kw, message):
    with pytest.raises(NexusError, match=message):
        _config(work, tmp_path / "x", **kw)


def test_kd_data_errors_name_the_kd_data(work, tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(NexusError) as err:
        train(_config(work, tmp_path / "run", kd_data=str(bad)))
    message = str(err.value)
    assert message.startswith(f"--kd-data {bad}: ") and "'text'" in message and "body" in message
    assert "--kd-text-column" in message and " --text-column" not in message
    train(_config(work, tmp_path / "run2", kd_data=str(bad), kd_text_column="body", batch_size=1))


def test_run_plumbs_kd_data_into_train(gpt_oss_float_dir, tmp_path, monkeypatch):
    from nexus.cli import cli
    from nexus.engines.run import RunConfig, _train_inputs, validate_run

    base = make_base(gpt_oss_float_dir, tmp_path / "base")
    data = make_data(tmp_path / "train.jsonl", 30)
    general = _write(tmp_path / "general.jsonl", demo_paragraphs(40)[30:])
    plan = validate_run(RunConfig(output=str(tmp_path / "run"), model=str(base), data=str(data),
                                  kd_data=str(general), kd_batch_size=3))
    assert (plan.train.kd_data, plan.train.kd_batch_size) == (str(general), 3)
    assert _train_inputs(plan)["kd_data_fingerprint"] == plan.kd_data_fingerprint
    # Without --kd-data the train stamp is what it was before the kd options existed.
    plain = validate_run(RunConfig(output=str(tmp_path / "run"), model=str(base), data=str(data)))
    assert not {"kd_data", "kd_batch_size", "kd_text_column", "kd_data_fingerprint"} & set(_train_inputs(plain))

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bad"
    result = CliRunner().invoke(cli, ["-q", "run", "--model", str(base), "--data", str(data), "--output", str(out),
                                      "--max-steps", "2", "--kd-data", "missing.jsonl"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "missing.jsonl does not exist" in result.output
    assert not (out / "stages").exists() and not (out / "stats").exists()
