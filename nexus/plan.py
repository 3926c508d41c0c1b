"""``nexus plan``: will a training run fit? Memory per component, from the config and the safetensors headers.

No weight is read: the model is built on the meta device from ``config.json`` (parameter names,
shapes and dtypes exactly as ``nexus train`` loads them), the family says where the MoE blocks and
routed experts are, and the packed experts' bytes are the stored bytes of their tensors in the
safetensors headers (or, with only a ``config.json``, what the family's layout stores for them).
Each component follows the code it predicts:

- packed experts: the checkpoint's bytes of every layer's routed experts
  (:meth:`nexus.quant.packed_experts.PackedExperts.stored_bytes`); on the host with
  ``--experts-on host``, where the device holds two layers' at most (streaming buffers,
  :mod:`nexus.quant.streaming`);
- other weights: every other tensor of the model in the compute dtype (fp32 where the model keeps
  it so); the input embedding table on the host with ``--embeddings-on host``;
- adapter: one shared expert (and gate) per MoE layer, fp32 even under ``--bf16``; fp32 gradients;
- optimizer state: AdamW's two fp32 moments and a step per tensor, 8-bit AdamW's two byte
  moments and two fp32 absmax per block of 256 (tensors under 4,096 entries keep fp32 moments);
- loss workspace: ``chunk_tokens(vocab)`` tokens x vocabulary x :data:`LOSS_BYTES_PER_ENTRY`
  (:mod:`nexus.chunked_losses`);
- activations: what the student's decoder layers keep for backward (all layers, or under
  ``--gradient-checkpointing`` each layer's input, plus one recomputed layer in backward) and the
  teacher's and the student's final hidden states (coefficients calibrated below);
- decoded cache: the decoded experts ``--packed-cache-bytes`` keeps from forward to backward;
- teacher: none for ``self`` (the base, adapter off) or a teacher cache; a model directory's weights.

The forward, the loss and the backward never overlap, so the peak holds the largest of the three:
the forward's last layer computing (with the streaming buffers), the loss (activations + loss
workspace) or the backward (activations + streaming buffers). On a CPU
(``--device cpu``) everything is one memory, with the process itself (:data:`RUNTIME_BYTES`) and
the decode workspace of the packed experts; the weights the loader keeps mapped from the
checkpoint files are given apart (``details["file_backed_bytes"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from nexus.config_fields import option as _f
from nexus.config_fields import same_as
from nexus.engines.convert_config import ConvertConfig
from nexus.errors import NexusError
from nexus.training.train_config import TrainConfig

log = logging.getLogger(__name__)

GIB = 2**30

# Calibration. The coefficients below were fitted to the four peaks measured on an H200 by
# ``benchmarks/gpu_check.py`` (gpt-oss layout: H = I = 2880, 64 heads, vocabulary 201,088, 2
# layers, 1 x 1024 tokens, bf16, width 720; experts resident or on the host, with and without
# checkpointing: 4.34, 4.11, 3.55 and 3.55 GiB, reproduced within 1%); the CPU constants further
# down to the peak anonymous memory of ``benchmarks/bench_memory.py`` (within 10% of each run).
# Per decoder layer and token the student keeps ACT_SAVED_HIDDEN x H values of the compute dtype
# for backward (the packed experts and the shared expert keep only their inputs; most of the rest
# are views), and an eager attention
# (GPT-OSS: no sdpa with sinks) keeps its probabilities, heads x tokens x tokens, ATTN_SAVED times.
# A layer recomputed under gradient checkpointing holds what it keeps plus a working set of
# ACT_WORKING_HIDDEN x H values per token and ATTN_WORKING copies of the probabilities.
ACT_SAVED_HIDDEN = 4
ATTN_SAVED = 1
ACT_WORKING_HIDDEN = 4
ATTN_WORKING = 1
# While a layer's eager attention computes, its scores, their softmax and the copies in between
# are alive at once: ATTN_FORWARD_CPU copies of the probabilities on a CPU (fitted to the CPU peak at
# 2,048 tokens, where the forward, not the loss, sets it); on the H200 points the forward never
# set the peak, which bounds it at about ATTN_FORWARD there.
ATTN_FORWARD = 1
ATTN_FORWARD_CPU = 4
LOSS_BYTES_PER_ENTRY = 26
"""Bytes one (token, vocabulary entry) of a loss chunk costs: fp32 logits of student and teacher,
their log-softmaxes, the probabilities and the gradient (fitted as above;
:data:`nexus.chunked_losses.WORKSPACE_BYTES` sizes chunks with a margin above it)."""
RUNTIME_BYTES = 340 * 2**20
"""Host memory of a training process besides the model and the step: the interpreter, torch,
transformers, the tokenizer and data (measured on a CPU)."""
DECODE_COPIES = 4
"""On a CPU, the packed experts' decode holds this many times one chunk of decoded weights
(:data:`nexus.quant.packed_experts.DEFAULT_DECODE_BYTES`, or a whole layer's when smaller): the
unpacked codes, fp32 values and scales before the cast. Fitted to ``benchmarks/bench_memory.py``'s
CPU peaks on the gpt-oss layout (0.20 GiB beyond the tensors counted without checkpointing, 0.35
GiB with it, over repeated runs that differ by up to 0.2 GiB)."""
BNB_BLOCK = 256
BNB_MIN_8BIT = 4096

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I16": 2,
                "I32": 4, "I64": 8, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes of a memory size: ``24GiB``, ``80GB``, ``141G`` (binary), ``512MiB``, a plain byte count.

    :raises NexusError: naming ``flag`` and the value when it is not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise NexusError(f"{flag} {text!r} is not a memory size; write it like 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _train_field(name: str, **fallback):
    """``nexus train``'s option ``name`` (same default and help), or ``fallback`` where it has none."""
    if name in {f.name for f in dataclasses.fields(TrainConfig)}:
        return same_as(TrainConfig, name)
    return _f(**fallback)


@dataclass
class PlanConfig:
    """The options of ``nexus plan``: those of ``nexus train`` and ``nexus convert`` that change memory."""

    model: str = same_as(TrainConfig, "model", help="Base model checkpoint directory (config.json and the "
                                                    "safetensors index or headers are read; no weights).")
    adapter: str | None = same_as(TrainConfig, "adapter", help="Adapter directory (default: a new one of "
                                                               "--shared-intermediate-size and --gate-mode).",
                                  required=False)
    gpu_memory: str | None = _f(None, "Memory of one compute device, e.g. 24GiB, 80GB (default: no verdict).")
    host_memory: str | None = _f(None, "Host memory, e.g. 128GiB (default: no verdict on the host).")
    device: str = _f("cuda", "The compute device planned for: cuda (device memory apart from host memory) or cpu "
                     "(one memory, including the process's own).", choices=("cuda", "cpu"))
    json: bool = _f(False, "Print the plan as JSON.")
    shared_intermediate_size: int | None = same_as(ConvertConfig, "shared_intermediate_size")
    gate_mode: str = same_as(ConvertConfig, "gate_mode")
    teacher: str = same_as(TrainConfig, "teacher")
    seq_len: int = same_as(TrainConfig, "seq_len")
    batch_size: int = same_as(TrainConfig, "batch_size")
    kd_batch_size: int | None = same_as(TrainConfig, "kd_batch_size")
    gradient_checkpointing: bool = same_as(TrainConfig, "gradient_checkpointing")
    loss_chunk_tokens: int = same_as(TrainConfig, "loss_chunk_tokens")
    bf16: bool = same_as(TrainConfig, "bf16")
    dequantize: bool = same_as(TrainConfig, "dequantize")
    experts_on: str = same_as(TrainConfig, "experts_on")
    train_routers: bool = same_as(TrainConfig, "train_routers")
    train_native_shared: bool = same_as(TrainConfig, "train_native_shared")
    optim: str = _train_field("optim", default="adamw", help="Optimizer: adamw or adamw8bit.",
                              choices=("adamw", "adamw8bit"))
    packed_cache_bytes: int = _train_field("packed_cache_bytes", default=0, help="Bytes of decoded routed experts "
                                           "the forward may keep for its backward.")
    embeddings_on: str = _train_field("embeddings_on", default="device", help="Where the input embedding table "
                                      "lives: device or host.", choices=("device", "host"))

    def __post_init__(self):
        for name, low in (("seq_len", 2), ("batch_size", 1), ("loss_chunk_tokens", 0), ("packed_cache_bytes", 0),
                          ("kd_batch_size", 1)):
            if getattr(self, name) is None:
                continue
            if getattr(self, name) < low:
                raise NexusError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name, allowed in (("experts_on", ("device", "host")), ("optim", ("adamw", "adamw8bit")),
                              ("embeddings_on", ("device", "host")), ("device", ("cuda", "cpu"))):
            if getattr(self, name) not in allowed:
                raise NexusError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.experts_on == "host" and self.dequantize:
            raise NexusError("--experts-on host streams the routed experts kept packed, and --dequantize loads "
                             "them as floats instead: give only one")
        self.gpu_bytes = None if self.gpu_memory is None else parse_memory(self.gpu_memory)
        self.host_bytes = None if self.host_memory is None else parse_memory(self.host_memory, "--host-memory")


@dataclass
class Plan:
    """A plan's figures: ``components`` maps a name to ``{"device": bytes, "host": bytes, "note": str}``."""

    config: PlanConfig
    components: dict
    device_bytes: int
    host_bytes: int
    fits: bool | None
    suggestion: str | None = None
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON document of ``nexus plan --json``."""
        options = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "json"}
        return {"options": options, "components": self.components, "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes, "device_gib": self.device_bytes / GIB,
                "host_gib": self.host_bytes / GIB, "fits": self.fits, "suggestion": self.suggestion,
                "details": self.details}


def read_headers(path: str | Path) -> dict[str, tuple[str, list[int], int]]:
    """``name -> (dtype, shape, bytes)`` of every tensor of a checkpoint directory, from the safetensors
    headers alone (the first 8 bytes and the JSON header of each file; the data is never read).

    :return: an empty dict when the directory holds no safetensors file (a config alone).
    :raises NexusError: a file whose header is unreadable, naming it.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else (
        [p.name for p in sorted(path.glob("*.safetensors"))])
    out = {}
    for name in files:
        file = path / name
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise NexusError(f"{file}: cannot read its safetensors header ({exc}); download the checkpoint again"
                             ) from exc
        for key, info in header.items():
            if key != "__metadata__":
                start, stop = info["data_offsets"]
                out[key] = (info["dtype"], info["shape"], stop - start)
    return out


def _meta_model(config, dtype):
    """The ``*ForCausalLM`` of ``config`` on the meta device (no memory), as ``nexus train`` builds it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _formula_bytes(fmt: str, out: int, inp: int, block: tuple[int, int]) -> int:
    """Stored bytes of one expert matrix ``[out, in]``: MXFP4 (16 bytes + 1 scale per 32 values) or FP8
    (1 byte per value + an fp32 scale per block)."""
    if fmt == "mxfp4":
        return out * inp // 32 * 17
    return out * inp + 4 * math.ceil(out / block[0]) * math.ceil(inp / block[1])


def _packed_layer_bytes(headers, layout, fmt: str, block, layer: int, E: int, H: int, I: int) -> int:
    """Stored bytes of one MoE layer's routed experts: from the headers when the checkpoint has them,
    else from the format (MXFP4 blocks + scales; FP8 weights + fp32 block scales)."""
    from nexus.quant.fp8 import SCALE_SUFFIX
    from nexus.quant.packed_loading import _names

    names = []
    if fmt == "mxfp4":
        for n in (*_names(layout.gate_up, layer), *_names(layout.down, layer)):
            names += [f"{n}_blocks", f"{n}_scales"]
    elif layout.per_expert:
        names = [t.format(layer=layer, e=e) + s for t in layout.per_expert for e in range(E)
                 for s in ("", SCALE_SUFFIX)]
    else:
        names = [n + s for n in (_names(layout.gate_up, layer)[0], _names(layout.down, layer)[0])
                 for s in ("", SCALE_SUFFIX)]
    if any(n in headers for n in names):
        # FP8 scales are held as fp32 whatever they are stored as.
        return sum(headers[n][2] if not n.endswith(SCALE_SUFFIX) else headers[n][2] // _DTYPE_BYTES[headers[n][0]] * 4
                   for n in names if n in headers)
    return E * (2 * _formula_bytes(fmt, I, H, block) + _formula_bytes(fmt, H, I, block))


def _weights(path: str, family_name: str | None, config_obj, cfg: PlanConfig) -> dict:
    """Bytes of one model's weights as loaded: packed experts (per layer), everything else, the
    input embedding table; and the meta model, family and blocks for the rest of the plan."""
    import torch

    from nexus.family import resolve_family
    from nexus.quant.fp8 import block_size
    from nexus.quant.packed_loading import PACKED_METHODS, _load_dtype, quant_method

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    family = resolve_family(config_obj, name=family_name)
    qc = getattr(config_obj, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    method = quant_method({"quantization_config": qc}) if qc else None
    model = _meta_model(config_obj, dtype)
    blocks = family.moe_blocks(model)
    layout = family.expert_layout()
    packed = (method in PACKED_METHODS and not cfg.dequantize and layout is not None
              and method in layout.packed_formats and layout.packed_module is not None and not layout.flat)
    headers = read_headers(path)
    if not headers:
        log.debug("%s holds no safetensors files: the packed experts' bytes follow the family's layout", path)
    block = block_size(qc, str(Path(path) / "config.json")) if packed and method == "fp8" else (128, 128)
    packed_layers, skip = {}, set()
    if packed:
        for b in blocks:
            packed_layers[b.layer] = _packed_layer_bytes(headers, layout, method, block, b.layer, b.num_experts,
                                                         b.hidden_size, b.intermediate_size)
            experts = b.module.get_submodule(layout.packed_module)
            prefix = f"{b.path}.{layout.packed_module}."
            skip |= {prefix + n for n, _ in experts.named_parameters() if "bias" not in n}  # biases stay as floats
    other = mapped = 0
    # On a CPU the packed loader keeps a tensor read in its stored dtype mapped from the safetensors
    # file (file-backed pages, not anonymous memory): MXFP4 experts, and floats stored as loaded.
    stored_as = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in skip:
            nbytes = t.numel() * (_load_dtype(model, name, t, dtype) if t.is_floating_point() else t.dtype).itemsize
            other += nbytes
            header = headers.get(name)
            if packed and header and header[0] == stored_as.get(_load_dtype(model, name, t, dtype)):
                mapped += nbytes
    if packed and method == "mxfp4":
        mapped += sum(packed_layers.values())
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    return {"model": model, "family": family, "blocks": blocks, "packed": packed_layers,
            "format": method if packed else None, "other": other,
            "embedding": 0 if tied else emb.numel() * dtype.itemsize, "from_headers": bool(headers), "mapped": mapped}


def _adapter(weights: dict, cfg: PlanConfig) -> tuple[list[int], int, str]:
    """Trainable tensors' sizes (entries), the shared expert width and the gate mode."""
    import torch

    from nexus.shared_expert import SharedScale, native_shared_modules, router_parameters

    width, gate_mode = cfg.shared_intermediate_size, cfg.gate_mode
    if cfg.adapter:
        from nexus.adapter import read_adapter_config

        adapter_cfg = read_adapter_config(cfg.adapter)
        width, gate_mode = adapter_cfg.shared_intermediate_size, adapter_cfg.gate_mode
    model, family, blocks = weights["model"], weights["family"], weights["blocks"]
    sizes = []
    with torch.device("meta"):
        for b in blocks:
            mlp = family.build_shared_expert(model.config, b, width or b.intermediate_size)
            sizes += [p.numel() for p in mlp.parameters()]
            if gate_mode != "none":
                sizes += [p.numel() for p in SharedScale(gate_mode, b.hidden_size).parameters()]
    if cfg.train_routers:
        sizes += [p.numel() for p in router_parameters(model, family, blocks).values()]
    if cfg.train_native_shared:  # fp32 copies; the base's own are kept for the self teacher
        sizes += [p.numel() for m in native_shared_modules(blocks) for p in m.parameters()]
    return sizes, width or (blocks[0].intermediate_size if blocks else 0), gate_mode


def optimizer_bytes(sizes: list[int], optim: str) -> int:
    """Optimizer state of trainable tensors of ``sizes`` entries (:mod:`nexus.training.optimizers`):
    AdamW's fp32 ``exp_avg`` and ``exp_avg_sq`` and an fp32 ``step`` per tensor; 8-bit AdamW's two
    byte moments and two fp32 absmax per block of 256 for tensors of 4,096 entries or more (smaller
    ones keep two fp32 moments), and its two 256-entry fp32 code books, shared by all tensors."""
    if optim != "adamw8bit":
        return sum(8 * n + 4 for n in sizes)
    big = [n for n in sizes if n >= BNB_MIN_8BIT]
    return (sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) for n in big) + (2 * 256 * 4 if big else 0)
            + sum(8 * n for n in sizes if n < BNB_MIN_8BIT))


