"""Every command of the CLI over a table of bad inputs: a non-zero exit, one ``Error:`` line, no
traceback, and nothing written where the command was told to write.

The commands run through click's CliRunner on ``nexus.cli.cli``, the group ``main()`` calls, so
the error handling is the console script's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers_prepare import model_with_tokenizer, write_jsonl
from helpers_train import make_adapter
from nexus.cli import cli


@pytest.fixture(scope="module")
def fx(gpt_oss_mxfp4_dir, gpt_oss_float_dir, tmp_path_factory):
    """Shared inputs, built once: a model with a tokenizer, data, statistics, an adapter, an
    adapter of another family, a run directory with metrics."""
    from nexus.demo import build_checkpoint
    from nexus.family import resolve_family

    root = tmp_path_factory.mktemp("cli_errors")
    base = model_with_tokenizer(gpt_oss_mxfp4_dir, root / "base")
    data = write_jsonl(root / "data.jsonl", n=12)
    r = _invoke("collect", "--model", base, "--data", data, "--output", root / "stats", "--seq-len", 32,
                "--batch-size", 4, "--target-tokens", 200)
    assert r.exit_code == 0, r.output
    mixtral = resolve_family(name="mixtral")
    other = model_with_tokenizer(build_checkpoint(mixtral, root / "mixtral_src"), root / "mixtral")
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "ce": 5.0 - s / 10,
                                                           "kd": 0.01 * s, "router_kl": 0.0, "lr": 1e-3})
                                               + "\n" for s in (1, 2, 3)))
    return {
        "root": root, "base": base, "data": data, "stats": root / "stats", "run": run,
        "float_base": model_with_tokenizer(gpt_oss_float_dir, root / "float_base"),
        "adapter": make_adapter(base, root / "adapter"),
        "other_adapter": make_adapter(other, root / "other_adapter", intermediate_size=16),
    }


def _invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


# Each builder takes (fixtures, work dir) and returns the command line; the work dir is where the
# command is told to write, and must be unchanged afterwards.


def _truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """A copy of ``src`` (a file, or the .safetensors of a directory) cut to ``keep`` of its bytes."""
    if src.is_dir():
        shutil.copytree(src, dst)
        target = next(dst.glob("*.safetensors"))
    else:
        dst.write_bytes(src.read_bytes())
        target = dst
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return dst


def _garbage_header(src: Path, dst: Path) -> Path:
    """A copy of the directory ``src`` whose .safetensors starts with a header length of garbage."""
    shutil.copytree(src, dst)
    target = next(dst.glob("*.safetensors"))
    data = target.read_bytes()
    target.write_bytes(b"\xff" * 8 + data[8:])
    return dst


def _adapter_with(fx, dst: Path, edit) -> Path:
    """A copy of the shared adapter whose tensors went through ``edit(dict) -> dict``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fx["adapter"], dst)
    weights = next(dst.glob("*.safetensors"))
    tensors = edit(load_file(weights))
    save_file(tensors, weights)
    return dst


def _drop_one(tensors: dict) -> dict:
    tensors.pop(sorted(tensors)[0])
    return tensors


