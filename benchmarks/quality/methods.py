"""The adaptation methods compared by the benchmark, read from data, and how a baseline prepares a model.

Every method is one JSON file in :data:`VARIANTS_DIR` laid over ``defaults.json`` (nested
``convert``/``train`` objects are merged key by key), so adding a variant is adding a file:

- ``kind``: ``nexus`` (the product's convert + train stages), ``lora_experts``, ``lora_attention``
  or ``full_experts`` (the benchmark's baseline loop, :mod:`benchmarks.quality.trainer`).
- ``convert``: :class:`nexus.engines.convert_config.ConvertConfig` fields (``strategy``,
  ``gate_mode``, ``weighted``).
- ``train``: :class:`nexus.training.train_config.TrainConfig` fields (``kd_weight``,
  ``temperature``, ``train_routers``, ``sfa_beta``, ...); the baselines honour ``kd_weight``,
  ``temperature`` and ``sfa_beta``.
- ``width_fraction``: the shared expert's width as a fraction of a routed expert's.
- ``sfa_interval_frac``: SFA interval as a fraction of the steps (0: off).
- ``budget_of``: for LoRA, the NEXUS variant whose trainable count the rank is matched to;
  ``lora_alpha_ratio``: ``lora_alpha = ratio * r``.
- ``milestone``: part of ``--methods milestone``; ``about``: one line for the report.
- ``kd_on``: where the distillation terms are computed: ``domain`` (the default: on the domain
  batches) or ``general`` (on the general training text while CE stays on the domain batches:
  ``nexus train --kd-data`` for NEXUS, the same batches in the baselines' loop;
  ``train.kd_batch_size`` sets the rows of general text per step).
- ``curve``: a series label of the parameter-efficiency figure (variants with the same label
  form one line, ordered by trainable parameters).

The keys the benchmark sets for every run (paths, steps, batch, LR, schedule, seed) are not
accepted in a variant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from nexus.errors import NexusError

VARIANTS_DIR = Path(__file__).resolve().parent / "variants"
DEFAULTS_FILE = "defaults.json"
KINDS = ("nexus", "lora_experts", "lora_attention", "full_experts")
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Set by the benchmark for every run: a variant may not override them.
RESERVED_CONVERT = ("model", "selection", "output", "shared_intermediate_size", "seed")
RESERVED_TRAIN = ("model", "adapter", "output", "data", "tokenizer", "text_column", "seq_len", "batch_size",
                  "grad_accum", "max_steps", "lr", "warmup_steps", "schedule", "min_lr_ratio", "max_grad_norm",
                  "weight_decay", "sfa_interval", "save_every", "keep_last", "resume", "overwrite", "stop_after",
                  "log_every", "seed", "teacher", "kd_data")
KD_SOURCES = ("domain", "general")
# Keys that change how a method is shown, not how it trains: a cached run survives their edits.
PRESENTATION_KEYS = ("about", "milestone", "curve")


@dataclass(frozen=True)
class Method:
    """One compared method (a variant file over the defaults; see the module docstring).

    Attributes:
        name: row name in the tables (the file's stem).
        kind: one of :data:`KINDS`.
        about: one line for the report.
        milestone: part of ``--methods milestone``.
        width_fraction: shared-expert width / routed-expert width (NEXUS).
        budget_of: the NEXUS variant a LoRA rank is matched to.
        lora_alpha_ratio: ``lora_alpha = ratio * r``.
        sfa_interval_frac: SFA interval as a fraction of the steps (0: off).
        convert: ConvertConfig overrides; train: TrainConfig overrides.
        kd_on: ``domain`` or ``general``: the batches the distillation terms are computed on.
        curve: the parameter-efficiency series this variant is a point of, or None.
    """

    name: str
    kind: str
    about: str = ""
    milestone: bool = False
    width_fraction: float = 1.0
    budget_of: str | None = None
    lora_alpha_ratio: float = 2.0
    sfa_interval_frac: float = 0.0
    convert: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    kd_on: str = "domain"
    curve: str | None = None

    @property
    def needs_family(self) -> bool:
        return self.kind == "nexus"

    @property
    def init(self) -> str:
        return self.convert.get("strategy", "pca")

    @property
    def gate(self) -> str:
        return self.convert.get("gate_mode", "scalar")

    @property
    def kd_weight(self) -> float:
        return float(self.train.get("kd_weight", 0.0))

    def definition(self) -> dict:
        """The resolved variant as a JSON-able dict (what its runs are keyed by).

        ``kd_on`` and ``curve`` are left out at their defaults, so runs cached before the keys
        existed stay valid.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["kd_on"] == "domain":
            del out["kd_on"]
        if out["curve"] is None:
            del out["curve"]
        return out


def training_definition(definition: dict) -> dict:
    """``definition`` (:meth:`Method.definition`) without :data:`PRESENTATION_KEYS`."""
    return {k: v for k, v in definition.items() if k not in PRESENTATION_KEYS}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NexusError(f"variant file {path} is not readable JSON ({exc}); fix or remove it") from exc
    if not isinstance(doc, dict):
        raise NexusError(f"variant file {path} must hold a JSON object; fix it")
    return doc


def _check(name: str, doc: dict, path: Path) -> None:
    from nexus.engines.convert_config import ConvertConfig
    from nexus.training.train_config import TrainConfig

    known = {f.name for f in fields(Method)} - {"name"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise NexusError(f"variant {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if doc.get("kind") not in KINDS:
        raise NexusError(f"variant {path}: kind {doc.get('kind')!r} is not one of {', '.join(KINDS)}")
    sections = (("convert", ConvertConfig, RESERVED_CONVERT), ("train", TrainConfig, RESERVED_TRAIN))
    for section, cls, reserved in sections:
        allowed = {f.name for f in fields(cls)} - set(reserved)
        bad = sorted(set(doc.get(section) or {}) - allowed)
        if bad:
            raise NexusError(f"variant {path}: {section} key(s) {', '.join(bad)} cannot be set by a variant; "
                             f"allowed: {', '.join(sorted(allowed))}")
    kd_on = doc.get("kd_on", "domain")
    if kd_on not in KD_SOURCES:
        raise NexusError(f"variant {path}: kd_on {kd_on!r} is not one of {', '.join(KD_SOURCES)}")
    if not 0 < float(doc.get("width_fraction", 1.0)) <= 1:
        raise NexusError(f"variant {path}: width_fraction must be in (0, 1], got {doc['width_fraction']}")


def load_methods(directory: str | Path = VARIANTS_DIR) -> tuple[Method, ...]:
    """Every ``*.json`` variant of ``directory`` over its ``defaults.json``.

    :return: methods ordered by kind (:data:`KINDS`), then ``nexus`` first, then by name.
    :raises NexusError: a file is not valid JSON, has an unknown key or sets a reserved one, or a
        ``budget_of`` names no NEXUS variant.
    """
    directory = Path(directory)
    defaults_path = directory / DEFAULTS_FILE
    defaults = _read(defaults_path) if defaults_path.exists() else {}
    methods = []
    for path in sorted(directory.glob("*.json")):
        if path.name == DEFAULTS_FILE:
            continue
        doc = _merge(defaults, _read(path))
        _check(path.stem, doc, path)
        methods.append(Method(name=path.stem, **doc))
    names = {m.name: m for m in methods}
    for m in methods:
        if m.budget_of is not None and (m.budget_of not in names or names[m.budget_of].kind != "nexus"):
            raise NexusError(f"variant {m.name}: budget_of {m.budget_of!r} is not a NEXUS variant in {directory}")
    return tuple(sorted(methods, key=lambda m: (KINDS.index(m.kind), m.name != "nexus", m.name)))


METHODS: tuple[Method, ...] = load_methods()
METHODS_BY_NAME = {m.name: m for m in METHODS}
MILESTONE_METHODS = tuple(m.name for m in METHODS if m.milestone)


@dataclass
class Prepared:
    """A baseline model ready for the training loop.

    Attributes:
        model: what the loop calls (a PEFT model for LoRA).
        trainable: the parameters the optimizer updates.
        teacher: a zero-argument context-manager factory under which ``model`` computes the
            base model's outputs (self-distillation), or None.
        info: what the method built (rank, ...).
    """

    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    teacher: object = None
    info: dict = field(default_factory=dict)


def shared_width(method: Method, intermediate_size: int) -> int:
    """The shared-expert width of a NEXUS method: ``width_fraction`` of the routed expert width."""
    return max(1, int(round(intermediate_size * method.width_fraction)))


def nexus_budget(model, family, method: Method, width: int) -> int:
    """Trainable parameters of ``method`` on ``model`` (a fresh base; attached in place): the shared
    experts as :func:`nexus.shared_expert.attach_shared_experts` builds them, plus the routers when trained."""
    from nexus.shared_expert import attach_shared_experts, freeze_base

    blocks = attach_shared_experts(model, family, width, method.gate)
    routers = [family.router_capture(b).module for b in blocks] if method.train.get("train_routers") else []
    return sum(p.numel() for p in freeze_base(model, routers))


def prepare_lora(model, method: Method, rank: int) -> Prepared:
    """Wrap ``model`` in a PEFT LoRA of ``rank`` on the expert weights or attention projections."""
    from peft import LoraConfig, get_peft_model

    alpha = method.lora_alpha_ratio * rank
    if method.kind == "lora_experts":
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=EXPERT_TARGETS)
    else:
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION_TARGETS)
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Prepared(peft_model, trainable, peft_model.disable_adapter, {"rank": rank, "lora_alpha": alpha})


def prepare_full_experts(model) -> Prepared:
    """Train every routed expert tensor (weights and biases); everything else frozen."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".experts." in f".{name}")
        if p.requires_grad:
            trainable.append(p)
    model.eval()
    return Prepared(model, trainable, None, {})


def count_trainable(prepared: Prepared) -> int:
    """Trainable parameters (elements) of ``prepared``."""
    return sum(p.numel() for p in prepared.trainable)


def matched_rank(model_factory, method: Method, budget: int) -> tuple[int, int]:
    """The LoRA rank whose trainable count is closest to ``budget`` (counts are linear in r).

    :param model_factory: builds a fresh base model (random weights are fine).
    :return: ``(rank, trainable count at that rank)``.
    """
    c1 = count_trainable(prepare_lora(model_factory(), method, 1))
    c2 = count_trainable(prepare_lora(model_factory(), method, 2))
    slope, offset = c2 - c1, 2 * c1 - c2
    rank = max(1, int(round((budget - offset) / slope)))
    return rank, offset + slope * rank