def _activations(weights: dict, cfg: PlanConfig) -> dict:
    """Activation bytes of the step: ``at_loss`` (what the student keeps for backward while the
    loss runs, with the teacher's and the student's final hidden states, fp32) and ``at_backward``
    (the most the backward holds: everything kept, or under checkpointing the layer inputs and one
    recomputed layer)."""
    import torch

    c = weights["model"].config
    H, layers = c.hidden_size, c.num_hidden_layers
    heads = getattr(c, "num_attention_heads", 0)
    tokens, T = cfg.batch_size * cfg.seq_len, cfg.seq_len
    nbytes = (torch.bfloat16 if cfg.bf16 else torch.float32).itemsize
    eager = getattr(c, "_attn_implementation", "eager") == "eager"
    probs = cfg.batch_size * heads * T * T * nbytes if eager else 0
    layer = tokens * ACT_SAVED_HIDDEN * H * nbytes + ATTN_SAVED * probs
    recompute = layer + tokens * ACT_WORKING_HIDDEN * H * nbytes + ATTN_WORKING * probs
    hidden = 2 * tokens * H * 4
    inputs = layers * tokens * H * nbytes
    # The student's last layer computing, the teacher's final hidden states already made.
    computing = (tokens * ACT_WORKING_HIDDEN * H * nbytes + hidden // 2
                 + (ATTN_FORWARD_CPU if cfg.device == "cpu" else ATTN_FORWARD) * probs)
    if cfg.gradient_checkpointing:
        return {"at_loss": inputs + hidden, "at_backward": inputs + recompute, "at_forward": inputs + computing,
                "eager_attention": eager}
    return {"at_loss": layers * layer + hidden, "at_backward": layers * layer,
            "at_forward": (layers - 1) * layer + computing, "eager_attention": eager}