def _misshape(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
    tensors[key] = tensors[key][:-1].contiguous()
    return tensors


def _data_file(work: Path, name: str, content: bytes) -> Path:
    path = work.parent / name  # beside the work dir, so that writing it is not "a write by the command"
    path.write_bytes(content)
    return path


def _evaluate(fx, work, **kw):
    args = {"--model": fx["base"], "--adapter": fx["adapter"], "--data": fx["data"], "--output": work / "eval.json",
            "--seq-len": 24, "--batch-size": 2, "--max-batches": 1}
    args.update(kw)
    return ["evaluate", *[x for k, v in args.items() if v is not None for x in (k, v)]]


def _train(fx, work, **kw):
    args = {"--model": fx["base"], "--adapter": fx["adapter"], "--data": fx["data"], "--output": work / "run",
            "--seq-len": 24, "--batch-size": 2, "--max-steps": 1}
    args.update(kw)
    return ["train", *[x for k, v in args.items() if v is not None for x in (k, v)]]


def _a_file(work: Path) -> Path:
    (work / "file").write_text("not a directory\n")
    return work / "file"


def _fp8_base_with_partial_blocks(dst: Path) -> Path:
    """A tiny block-scaled FP8 Qwen3-MoE checkpoint (H = 200, I = 300) whose matrices span several
    128x128 blocks, the last partial."""
    from helpers_conformance import build_checkpoint
    from helpers_prepare import model_with_tokenizer
    from nexus.family import resolve_family

    family = resolve_family(name="qwen3_moe")
    config = family.example_config()
    config.hidden_size, config.moe_intermediate_size = 200, 300
    return model_with_tokenizer(build_checkpoint(family, dst.parent / "fp8_src", config=config, fmt="fp8"), dst)


def _long_document(work: Path) -> Path:
    from nexus.data_sources import MAX_DOCUMENT_CHARS

    return _data_file(work, "long.jsonl", b'{"text": "' + b"a" * (MAX_DOCUMENT_CHARS + 1) + b'"}\n')


def _sharded_truncated(fx, dst: Path) -> Path:
    """A copy of the base split into two shards (with an index), the second cut in half."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fx["base"], dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, dst / file, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: file for file, keys in shards.items() for k in keys}}))
    return _truncated(dst / "model-00002-of-00002.safetensors", dst / "model-00002-of-00002.safetensors").parent


def _fp8_base_with_nan_scale(dst: Path) -> Path:
    """A tiny block-scaled FP8 Qwen3-MoE checkpoint with a NaN in one expert's weight_scale_inv."""
    import torch
    from safetensors.torch import load_file, save_file

    from helpers_conformance import build_checkpoint
    from nexus.family import resolve_family

    from helpers_prepare import model_with_tokenizer

    model_with_tokenizer(build_checkpoint(resolve_family(name="qwen3_moe"), dst.parent / "fp8_src", fmt="fp8"), dst)
    tensors = load_file(dst / "model.safetensors")
    key = "model.layers.0.mlp.experts.3.gate_proj.weight_scale_inv"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _adapter_config_with(fx, dst: Path, edit) -> Path:
    """A copy of the shared adapter whose nexus_config.json went through ``edit(dict)``."""
    shutil.copytree(fx["adapter"], dst)
    cfg = json.loads((dst / "nexus_config.json").read_text())
    edit(cfg)
    (dst / "nexus_config.json").write_text(json.dumps(cfg))
    return dst


def _resume_on_changed_data(fx, work: Path) -> list:
    """A run stopped after one step in ``work``, then its --data edited in place: the resume command."""
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    data = _data_file(work, "changing.jsonl", fx["data"].read_bytes())
    args = _train(fx, work, **{"--data": data, "--max-steps": 2})
    train(TrainConfig(model=str(fx["base"]), adapter=str(fx["adapter"]), data=str(data), output=str(work / "run"),
                      seq_len=24, batch_size=2, max_steps=2, stop_after=1))
    data.write_bytes(data.read_bytes() + b'{"text": "one more document"}\n')
    return [*args, "--resume"]


NOT_WRITABLE = Path("/proc/nexus-not-writable")  # cannot be created, not even by root

CASES = {
    # corrupt or truncated safetensors
    "base truncated": lambda fx, w: _evaluate(fx, w, **{"--model": _truncated(fx["base"], w.parent / "b")}),
    "base corrupt header": lambda fx, w: _evaluate(fx, w, **{"--model": _garbage_header(fx["base"], w.parent / "b")}),
    "adapter truncated": lambda fx, w: _evaluate(fx, w, **{"--adapter": _truncated(fx["adapter"], w.parent / "a")}),
    "adapter corrupt header": lambda fx, w: _evaluate(fx, w, **{
        "--adapter": _garbage_header(fx["adapter"], w.parent / "a")}),
    "adapter missing weights": lambda fx, w: _evaluate(fx, w, **{
        "--adapter": _adapter_with(fx, w.parent / "a", _drop_one)}),
    "adapter mis-shaped weights": lambda fx, w: _evaluate(fx, w, **{
        "--adapter": _adapter_with(fx, w.parent / "a", _misshape)}),
    "adapter truncated (train)": lambda fx, w: _train(fx, w, **{
        "--adapter": _truncated(fx["adapter"], w.parent / "a")}),
    "base shard truncated (train --dequantize)": lambda fx, w: [*_train(fx, w, **{
        "--model": _sharded_truncated(fx, w.parent / "b")}), "--dequantize"],
    "base with a NaN FP8 scale (evaluate)": lambda fx, w: _evaluate(fx, w, **{
        "--model": _fp8_base_with_nan_scale(w.parent / "fp8"), "--adapter": None}),
    "adapter width disagrees with its tensors (export)": lambda fx, w: [
        "export", "--model", fx["base"], "--output", w / "exported", "--adapter",
        _adapter_config_with(fx, w.parent / "a", lambda c: c.update(shared_intermediate_size=16))],
    "adapter gate_mode disagrees with its tensors (evaluate)": lambda fx, w: _evaluate(fx, w, **{
        "--adapter": _adapter_config_with(fx, w.parent / "a", lambda c: c.update(gate_mode="none"))}),
    "resume on changed data (train)": _resume_on_changed_data,
    "stats truncated": lambda fx, w: ["select", "--stats", _truncated(fx["stats"], w.parent / "stats"),
                                      "--output", w / "selection.json"],
    "select on a file that is not statistics": lambda fx, w: ["select", "--stats", fx["data"],
                                                              "--output", w / "selection.json"],
    "convert given statistics JSON": lambda fx, w: ["convert", "--model", fx["base"], "--selection",
                                                    fx["stats"] / "router_stats.json", "--output", w / "adapter"],
    # data
    "data: invalid JSON line": lambda fx, w: _evaluate(fx, w, **{"--data": _data_file(
        w, "bad.jsonl", b'{"text": "fine"}\n{"text": "cut\n')}),
    "data: not UTF-8": lambda fx, w: _evaluate(fx, w, **{"--data": _data_file(
        w, "latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"))}),
    "data: text is a number": lambda fx, w: _evaluate(fx, w, **{"--data": _data_file(
        w, "num.jsonl", b'{"text": 123}\n')}),
    "data: invalid JSON line (train)": lambda fx, w: _train(fx, w, **{"--data": _data_file(
        w, "bad.jsonl", b'{"text": "fine"}\n{"text": "cut\n')}),
    "data: path does not exist": lambda fx, w: _evaluate(fx, w, **{"--data": w.parent / "missing" / "data.jsonl"}),
    "data: path does not exist (train)": lambda fx, w: _train(fx, w, **{"--data": w.parent / "missing.jsonl"}),
    "kd-data: path does not exist (train)": lambda fx, w: _train(fx, w, **{"--kd-data": w.parent / "missing.jsonl"}),
    "adapter: path does not exist (evaluate)": lambda fx, w: _evaluate(fx, w, **{"--adapter": w.parent / "none"}),
    "data: a document over the size limit": lambda fx, w: _evaluate(fx, w, **{"--data": _long_document(w)}),
    "data: a document over the size limit (train)": lambda fx, w: _train(fx, w, **{"--data": _long_document(w)}),
    "FP8 base of partial blocks, --dequantize (evaluate)": lambda fx, w: [*_evaluate(fx, w, **{
        "--model": _fp8_base_with_partial_blocks(w.parent / "fp8"), "--adapter": None}), "--dequantize"],
    # arguments
    "train --lr negative": lambda fx, w: _train(fx, w, **{"--lr": "-1e-3"}),
    "train --lr nan": lambda fx, w: _train(fx, w, **{"--lr": "nan"}),
    "train --allow-data-change without --resume": lambda fx, w: [*_train(fx, w), "--allow-data-change"],
    "train --experts-on host with --dequantize": lambda fx, w: [*_train(fx, w), "--experts-on", "host",
                                                                "--dequantize"],
    "train --packed-cache-bytes with --dequantize": lambda fx, w: [*_train(fx, w), "--packed-cache-bytes", "1000000",
                                                                   "--dequantize"],
    "train --packed-cache-bytes on a float base": lambda fx, w: [*_train(fx, w, **{"--model": fx["float_base"]}),
                                                                 "--packed-cache-bytes", "1000000"],
    "train --experts-on host on a float base": lambda fx, w: [*_train(fx, w, **{"--model": fx["float_base"]}),
                                                              "--experts-on", "host"],
    "generate --max-new-tokens 0": lambda fx, w: ["generate", "--model", fx["base"], "--prompt", "Hello",
                                                  "--max-new-tokens", "0"],
    "generate --temperature negative": lambda fx, w: ["generate", "--model", fx["base"], "--prompt", "Hello",
                                                      "--temperature", "-0.5"],
    "select --diversity nan": lambda fx, w: ["select", "--stats", fx["stats"], "--diversity", "nan",
                                             "--output", w / "selection.json"],
    "precompute without arguments": lambda fx, w: ["precompute"],
    # an adapter made for another family
    "adapter of another family (evaluate)": lambda fx, w: _evaluate(fx, w, **{"--adapter": fx["other_adapter"]}),
    "adapter of another family (train)": lambda fx, w: _train(fx, w, **{"--adapter": fx["other_adapter"]}),
    # output locations
    "train --output is a file": lambda fx, w: _train(fx, w, **{"--output": _a_file(w)}),
    "train --output not writable": lambda fx, w: _train(fx, w, **{"--output": NOT_WRITABLE / "run"}),
    "evaluate --output is a directory": lambda fx, w: _evaluate(fx, w, **{"--output": w}),
    "evaluate --output under a file": lambda fx, w: _evaluate(fx, w, **{"--output": _a_file(w) / "eval.json"}),
    "evaluate --output not writable": lambda fx, w: _evaluate(fx, w, **{"--output": NOT_WRITABLE / "eval.json"}),
    "plot: plots/ is a file": lambda fx, w: ["plot", _plot_run(fx, w, plots_file=True)],
    # an output over an input (copied into the work dir, so that it is seen untouched), refused even with --overwrite
    "convert --output is the base model": lambda fx, w: ["convert", "--model", _copy(fx["base"], w / "base"),
                                                         "--strategy", "mean_all", "--output", w / "base", "--overwrite"],
    "convert --output holds the selection": lambda fx, w: ["convert", "--model", fx["base"], "--selection",
                                                           _selection(fx, w / "selection.json"), "--output", w,
                                                           "--overwrite"],
    "convert --output exists, no --overwrite": lambda fx, w: ["convert", "--model", fx["base"], "--strategy", "mean_all",
                                                              "--output", _copy(fx["adapter"], w / "final")],
    "export --output holds the adapter": lambda fx, w: ["export", "--model", fx["base"], "--adapter",
                                                        _copy(fx["adapter"], w / "adapter"), "--output", w, "--overwrite"],
    "select --output is a file of the statistics": lambda fx, w: ["select", "--stats", _copy(fx["stats"], w / "stats"),
                                                                  "--output", w / "stats" / "router_stats.json"],
    "select --output in the base model": lambda fx, w: ["select", "--stats", fx["stats"],
                                                        "--output", fx["base"] / "config.json"],
    "evaluate --output in the base model": lambda fx, w: _evaluate(fx, w, **{
        "--model": _copy(fx["base"], w / "base"), "--output": w / "base" / "config.json"}),
    "train --output holds the adapter": lambda fx, w: [*_train(fx, w, **{
        "--adapter": _copy(fx["adapter"], w / "run" / "final"), "--output": w / "run"}), "--overwrite"],
    "run --output holds the data": lambda fx, w: ["run", "--model", fx["base"], "--data",
                                                  _copy(fx["data"], w / "data.jsonl"), "--output", w],
    "collect --output is the base model": lambda fx, w: ["collect", "--model", _copy(fx["base"], w / "base"), "--data",
                                                         fx["data"], "--output", w / "base", "--overwrite"],
    "precompute --output in the teacher": lambda fx, w: ["precompute", "--teacher", _copy(fx["base"], w / "base"),
                                                         "--data", fx["data"], "--output", w / "base" / "cache"],
    "plot: plots/ links to the run": lambda fx, w: ["plot", _plot_run(fx, w, plots_file=False, plots_link=True)],
}


