"""``convert``: build an adapter whose shared experts start as averages of routed experts.

The base model is never loaded. Its config builds a model on the meta device (no memory) only
to locate the MoE blocks; each layer's experts are then read from the checkpoint on disk one
expert at a time through the family's ``read_experts`` hook (dequantising MXFP4 as needed) and
added into an fp32 running sum, so peak memory is about one expert plus one accumulator,
whatever the number of layers, experts or K. Each finished layer is saved to a work directory
beside the output (``.<output>.partial``), so an interrupted conversion resumes at the next layer;
the adapter is then assembled tensor by tensor into ``adapter_model.safetensors`` (a streaming
safetensors writer: the library's ``save_file`` would need every layer in memory at once).

Strategies (``K`` = the selection's experts per layer):

- ``pca``: the selected experts; weights their importance scores normalised to sum 1 with
  ``weighted``, else uniform.
- ``random``: K experts drawn uniformly without replacement (seeded), uniform weights; K is
  :func:`nexus.constants.default_top_k` without a selection.
- ``top1``: the single most important expert of the selection.
- ``mean_all``: all E experts, uniform weights.
- ``zeros``: the shared expert outputs exactly 0 (``down_proj`` weight and bias zero) but
  ``gate_proj``/``up_proj`` keep the module's seeded default initialisation, so it can learn
  (all-zero weights would get no gradient).

Width (``shared_intermediate_size`` N against the expert width I), one rule for every family:

- ``N == I``: the average as is.
- ``N < I``: keep the N intermediate units of the averaged expert with the largest
  ``|gate_j|^2 + |up_j|^2 + |down_:,j|^2`` (rows of gate/up, columns of down, with their
  biases), in their original order. The function changes: the dropped units' output is lost.
- ``N > I``: the first I units are the average; the extra units keep the module's seeded default
  initialisation in ``gate_proj``/``up_proj`` and get zero columns in ``down_proj``, so the
  function is unchanged and the new units still learn.

Gates (``gate_mode`` ``scalar``/``token``) start at zero, as :func:`nexus.shared_expert.attach_shared_experts`
builds them. The adapter has exactly the keys and config :func:`nexus.adapter.save_adapter`
writes (``<block path>.nexus_shared.{gate,up,down}_proj.{weight,bias}``,
``<block path>.nexus_shared_scale.weight``) and loads with :func:`nexus.adapter.load_adapter`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from nexus import __version__
from nexus.adapter import AdapterConfig
from nexus.constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_GATE_MODE,
    DEFAULT_STRATEGY,
    GATE_MODES,
    INIT_STRATEGIES,
    SHARED_MODULE_NAME,
    SHARED_SCALE_NAME,
)
from nexus.engines.convert_config import ConvertConfig
from nexus.errors import AdapterMismatchError, NexusError
from nexus.fingerprint import check_weights, config_fingerprint, fingerprint_tensor_names, weights_fingerprint
from nexus.io import atomic_dir, atomic_path, locks_output, refuse_output_over_inputs, write_json, write_safetensors

log = logging.getLogger(__name__)

NEEDS_SELECTION = ("pca", "top1")
_MANIFEST = "manifest.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def meta_model(config):
    """The ``*ForCausalLM`` of ``config`` built on the meta device: module tree and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_selection(selection: dict, config, blocks, strategy: str = DEFAULT_STRATEGY, weighted: bool = False) -> None:
    """Refuse a selection made for another model, or one that does not make sense for this one.

    Checks the base fingerprint; that the selection has exactly one entry per MoE layer of the
    model with its expert count; that every layer lists at least one expert, each id once and in
    ``0..E-1``; and that ``scores`` (used by ``weighted``) and ``importance`` (used by ``top1``)
    have the right lengths.

    :raises AdapterMismatchError: made for another base or MoE layout (both named).
    :raises NexusError: a malformed (e.g. hand-edited) selection: which layer, which ids, the valid range.
    """
    src = selection.get("_path") or "the selection"
    fp = config_fingerprint(config)
    if selection.get("base_fingerprint") != fp:
        raise AdapterMismatchError(
            f"the selection {selection.get('_path', '')} was made for base fingerprint "
            f"{selection.get('base_fingerprint')} ({selection.get('model_type') or '?'}), but the model has "
            f"fingerprint {fp} ({getattr(config, 'model_type', '?')}); run `nexus collect` and `nexus select` on this model"
        )
    moe = {b.layer: b for b in blocks}
    entries: dict[int, dict] = {}
    for x in selection["layers"]:
        layer = x.get("layer") if isinstance(x, dict) else None
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise NexusError(f"{src}: an entry of 'layers' has no integer 'layer' ({str(x)[:80]}); select again")
        if layer in entries:
            raise NexusError(f"{src}: layer {layer} appears twice in 'layers'; keep one entry per MoE layer")
        entries[layer] = x
    not_moe = sorted(set(entries) - set(moe))
    missing = sorted(set(moe) - set(entries))
    if not_moe or missing:
        what = ([f"layers {not_moe} are not MoE layers of this model"] if not_moe else []) + (
            [f"MoE layers {missing} have no entry"] if missing else [])
        raise AdapterMismatchError(f"{src}: {' and '.join(what)} (the model's MoE layers are {sorted(moe)}); "
                                   f"select again for this model")
    for layer, x in sorted(entries.items()):
        e = moe[layer].num_experts
        if x.get("num_experts", e) != e:
            raise AdapterMismatchError(f"{src}: layer {layer} was selected among {x.get('num_experts')} experts, but "
                                       f"the model's layer {layer} has {e}; select again for this model")
        ids = x.get("experts")
        where = f"{src}: layer {layer}"
        if not isinstance(ids, list) or not ids:
            raise NexusError(f"{where} lists no experts; give at least one expert id in 0..{e - 1}")
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < e]
        if bad:
            raise NexusError(f"{where} lists expert ids {bad} outside the valid range 0..{e - 1} ({e} experts)")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise NexusError(f"{where} lists experts {dup} more than once; give each expert id once")
        scores = x.get("scores")
        if strategy == "pca" and weighted and (not isinstance(scores, list) or len(scores) != len(ids)
                                              or not all(_is_number(v) for v in scores)):
            raise NexusError(f"{where}: --weighted needs one numeric score per expert ({len(ids)}) in 'scores'; "
                             f"fix the file or drop --weighted")
        imp = x.get("importance")
        if strategy == "top1" and (not isinstance(imp, list) or len(imp) != e or not all(_is_number(v) for v in imp)):
            raise NexusError(f"{where}: strategy top1 needs 'importance', one number per expert ({e}); select again")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plan_experts(blocks, strategy: str, selection: dict | None, weighted: bool, seed: int) -> dict[int, tuple[list[int], list[float]]]:
    """Which experts each layer averages, with which weights (summing to 1).

    :return: ``{layer: (expert ids, weights)}``; empty lists for ``zeros``.
    """
    from nexus.constants import default_top_k

    if strategy not in INIT_STRATEGIES:
        raise NexusError(f"unknown strategy {strategy!r}; choose one of {', '.join(INIT_STRATEGIES)}")
    if strategy in NEEDS_SELECTION and selection is None:
        raise NexusError(f"strategy {strategy!r} needs --selection (from `nexus select`)")
    chosen = {x["layer"]: x for x in selection["layers"]} if selection is not None else {}
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for b in blocks:
        sel = chosen.get(b.layer)
        if strategy == "zeros":
            ids = []
        elif strategy == "pca":
            ids = list(sel["experts"])
        elif strategy == "top1":
            imp = sel["importance"]
            ids = [max(range(len(imp)), key=lambda e: (imp[e], -e))]
        elif strategy == "mean_all":
            ids = list(range(b.num_experts))
        else:
            k = len(sel["experts"]) if sel is not None else default_top_k(b.num_experts)
            ids = torch.randperm(b.num_experts, generator=gen)[:k].tolist()
        if strategy == "pca" and weighted:
            scores = [max(0.0, float(s)) for s in sel["scores"]]
            total = sum(scores)
            weights = [s / total for s in scores] if total > 0 else [1.0 / len(ids)] * len(ids)
        else:
            weights = [1.0 / len(ids)] * len(ids) if ids else []
        plan[b.layer] = (ids, weights)
    return plan