def decoded_cache_bytes(weights: dict, cfg: PlanConfig) -> int:
    """Decoded experts the forward keeps for the backward under ``--packed-cache-bytes``
    (:func:`nexus.quant.packed_experts.set_reuse_bytes`): layers in forward order keep all their
    experts' ``3 x H x I`` values in the compute dtype when they fit what earlier layers left (every
    expert counted as hit: an upper bound for short steps)."""
    import torch

    if not weights["packed"] or not cfg.packed_cache_bytes:
        return 0
    nbytes = (torch.bfloat16 if cfg.bf16 else torch.float32).itemsize
    kept, left = 0, cfg.packed_cache_bytes
    for b in weights["blocks"]:
        layer = 3 * b.num_experts * b.hidden_size * b.intermediate_size * nbytes
        if layer <= left:
            kept, left = kept + layer, left - layer
    return kept


def _is_teacher_model(teacher: str) -> bool:
    from nexus.teacher_cache import is_teacher_cache

    return teacher != "self" and not is_teacher_cache(teacher)


def plan(cfg: PlanConfig, family: str | None = None, suggest_change: bool = True) -> Plan:
    """Memory of a ``nexus train`` step with ``cfg``'s options, per component; whether it fits.

    :param family: the family name (default: detected from ``config.model_type``).
    :param suggest_change: when it does not fit, search for the cheapest change that does (:func:`suggest`).
    :raises NexusError: the model directory has no readable config.json, or the family is unknown.
    """
    from nexus.chunked_losses import chunk_tokens
    from nexus.loading import load_config

    weights = _weights(cfg.model, family, load_config(cfg.model), cfg)
    model = weights["model"]
    sizes, width, gate_mode = _adapter(weights, cfg)
    n_train = sum(sizes)
    packed_total = sum(weights["packed"].values())
    if cfg.experts_on == "host" and not packed_total:
        from nexus.quant.streaming import nothing_to_stream

        raise nothing_to_stream(cfg.model)
    host_experts = cfg.experts_on == "host"
    host_emb = cfg.embeddings_on == "host" and weights["embedding"] > 0
    vocab = model.config.vocab_size
    # With --kd-data each stream's forward and backward run in turn: the larger batch sets the peak.
    step_cfg = dataclasses.replace(cfg, batch_size=max(cfg.batch_size, cfg.kd_batch_size or 0))
    tokens = step_cfg.batch_size * cfg.seq_len
    chunk = min(chunk_tokens(vocab, cfg.loss_chunk_tokens), tokens)
    workspace = chunk * vocab * LOSS_BYTES_PER_ENTRY
    act = _activations(weights, step_cfg)
    buffers = 2 * max(weights["packed"].values()) if host_experts else 0
    teacher = teacher_host = 0
    if _is_teacher_model(cfg.teacher):  # a quantised teacher streams its experts too (run_inputs.build_teacher)
        t = _weights(cfg.teacher, None, load_config(cfg.teacher), dataclasses.replace(cfg, experts_on="device"))
        t_packed = sum(t["packed"].values())
        teacher, teacher_host = (t["other"], t_packed) if host_experts and t_packed else (t["other"] + t_packed, 0)
    other = weights["other"] - (weights["embedding"] if host_emb else 0)

    def row(device: int, host: int = 0, note: str = "") -> dict:
        return {"device": int(device), "host": int(host), "note": note}

    layers = sorted(weights["packed"])
    components = {
        "packed experts": row(0 if host_experts else packed_total, packed_total if host_experts else 0,
                              f"{weights['format']}, {len(layers)} MoE layers" if layers else "none kept packed"),
        "other weights": row(other, weights["embedding"] if host_emb else 0,
                             "bf16" if cfg.bf16 else "fp32"),
        "adapter": row(4 * n_train, 0, f"{n_train:,} fp32 parameters (width {width}, gate {gate_mode})"),
        "gradients": row(4 * n_train, 0, "fp32"),
        "optimizer state": row(optimizer_bytes(sizes, cfg.optim), 0, cfg.optim),
        "activations": row(act["at_loss"], 0,
                           ("checkpointed" if cfg.gradient_checkpointing else "all layers kept")
                           + (", eager attention" if act["eager_attention"] else "")),
        "loss workspace": row(workspace, 0, f"{chunk} tokens x {vocab:,}"),
        "streaming buffers": row(buffers, 0, "two MoE layers' experts" if buffers else "none"),
        "teacher": row(teacher, teacher_host, "self: no weights" if cfg.teacher == "self" else (
            "model weights" if teacher else "cache: none")),
    }
    cache = decoded_cache_bytes(weights, cfg)
    if cache:  # kept from the forward to the backward: at the loss and the backward alike
        components["decoded cache"] = row(cache, 0, f"decoded experts kept for the backward "
                                                    f"(--packed-cache-bytes {cfg.packed_cache_bytes})")
    # The forward, the loss and the backward never overlap: the peak holds the largest of the three.
    phases = {"loss": act["at_loss"] + workspace, "backward": act["at_backward"] + buffers,
              "forward": act["at_forward"] + buffers}
    peak = max(phases, key=lambda k: (phases[k], k == "loss"))
    if peak == "loss":
        components["streaming buffers"]["device"] = 0
        components["streaming buffers"]["note"] += " (not at the peak: the loss is)" if buffers else ""
    else:
        components["activations"]["device"] = act[f"at_{peak}"]
        components["activations"]["note"] += f", at the {peak} (the peak)"
        components["loss workspace"]["device"] = 0
        components["loss workspace"]["note"] += f" (not at the peak: the {peak} is)"
    if cfg.device == "cpu":  # one memory: everything on the host, with the process itself
        for r in components.values():
            r["device"], r["host"] = r["device"] + r["host"], 0
        components["streaming buffers"]["device"] = 0
        if packed_total:
            from nexus.quant.packed_experts import DEFAULT_DECODE_BYTES

            decoded = max(3 * b.num_experts * b.hidden_size * b.intermediate_size for b in weights["blocks"])
            chunk_bytes = min(DEFAULT_DECODE_BYTES, decoded * (2 if cfg.bf16 else 4))
            components["packed decode"] = row(DECODE_COPIES * chunk_bytes, 0, "one chunk of decoded experts")
        components["runtime"] = row(RUNTIME_BYTES, 0, "interpreter, torch, transformers, data")
    device_total = sum(r["device"] for r in components.values())
    host_total = sum(r["host"] for r in components.values())
    fits = _fits(cfg, device_total, host_total)
    details = {"vocab": vocab, "chunk_tokens": chunk, "tokens": tokens, "trainable_parameters": n_train,
               "packed_bytes_per_layer": weights["packed"], "streaming_buffers": buffers,
               "loss_workspace": workspace, "peak_phase": peak,
               "from_headers": weights["from_headers"],
               "file_backed_bytes": weights["mapped"] if cfg.device == "cpu" else 0,
               "family": weights["family"].name}
    result = Plan(cfg, components, device_total, host_total, fits, details=details)
    if fits is False and suggest_change:
        result.suggestion = suggest(cfg, family)
    return result