def _copy(src: Path, dst: Path) -> Path:
    """A copy of the file or directory ``src`` at ``dst``."""
    if src.is_dir():
        return shutil.copytree(src, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return shutil.copy(src, dst)


def _selection(fx, path: Path) -> Path:
    result = _invoke("select", "--stats", fx["stats"], "--output", path, "--no-plots")
    assert result.exit_code == 0, result.output
    return path


def _plot_run(fx, work: Path, plots_file: bool, plots_link: bool = False) -> Path:
    run = work / "run"
    shutil.copytree(fx["run"], run)
    if plots_file:
        (run / "plots").write_text("a file where the plots would go\n")
    if plots_link:
        (run / "plots").symlink_to(run, target_is_directory=True)
    return run


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its size and, for small files, its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (p.stat().st_size, p.read_bytes() if p.is_file() and p.stat().st_size < 1 << 16 else None)
    return out


def assert_one_line_error(result) -> str:
    """A non-zero exit with exactly one ``Error:`` line, no traceback (click's usage hint may
    precede a usage error, exit status 2); returns the error line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    if result.exit_code == 2:
        lines = [ln for ln in lines if not ln.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(fx, tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    args = CASES[case](fx, work)
    before = _snapshot(work)
    result = _invoke(*args)
    assert_one_line_error(result)
    assert _snapshot(work) == before, f"{case}: the command wrote into {work}"
    assert not NOT_WRITABLE.exists()


def test_plot_skips_a_truncated_metrics_line_with_a_warning(fx, tmp_path):
    run = _plot_run(fx, tmp_path, plots_file=False)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # A corrupt line in the middle, and the half-written last line a killed run leaves.
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    result = _invoke("plot", run)  # the CLI's own log handler writes warnings into the output
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "loss.png").exists()
    warned = [ln for ln in result.output.splitlines() if ln.startswith("WARNING")]
    assert len(warned) == 2, result.output
    assert f"{metrics} line 2 " in warned[0] and f"{metrics} line 5 " in warned[1], warned


def test_load_model_expands_the_home_directory(fx, tmp_path, monkeypatch):
    from nexus.loading import load_config, load_model

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(fx["base"], target_is_directory=True)
    assert load_model("~/models/tiny").config.model_type == "gpt_oss"
    from nexus.errors import NexusError

    with pytest.raises(NexusError, match=str(tmp_path / "models" / "missing")):
        load_config("~/models/missing")
