"""``nexus export``: a trained adapter written into a stock checkpoint that serves without NEXUS."""

from __future__ import annotations

import click

from nexus.cli.options import ExpandedPath


@click.command()
@click.option("--model", "model_path", required=True, type=ExpandedPath(exists=True, file_okay=False),
              help="Base model checkpoint directory the adapter was made for.")
@click.option("--adapter", required=True, type=ExpandedPath(exists=True, file_okay=False), help="Adapter directory.")
@click.option("--output", required=True, type=ExpandedPath(), help="Checkpoint directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--remote-code", is_flag=True,
              help="Write a trust_remote_code checkpoint (base tensors unchanged + a small modeling file) instead of "
                   "an exact fold; for adapters with no exact fold (token gate, unnormalised routing).")
@click.option("--dequantize", is_flag=True,
              help="MXFP4 bases: write every expert as float (--dtype) instead of keeping the original blocks and "
                   "quantising only the appended units (exact, about 4x larger).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Dtype of experts written with --dequantize.")
@click.option("--check", is_flag=True,
              help="Load the result with stock transformers in a fresh process (no nexus) and record the max logit "
                   "difference to base + adapter in export_info.json.")
@click.pass_context
def export(ctx, model_path, adapter, output, overwrite, remote_code, dequantize, dtype, check):
    """Write base + adapter as one checkpoint of the base's own architecture, for vLLM, SGLang or transformers.

    \b
    Example:
      nexus export --model ~/models/gpt-oss-20b --adapter runs/a/final --output gpt-oss-20b-domain --check
      vllm serve gpt-oss-20b-domain
    """
    from nexus.engines.export import export as run_export
    from nexus.io import check_writable_output

    check_writable_output(output, directory=True)
    info = run_export(model_path, adapter, output, overwrite=overwrite, remote_code=remote_code, dequantize=dequantize,
                      dtype=dtype, check=check, family_name=ctx.find_root().obj.get("family"))
    cost = info["cost"]
    line = (f"wrote {output} ({info['method']}): +{cost['extra_parameters']:,} parameters "
            f"({100 * cost['extra_parameters_ratio']:.2f}%), +{cost['extra_flops_per_token']:,} FLOPs per token "
            f"({100 * cost['extra_flops_ratio']:.2f}%)")
    if info["check"]:
        line += (f"; check: max |logit diff| {info['check']['max_abs_logit_diff']:.3g}, "
                 f"KL {info['check']['kl_adapter_to_export']:.3g}")
    click.echo(line)


def register(cli):
    cli.add_command(export)