def average_experts(family, reader, config, layer: int, ids: list[int], weights: list[float]):
    """``sum_j weights[j] * expert_{ids[j]}`` of one layer, read and added one expert at a time.

    :param reader: a :class:`nexus.checkpoint.CheckpointReader`, or a zero-argument callable
        opening one: then a fresh reader serves each expert and is closed after it, so the
        checkpoint pages it mapped leave the process's resident memory too.
    :return: :class:`nexus.types.ExpertWeights` with k = 1 (``gate[1, I, H]`` ...), fp32.
    """
    from nexus.checkpoint import CheckpointReader
    from nexus.types import ExpertWeights

    open_reader = (lambda: reader) if isinstance(reader, CheckpointReader) else reader
    acc: dict[str, torch.Tensor] = {}
    names = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
    for e, w in zip(ids, weights):
        ew = family.read_experts(open_reader(), config, layer, [e])
        for name in names:
            t = getattr(ew, name)
            if t is None:
                continue
            t = t[0].to(torch.float32)
            if name in acc:
                acc[name].add_(t, alpha=w)
            else:
                acc[name] = t.mul(w)
        del ew
    return ExpertWeights(**{n: acc[n].unsqueeze(0) for n in names if n in acc})


def _linear(module, name: str):
    sub = getattr(module, name, None)
    if sub is None or not hasattr(sub, "weight"):
        raise NexusError(f"the family's shared expert {type(module).__name__} has no {name} with a weight; "
                         f"nexus_build_shared_expert must return gate_proj/up_proj/down_proj linears")
    return sub