def _fits(cfg: PlanConfig, device: int, host: int) -> bool | None:
    if cfg.gpu_bytes is None and cfg.host_bytes is None:
        return None
    if cfg.device == "cpu":  # one memory: --host-memory (or --gpu-memory) holds it all
        return device + host <= (cfg.host_bytes if cfg.host_bytes is not None else cfg.gpu_bytes)
    ok = True
    if cfg.gpu_bytes is not None:
        ok = ok and device <= cfg.gpu_bytes
    if cfg.host_bytes is not None:
        ok = ok and host <= cfg.host_bytes
    return ok


# Single changes in order of cost to the step's speed (H200: host experts ~7% slower, checkpointing ~25%).
_CHANGES = (("optim", "adamw8bit", "--optim adamw8bit"), ("experts_on", "host", "--experts-on host"),
            ("embeddings_on", "host", "--embeddings-on host"),
            ("gradient_checkpointing", True, "--gradient-checkpointing"))


def suggest(cfg: PlanConfig, family: str | None = None) -> str:
    """The cheapest change that makes ``cfg`` fit: one option, then smaller batches, then options together."""
    def fits(c):
        p = plan(dataclasses.replace(c, gpu_memory=cfg.gpu_memory, host_memory=cfg.host_memory), family, False)
        return p.fits

    candidates = [(f, v, flag) for f, v, flag in _CHANGES if getattr(cfg, f) != v]
    for field_name, value, flag in candidates:
        try:
            if fits(dataclasses.replace(cfg, **{field_name: value})):
                return flag
        except NexusError:
            continue
    batch = cfg.batch_size // 2
    while batch >= 1:
        if fits(dataclasses.replace(cfg, batch_size=batch)):
            return f"--batch-size {batch}"
        batch //= 2
    changed, flags = cfg, []
    for field_name, value, flag in candidates:
        try:
            trial = dataclasses.replace(changed, **{field_name: value})
            ok = fits(trial)
        except NexusError:  # an option this model refuses (--experts-on host with nothing packed)
            continue
        changed, flags = trial, flags + [flag]
        if ok:
            return " ".join(flags)
    for batch in (cfg.batch_size // 2, 1):
        if batch >= 1 and fits(dataclasses.replace(changed, batch_size=batch)):
            return " ".join(flags + [f"--batch-size {batch}"])
    return "none of " + ", ".join(flag for _, _, flag in _CHANGES) + " or --batch-size 1 fits; shorten --seq-len"
