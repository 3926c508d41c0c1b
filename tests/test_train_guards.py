"""What ``nexus train`` refuses or stops on: invalid settings, another run in --output, a resume
with other optimiser or loss settings, a held output lock, SIGINT/SIGTERM (checkpoint, then exit
130/143), a teacher whose tokenizer cannot be checked, a teacher with another MoE layout, and a
non-finite gradient under DeepSpeed ZeRO (stopped before the optimizer step)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers_train import make_adapter, make_base, make_data
from nexus.engines.train import train
from nexus.training.train_config import TrainConfig
from nexus.errors import Interrupted, NexusError, OutputLockedError
from nexus.io import lock_path, output_lock


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "adapter"),
            "data": make_data(root / "data.jsonl", n=6)}


def _config(work, out, **kw) -> TrainConfig:
    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=2, lr=3e-3, log_every=1, save_every=0, seed=3)
    args.update(kw)
    return TrainConfig(**args)


@pytest.mark.parametrize("field, value, message", [
    ("lr", -1e-3, "--lr must be a positive finite number"),
    ("lr", 0.0, "--lr must be a positive finite number"),
    ("lr", float("nan"), "--lr must be a positive finite number"),
    ("lr", float("inf"), "--lr must be a positive finite number"),
    ("router_lr", -1.0, "--router-lr must be a positive"),
    ("router_lr", float("nan"), "--router-lr must be a positive"),
    ("weight_decay", -0.1, "--weight-decay must be a non-negative"),
    ("weight_decay", float("nan"), "--weight-decay must be a non-negative"),
    ("temperature", 0.0, "--temperature must be a positive"),
    ("temperature", -2.0, "--temperature must be a positive"),
    ("temperature", float("nan"), "--temperature must be a positive"),
    ("ce_weight", float("nan"), "--ce-weight must be a non-negative"),
    ("kd_weight", -1.0, "--kd-weight must be a non-negative"),
    ("router_kl_weight", float("inf"), "--router-kl-weight must be a non-negative"),
    ("max_grad_norm", float("nan"), "--max-grad-norm must be a non-negative"),
    ("warmup_steps", -1, "--warmup-steps must be at least 0"),
    ("save_every", -1, "--save-every must be at least 0"),
    ("keep_last", -2, "--keep-last must be at least 0"),
    ("stop_after", 0, "--stop-after must be at least 1"),
    ("min_lr_ratio", float("nan"), "--min-lr-ratio must be in"),
    ("sfa_beta", float("nan"), "--sfa-beta must be in"),
    ("overwrite", True, "give only one"),  # with resume=True below
])
def test_invalid_settings_are_refused_in_one_line(field, value, message):
    extra = {"resume": True} if field == "overwrite" else {}
    with pytest.raises(NexusError, match=message) as info:
        TrainConfig(model="m", adapter="a", output="o", **{field: value}, **extra)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field, new", [("lr", 1e-2), ("router_lr", 1e-3), ("weight_decay", 0.1), ("ce_weight", 0.5),
                                        ("kd_weight", 2.0), ("router_kl_weight", 0.3), ("temperature", 2.0)])
def test_resume_with_other_optimiser_or_loss_settings_is_refused_naming_old_and_new(work, tmp_path, field, new):
    from nexus.constants import RUN_CONFIG_NAME
    from nexus.training.run_record import check_resume as _check_resume

    old = _config(work, tmp_path)
    (tmp_path / RUN_CONFIG_NAME).write_text(json.dumps({"config": old.to_dict(), "world_size": 1, "engine": "ddp"}))
    _check_resume(tmp_path, old, 1, "ddp")
    with pytest.raises(NexusError, match=rf"cannot resume .*{field} \({getattr(old, field)!r} vs {new!r}\)"):
        _check_resume(tmp_path, _config(work, tmp_path, **{field: new}), 1, "ddp")


def test_existing_run_is_refused_without_resume_and_replaced_with_overwrite(work, tmp_path):
    from nexus.training.train_state import checkpoint_dirs

    run = tmp_path / "run"
    train(_config(work, run, max_steps=3, save_every=1, keep_last=0))
    assert [p.name for p in checkpoint_dirs(run)] == ["step-1", "step-2", "step-3"]
    with pytest.raises(NexusError, match=rf"{run} already holds a training run .*--resume.*--overwrite") as info:
        train(_config(work, run))
    assert "\n" not in str(info.value)
    assert (run / "final").exists() and len(checkpoint_dirs(run)) == 3  # untouched
    result = train(_config(work, run, max_steps=2, overwrite=True))
    assert result.step == 2
    assert [p.name for p in checkpoint_dirs(run)] == ["step-2"]  # the old run's checkpoints are gone
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not lock_path(run).exists()


def test_output_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    out = tmp_path / "out"
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with output_lock(out):  # nested in one process: allowed
            pass
        assert path.exists()
    assert not path.exists()

    live = os.getppid()  # alive for as long as this test runs
    path.write_text(json.dumps({"pid": live, "host": __import__("socket").gethostname()}))
    with pytest.raises(OutputLockedError, match=rf"in use by process {live} .*lock file"):
        with output_lock(out):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    with caplog.at_level("WARNING", logger="nexus.io"), output_lock(out):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"stale lock {path} of process {dead.pid}" in caplog.text
    assert not path.exists()


def test_train_refuses_an_output_locked_by_another_process(work, tmp_path):
    run = tmp_path / "run"
    lock_path(run).write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(OutputLockedError, match=f"process {os.getppid()}"):
        train(_config(work, run))
    assert not run.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_the_cli_exits_with_128_plus_signal(work, tmp_path, monkeypatch, sig, code):
    from click.testing import CliRunner

    import nexus.engines.train as engine
    from nexus.cli import cli
    from nexus.training.train_state import latest_checkpoint

    real, calls = engine.distill_losses, {"n": 0}
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), sig)  # arrives during step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "distill_losses", signalled)
    run = tmp_path / "run"
    args = ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data", str(work["data"]),
            "--output", str(run), "--seq-len", "32", "--batch-size", "2", "--max-steps", "5", "--save-every", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code, r.output
    assert f"stopped by {signal.Signals(sig).name} at step 2 of 5" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output
    assert latest_checkpoint(run).name == "step-2" and not (run / "final").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.setattr(engine, "distill_losses", real)
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert (run / "final").exists()


def test_interrupted_is_raised_in_process_with_the_exit_code(work, tmp_path, monkeypatch):
    import nexus.engines.train as engine

    real = engine.distill_losses

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "distill_losses", signalled)
    with pytest.raises(Interrupted) as info:
        train(_config(work, tmp_path / "run", max_steps=3))
    assert info.value.exit_code == 143 and "checkpoint" in str(info.value)
    assert not lock_path(tmp_path / "run").exists()


def test_teacher_whose_tokenizer_cannot_be_loaded_is_refused(work, tmp_path):
    import shutil

    from nexus.data import load_tokenizer
    from nexus.training.teachers import check_same_vocab
    from nexus.loading import load_config

    teacher = tmp_path / "teacher"
    shutil.copytree(work["base"], teacher)
    for name in os.listdir(teacher):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            os.unlink(teacher / name)
    config = load_config(work["base"])
    expected = rf"cannot load the tokenizer of teacher {teacher} .*save the model's tokenizer"
    with pytest.raises(NexusError, match=expected):
        check_same_vocab(config, load_tokenizer(work["base"]), teacher, load_config(teacher))


def test_teacher_with_another_moe_layout_warns_and_records_missing_router_metrics(work, tmp_path, gpt_oss_config,
                                                                                  caplog):
    import shutil

    from transformers import AutoModelForCausalLM

    cfg = gpt_oss_config.__class__.from_dict(gpt_oss_config.to_dict())
    cfg.num_local_experts = 4
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    for name in os.listdir(work["base"]):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(work["base"] / name, teacher / name)
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="nexus.engines.train"):
        train(_config(work, run, teacher=str(teacher), max_steps=2))
    assert caplog.text.count("router drift and entropy metrics are unavailable") == 1
    note = json.loads((run / "run_config.json").read_text())["router_metrics_unavailable"]
    assert "differ from the model's" in note and "8" in note and "4" in note
    assert all("router_drift" not in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())


class _FakeDeepSpeed:
    """The calls :class:`nexus.training.strategies.ZeRO` makes on DeepSpeed's engine; ``step`` skips the
    update on non-finite gradients when ``skips`` (DeepSpeed's ``check_grad_overflow``)."""

    def __init__(self, finite: bool, skips: bool = True):
        self.optimizer = self
        self.finite, self.skips, self.updates, self.overflow = finite, skips, 0, False

    def step(self):
        self.overflow = not self.finite and self.skips
        self.updates += not self.overflow

    def get_global_grad_norm(self):
        return 1.5 if self.finite else float("nan")


def test_zero_non_finite_gradient_stops_and_says_whether_deepspeed_skipped_the_update():
    from nexus.training.strategies import ZeRO
    from nexus.engines.train import NonFiniteLossError, _stop_if_non_finite

    def check(norm, applied=False):
        _stop_if_non_finite(0, "gradient norm", (norm,), None, applied)

    engine = ZeRO(accelerator=None, max_grad_norm=1.0)
    engine.student = _FakeDeepSpeed(finite=True)
    assert engine.step([], check=check) == 1.5 and engine.student.updates == 1
    engine.student = _FakeDeepSpeed(finite=False)
    with pytest.raises(NonFiniteLossError, match="stopped without updating the weights"):
        engine.step([], check=check)
    assert engine.student.updates == 0
    engine.student = _FakeDeepSpeed(finite=False, skips=False)
    with pytest.raises(NonFiniteLossError, match="the optimizer applied that update"):
        engine.step([], check=check)


def test_zero_config_makes_deepspeed_skip_non_finite_bf16_steps():
    from types import SimpleNamespace

    from nexus.training import zero

    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}}
    plugin = SimpleNamespace(deepspeed_config=ds)
    fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)
    zero.configure(fake, batch_size=1, max_grad_norm=1.0)
    assert ds["bf16"]["check_grad_overflow"] is True


def test_progress_bar_shows_tokens_per_second_unless_quiet(work, tmp_path):
    from click.testing import CliRunner

    from nexus.cli import cli

    args = ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--data", str(work["data"]),
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--save-every", "0"]
    shown = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "train: 100%" in shown.stderr and "2/2" in shown.stderr and "tok_s=" in shown.stderr
    quiet = CliRunner().invoke(cli, ["-q", *args, "--output", str(tmp_path / "b")])
    assert quiet.exit_code == 0, quiet.output
    assert "tok_s=" not in quiet.stderr and "train:" not in quiet.stderr


def test_a_second_ctrl_c_exits_130_in_one_line(work, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import nexus.engines.train as engine
    from nexus.cli import cli

    def abort(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", abort)
    r = CliRunner().invoke(cli, ["train", "--model", str(work["base"]), "--adapter", str(work["adapter"]),
                                 "--data", str(work["data"]), "--output", str(tmp_path / "run")])
    assert r.exit_code == 130 and r.output.strip().startswith("Error: interrupted") and len(r.output.splitlines()) == 1
