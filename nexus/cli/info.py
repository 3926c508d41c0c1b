"""``nexus plugins``, ``nexus families``, ``nexus inspect``: what is installed and what a model is."""

from __future__ import annotations

import json

import click

from nexus.cli.options import ExpandedPath


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List every loaded plugin, the package and version providing it, and the hooks it implements."""
    from nexus.plugins import get_plugin_manager, plugin_distribution

    pm = get_plugin_manager()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: x[0]):
        dist, version = plugin_distribution(pm, name)
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        rows.append({"name": name, "package": dist, "version": version, "hooks": hooks})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  ({r['package']} {r['version']})")
        for h in r["hooks"]:
            click.echo(f"    {h}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def families(as_json):
    """List every registered model family, its model types and the package providing it."""
    from nexus.family import registered_families
    from nexus.plugins import get_plugin_manager, plugin_distribution

    pm = get_plugin_manager()
    rows = [
        {
            "name": f.name,
            "model_types": list(f.model_types),
            "description": f.description,
            "plugin": f.plugin,
            "package": plugin_distribution(pm, f.plugin)[0],
        }
        for f in registered_families(pm).values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<16} {','.join(r['model_types']):<24} {r['package']:<22} {r['description']}")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}P"


@click.command()
@click.option("--model", "model_path", type=ExpandedPath(), default=None,
              help="Checkpoint directory (default: build the family's tiny demo checkpoint).")
@click.option("--shared-intermediate-size", type=int, default=None,
              help="Width of each shared expert for the parameter count (default: the expert width).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output, with the list of MoE layers.")
@click.pass_context
def inspect(ctx, model_path, shared_intermediate_size, as_json):
    """Describe a checkpoint without loading its weights.

    \b
    Examples:
      nexus --family gpt_oss inspect
      nexus inspect --model ~/models/gpt-oss-20b --shared-intermediate-size 1440 --json
    """
    from nexus.cli import get_family
    from nexus.inspect import describe_checkpoint
    from nexus.loading import load_config

    if model_path is None:
        from nexus.demo import demo_checkpoint

        if ctx.find_root().obj.get("family") is None:
            raise click.UsageError("give --model PATH, or --family NAME to inspect that family's demo checkpoint")
        model_path = str(demo_checkpoint(get_family(ctx)))
    family = get_family(ctx, load_config(model_path))
    info = describe_checkpoint(model_path, family, shared_intermediate_size)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    layers = [b["layer"] for b in info["moe_layers"]]
    click.echo(f"model          {info['path']}")
    click.echo(f"family         {info['family']} (model_type {info['model_type']}, fingerprint {info['fingerprint']})")
    click.echo(f"MoE layers     {len(layers)} of {info['num_layers']}: {layers}")
    click.echo(f"experts        {info['num_experts']} routed, top-{info['top_k']}")
    click.echo(f"sizes          hidden {info['hidden_size']}, expert intermediate {info['intermediate_size']}")
    click.echo(f"parameters     {_human(info['total_parameters'])} total, {_human(info['routed_expert_parameters'])} in routed experts")
    click.echo(f"quantisation   {info['quantization']} ({_human(info['checkpoint_bytes'])}B on disk)")
    click.echo(
        f"shared experts {_human(info['shared_expert_parameters'])} trainable parameters "
        f"at intermediate size {info['shared_intermediate_size']}"
    )


def register(cli):
    cli.add_command(plugins)
    cli.add_command(families)
    cli.add_command(inspect)