@torch.no_grad()
def fill_shared_expert(shared, avg, size: int) -> None:
    """Copy the averaged expert ``avg`` (k = 1) into ``shared`` at width ``size`` (the module
    docstring's width rule); ``avg`` None zeroes ``down_proj`` only (strategy ``zeros``)."""
    gate_l, up_l, down_l = (_linear(shared, n) for n in ("gate_proj", "up_proj", "down_proj"))
    if avg is None:
        down_l.weight.zero_()
        if down_l.bias is not None:
            down_l.bias.zero_()
        return
    gate, up, down = avg.gate[0], avg.up[0], avg.down[0]
    gb, ub, db = (None if t is None else t[0] for t in (avg.gate_bias, avg.up_bias, avg.down_bias))
    inter = gate.shape[0]
    if tuple(gate_l.weight.shape) != (size, gate.shape[1]) or tuple(down_l.weight.shape) != (down.shape[0], size):
        raise NexusError(
            f"the family's shared expert has gate_proj {tuple(gate_l.weight.shape)} / down_proj "
            f"{tuple(down_l.weight.shape)}, expected ({size}, {gate.shape[1]}) / ({down.shape[0]}, {size})"
        )
    if gb is not None and gate_l.bias is None:
        log.warning("the routed experts have biases but the family's shared expert has none; dropping them")
    if size < inter:
        score = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
        keep = torch.sort(torch.topk(score, size).indices).values
        gate, up, down = gate[keep], up[keep], down[:, keep]
        gb, ub = (None if t is None else t[keep] for t in (gb, ub))
    n = min(size, inter)
    if size == inter:  # take the averaged tensors over instead of copying them (one expert less)
        gate_l.weight.data, up_l.weight.data, down_l.weight.data = gate, up, down
    else:
        gate_l.weight[:n] = gate
        up_l.weight[:n] = up
        down_l.weight.zero_()
        down_l.weight[:, :n] = down
    for lin, b, rows in ((gate_l, gb, n), (up_l, ub, n), (down_l, db, None)):
        if lin.bias is None:
            continue
        if b is None:
            lin.bias.zero_()
        elif rows is None:
            lin.bias.copy_(b)
        else:
            lin.bias[:rows] = b


_COPIED = {f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")}


def _build(family, config, block, size: int, seed: int, every_value_copied: bool):
    """The family's shared expert, fp32. Its default initialisation is seeded by (seed, layer);
    when every value will be overwritten by the average it is built on the meta device and
    only allocated (no initialisation, and no second copy of an expert's size alive while the
    experts are being read)."""
    if every_value_copied:
        with torch.device("meta"):
            shared = family.build_shared_expert(config, block, size)
        names = {n for n, _ in shared.named_parameters()}
        if names <= _COPIED and not list(shared.buffers()):
            return shared.to_empty(device="cpu").to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + block.layer)
        return family.build_shared_expert(config, block, size).to(torch.float32)


