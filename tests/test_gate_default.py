"""One default gate: every entry point that attaches shared experts without being told a gate mode
uses :data:`nexus.constants.DEFAULT_GATE_MODE`, the gate the quality benchmark chose (README)."""

from __future__ import annotations

import dataclasses
import inspect

import click

from nexus.constants import DEFAULT_GATE_MODE, GATE_MODES, SHARED_MODULE_NAME, SHARED_SCALE_NAME


def _field_default(cls, name: str):
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


def test_the_default_is_the_exportable_plain_add():
    # The serving-first rule of benchmarks/quality/default_choice.py picked `none`, which folds
    # into a stock checkpoint; a change of default must be a decision, made here and in the README.
    assert DEFAULT_GATE_MODE == "none" and DEFAULT_GATE_MODE in GATE_MODES


def test_stage_configs_default_to_the_constant():
    from nexus.engines.convert_config import ConvertConfig
    from nexus.engines.run import RunConfig
    from nexus.trainers.config import NexusConfig

    assert _field_default(ConvertConfig, "gate_mode") == DEFAULT_GATE_MODE
    assert _field_default(RunConfig, "gate_mode") == DEFAULT_GATE_MODE
    assert NexusConfig().gate_mode == DEFAULT_GATE_MODE


def test_cli_options_default_to_the_constant():
    from nexus.cli import cli

    ctx = click.Context(cli)
    defaults = {}
    for name in ("convert", "run"):
        command = cli.get_command(ctx, name)
        defaults[name] = next(p.default for p in command.params if p.name == "gate_mode")
    assert defaults == {"convert": DEFAULT_GATE_MODE, "run": DEFAULT_GATE_MODE}


def test_attach_shared_experts_defaults_to_the_constant(gpt_oss, gpt_oss_model):
    import nexus

    assert "attach_shared_experts" in nexus.__all__
    assert inspect.signature(nexus.attach_shared_experts).parameters["gate_mode"].default == DEFAULT_GATE_MODE
    blocks = nexus.attach_shared_experts(gpt_oss_model, gpt_oss)
    for block in blocks:
        assert hasattr(block.module, SHARED_MODULE_NAME)
        scale = getattr(block.module, SHARED_SCALE_NAME, None)
        if DEFAULT_GATE_MODE == "none":
            assert scale is None
        else:
            assert scale.mode == DEFAULT_GATE_MODE


def test_trainers_wrapper_defaults_to_the_constant(gpt_oss_model):
    from nexus import get_nexus_model

    wrapped = get_nexus_model(gpt_oss_model)
    assert wrapped.adapter_config.gate_mode == DEFAULT_GATE_MODE
    has_scale = any(SHARED_SCALE_NAME in n for n, _ in gpt_oss_model.named_parameters())
    assert has_scale == (DEFAULT_GATE_MODE != "none")
