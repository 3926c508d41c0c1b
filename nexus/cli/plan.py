"""``nexus plan``: the memory a training run needs, per component, before any weight is read."""

from __future__ import annotations

import json

import click

from nexus.cli.options import dataclass_options

PLAN_EPILOG = """\b
Examples:
  nexus plan --model ~/models/gpt-oss-20b --gpu-memory 24GiB --bf16 --batch-size 1 --seq-len 1024
  nexus plan --model M --adapter adapter/ --gpu-memory 80GB --gradient-checkpointing --json
  nexus plan --model M --device cpu --host-memory 64GiB      # train on the CPU: one memory
"""


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f}"


def format_plan(result) -> str:
    """The table ``nexus plan`` prints: one line per component (device and host GiB), the totals,
    the verdict and the suggested change."""
    cfg = result.config
    where = "memory" if cfg.device == "cpu" else "device"
    lines = [f"{'component':<20} {where:>8} {'host':>8}  GiB", "-" * 60]
    for name, r in result.components.items():
        lines.append(f"{name:<20} {_gib(r['device'])} {_gib(r['host'])}  {r['note']}")
    lines += ["-" * 60, f"{'total':<20} {_gib(result.device_bytes)} {_gib(result.host_bytes)}"]
    mapped = result.details.get("file_backed_bytes", 0)
    if mapped:
        lines.append(f"of which {mapped / 2**30:.2f} GiB of weights stay mapped from the checkpoint files "
                     f"(file-backed pages)")
    if result.fits is None:
        lines.append("no --gpu-memory or --host-memory given: no verdict")
    elif result.fits:
        lines.append("fits")
    else:
        limits = ", ".join(x for x in (f"--gpu-memory {cfg.gpu_memory}" if cfg.gpu_memory else "",
                                       f"--host-memory {cfg.host_memory}" if cfg.host_memory else "") if x)
        lines.append(f"does not fit {limits}; the cheapest change that fits: {result.suggestion}")
    return "\n".join(lines)


def _plan_command():
    from nexus.plan import PlanConfig

    @click.command(epilog=PLAN_EPILOG)
    @dataclass_options(PlanConfig)
    @click.pass_context
    def plan(ctx, **kwargs):
        """Predict the memory of a nexus train step: packed experts, other weights, adapter, gradients,
        optimizer state, activations, loss workspace, streaming buffers and teacher, on the compute
        device and in host memory; whether it fits --gpu-memory, and the cheapest change that makes it fit.

        Reads config.json and the safetensors headers only (no weights). Options mean what they mean
        for nexus train and nexus convert. Exit status 0 when it fits (or no memory is given), 3 when not.
        """
        from nexus.plan import plan as run_plan

        family = ctx.find_root().obj.get("family")
        result = run_plan(PlanConfig(**kwargs), family)
        click.echo(json.dumps(result.to_dict(), indent=2) if kwargs["json"] else format_plan(result))
        if result.fits is False:
            ctx.exit(3)

    return plan


def register(cli):
    cli.add_command(_plan_command())