def layer_tensors(family, reader, config, block, ids, weights, size: int, gate_mode: str, seed: int) -> dict[str, torch.Tensor]:
    """The adapter tensors of one block: its shared expert (and gate), keyed as in the adapted model."""
    from nexus.shared_expert import SharedScale

    avg = average_experts(family, reader, config, block.layer, ids, weights) if ids else None
    shared = _build(family, config, block, size, seed, every_value_copied=avg is not None and size <= avg.gate.shape[1])
    fill_shared_expert(shared, avg, size)
    del avg
    out = {f"{block.path}.{SHARED_MODULE_NAME}.{n}": p.detach() for n, p in shared.named_parameters()}
    if gate_mode != "none":
        scale = SharedScale(gate_mode, block.hidden_size)
        out.update({f"{block.path}.{SHARED_SCALE_NAME}.{n}": p.detach() for n, p in scale.named_parameters()})
    return out


def write_safetensors_streaming(path: str | Path, sources: list[tuple[str, Path]], metadata: dict | None = None) -> None:
    """Write a safetensors file whose tensors are copied one at a time from other safetensors
    files, so that at most one tensor is in memory; atomically.

    :param sources: ``(tensor name, file holding it)`` in the order to write.
    """
    header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, file in sources:
        with safe_open(file, framework="pt") as f:
            sl = f.get_slice(name)
            dtype, shape = sl.get_dtype(), list(sl.get_shape())
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, file in sources:
            with safe_open(file, framework="pt") as f:
                t = f.get_tensor(name).contiguous()
            out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            del t


def _workdir(output: Path, identity: dict) -> Path:
    work = output.with_name(f".{output.name}.partial")
    manifest = work / _MANIFEST
    try:
        if work.exists():
            old = json.loads(manifest.read_text()) if manifest.exists() else None
            if old == identity:
                return work
            log.info("discarding an unfinished conversion of other arguments in %s", work)
            shutil.rmtree(work)
        work.mkdir(parents=True)
    except OSError as exc:
        raise NexusError(f"cannot write {output}: {exc.strerror or exc}; choose a writable --output") from exc
    write_json(manifest, identity)
    return work


def _check_output(arguments: dict) -> None:
    """Refuse, before the lock and any work, an ``--output`` that is or holds an input (even with
    ``--overwrite``), or one that exists (and is not an empty directory) without ``--overwrite``."""
    from nexus.engines.select import selection_path

    config = arguments["config"]
    selection = config.selection.get("_path") if isinstance(config.selection, dict) else config.selection
    if selection is not None and (Path(selection).is_dir() or Path(selection).suffix != ".json"):
        selection = selection_path(selection)  # the file read, so that a run directory holding it stays usable
    refuse_output_over_inputs(config.output, {"--model": config.model, "--selection": selection})
    output = Path(config.output).expanduser()
    if output.exists() and not config.overwrite and not (output.is_dir() and not any(output.iterdir())):
        raise NexusError(f"{output} exists; pass --overwrite to replace it, or choose another --output")


@locks_output("config.output", before=_check_output)
def convert(config: ConvertConfig, family_name: str | None = None, *, progress: bool = True) -> Path:
    """Write an initialised adapter for the checkpoint at ``config.model`` into ``config.output``.

    ``config`` fields: ``model``, the base checkpoint directory (config.json + safetensors; MXFP4
    or float); ``output``, the adapter directory (replaced whole when the conversion succeeds; an
    existing one only with ``overwrite``, and never one that is or holds the model or the selection);
    ``selection``, an ``expert_selection.json`` (path or loaded document), needed by ``pca`` and
    ``top1``, used by ``random`` for K; ``strategy``, one of :data:`nexus.constants.INIT_STRATEGIES`
    (see the module docstring); ``gate_mode``, ``none``, ``scalar`` or ``token``;
    ``shared_intermediate_size``, the width N of each shared expert (default: the expert width);
    ``weighted``, ``pca`` only: weight experts by importance instead of uniformly; ``seed``, for
    ``random`` and for the default initialisation of units not copied from experts.

    :param family_name: ``--family``; default detected from the config.
    :return: ``config.output``.
    :raises NexusError: dense model, bad arguments, a selection made for another model, an
        unwritable output, an output that is or holds an input, an existing output without
        ``overwrite`` (nothing is left half-written).
    """
    model_path, output, selection, strategy = config.model, config.output, config.selection, config.strategy
    gate_mode, shared_intermediate_size = config.gate_mode, config.shared_intermediate_size
    weighted, seed = config.weighted, config.seed
    if not model_path:
        raise NexusError("convert needs --model")
    from nexus.checkpoint import CheckpointReader
    from nexus.engines.select import load_selection
    from nexus.family import resolve_family
    from nexus.loading import load_config
    from nexus.progress import progress_bar, showing

    gate_mode = gate_mode or DEFAULT_GATE_MODE
    if gate_mode not in GATE_MODES:
        raise NexusError(f"unknown gate mode {gate_mode!r}; choose one of {', '.join(GATE_MODES)}")
    if shared_intermediate_size is not None and shared_intermediate_size < 1:
        raise NexusError(f"--shared-intermediate-size must be positive, got {shared_intermediate_size}")
    config = load_config(model_path)  # from here on, the base's config
    family = resolve_family(config, name=family_name)
    skeleton = meta_model(config)
    blocks = family.moe_blocks(skeleton)
    if isinstance(selection, (str, Path)):
        selection = load_selection(selection)
    if selection is not None:
        check_selection(selection, config, blocks, strategy, weighted)
    plan = plan_experts(blocks, strategy, selection, weighted, seed)
    size = shared_intermediate_size or blocks[0].intermediate_size
    CheckpointReader(model_path)  # a clear error now for a directory without safetensors weights
    if selection is not None:
        check_weights(selection.get("base_weights_fingerprint", ""), selection.get("base_weights_tensors", []),
                      model_path, f"selection {selection.get('_path') or ''}".strip())
    weights_fp, weights_tensors = weights_fingerprint(model_path, fingerprint_tensor_names(skeleton, family, blocks))
    del skeleton
    reader = functools.partial(CheckpointReader, model_path)  # one per expert: see average_experts
    fp = config_fingerprint(config)
    args = {"strategy": strategy, "gate_mode": gate_mode, "shared_intermediate_size": size, "weighted": weighted,
            "seed": seed, "selection": selection.get("_path") if selection else None}
    identity = {"base_fingerprint": fp, "base_weights_fingerprint": weights_fp, "args": args,
                "plan": {str(k): v for k, v in plan.items()},
                "selection_sha256": selection.get("_sha256") if selection else None, "nexus_version": __version__}
    identity = json.loads(json.dumps(identity))  # as the manifest will read back (tuples -> lists)
    output = Path(output)
    work = _workdir(output, identity)

    todo = [b for b in blocks if not (work / f"layer-{b.layer}.safetensors").exists()]
    if len(todo) < len(blocks):
        log.info("resuming the conversion: %d of %d layers already done", len(blocks) - len(todo), len(blocks))
    bar = progress_bar(sum(max(1, len(plan[b.layer][0])) for b in todo), "convert", "expert", enabled=progress)
    with showing(bar):
        for block in todo:
            ids, weights = plan[block.layer]
            tensors = layer_tensors(family, reader, config, block, ids, weights, size, gate_mode, seed)
            write_safetensors(work / f"layer-{block.layer}.safetensors", tensors)
            del tensors
            bar.update(max(1, len(ids)))

    sources = []
    for block in blocks:
        file = work / f"layer-{block.layer}.safetensors"
        with safe_open(file, framework="pt") as f:
            sources += [(name, file) for name in f.keys()]
    init = {
        "strategy": strategy,
        "weighted": weighted,
        "experts": {str(k): v[0] for k, v in plan.items()},
        "weights": {str(k): v[1] for k, v in plan.items()},
        "selection": {"path": selection.get("_path"), "sha256": selection.get("_sha256"),
                      "args": selection.get("args")} if selection else None,
        "width_rule": "N<I: keep the N units of largest |gate|^2+|up|^2+|down|^2; N>I: extra units with zero down columns",
    }
    cfg = AdapterConfig(
        family=family.name, base_fingerprint=fp, shared_intermediate_size=size, gate_mode=gate_mode,
        base_weights_fingerprint=weights_fp, base_weights_tensors=weights_tensors,
        layers=[b.layer for b in blocks], base_model=str(model_path), model_type=getattr(config, "model_type", ""),
        init=init, args=args,
    )
    with atomic_dir(output) as tmp:
        write_safetensors_streaming(tmp / ADAPTER_WEIGHTS_NAME, sources, {"format": "pt", "nexus_version": __version__})
        write_json(tmp / ADAPTER_CONFIG_NAME, dataclasses.asdict(cfg))
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote a %s adapter (%s, %d layers, width %d) to %s", strategy, gate_mode, len(blocks), size, output)
    return output
