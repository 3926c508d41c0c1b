"""The adaptation methods compared by the benchmark and how each prepares a model for training.

Every method turns a freshly loaded base model into ``(model to call, trainable parameters,
self-teacher)``; the training loop (:mod:`benchmarks.quality.trainer`) is the same for all.

NEXUS variants change one factor at a time from ``nexus`` (PCA init, scalar gate, frozen
router, CE only, no SFA, shared expert as wide as a routed expert). The exception is
``nexus-init-zeros``: a zero down projection under a zero-initialised scalar gate is a saddle
with no gradient at all, so that variant uses the ``none`` gate.

Baselines: PEFT LoRA on the fused expert weights (``target_parameters``) and on the attention
projections, each at the rank whose trainable count is closest to a NEXUS budget, and full
fine-tuning of every routed expert (the upper reference; router frozen).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: row name in the tables.
        kind: ``nexus``, ``lora_experts``, ``lora_attention`` or ``full_experts``.
        init, gate, train_router, kd, sfa, small: NEXUS options (init strategy, gate mode,
            router trained, self-distillation on, SFA on, the smaller shared-expert budget).
        budget_of: for LoRA, the NEXUS method whose trainable count the rank is matched to.
        about: one line for the report.
    """

    name: str
    kind: str
    init: str = "pca"
    gate: str = "scalar"
    train_router: bool = False
    kd: bool = False
    sfa: bool = False
    small: bool = False
    budget_of: str | None = None
    about: str = ""

    @property
    def needs_family(self) -> bool:
        return self.kind == "nexus"


def _nexus(name: str, about: str, **kw) -> Method:
    return Method(name=name, kind="nexus", about=about, **kw)


METHODS: tuple[Method, ...] = (
    _nexus("nexus", "shared expert = mean of PCA-picked experts, scalar gate, frozen router, CE"),
    _nexus("nexus-init-random", "init: mean of K random experts", init="random"),
    _nexus("nexus-init-top1", "init: the most-used expert alone", init="top1"),
    _nexus("nexus-init-mean_all", "init: mean of all experts", init="mean_all"),
    _nexus("nexus-init-zeros", "init: zero down projection (gate none: zero x zero has no gradient)", init="zeros", gate="none"),
    _nexus("nexus-gate-none", "gate: plain add (the original NEXUS)", gate="none"),
    _nexus("nexus-gate-token", "gate: sigmoid(w.x) per token", gate="token"),
    _nexus("nexus-router", "routers trained too", train_router=True),
    _nexus("nexus-kd", "CE + self-distillation KL (teacher: adapter disabled)", kd=True),
    _nexus("nexus-sfa", "SFA: periodic averaging with the initial shared experts", sfa=True),
    _nexus("nexus-small", "shared expert at the smaller budget", small=True),
    Method("lora-experts", "lora_experts", budget_of="nexus", about="PEFT LoRA on the fused expert weights"),
    Method("lora-experts-small", "lora_experts", budget_of="nexus-small", about="PEFT LoRA on experts, smaller budget"),
    Method("lora-attention", "lora_attention", budget_of="nexus", about="PEFT LoRA on q/k/v/o projections"),
    Method("full-experts", "full_experts", about="full fine-tuning of every routed expert (upper reference)"),
)

METHODS_BY_NAME = {m.name: m for m in METHODS}
MILESTONE_METHODS = ("nexus", "nexus-init-mean_all", "lora-experts", "full-experts")


@dataclass
class Prepared:
    """A model ready for the training loop.

    Attributes:
        model: what the loop calls (a PEFT model for LoRA).
        trainable: the parameters the optimizer updates.
        teacher: a zero-argument context-manager factory under which ``model`` computes the
            base model's outputs (self-distillation), or None.
        info: what the method built (rank, shared width, selected experts, ...).
    """

    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    teacher: object = None
    info: dict = field(default_factory=dict)


def shared_width(method: Method, intermediate_size: int, small_fraction: float) -> int:
    """The shared-expert width of a NEXUS method: the expert width, or the small fraction of it."""
    return max(1, int(round(intermediate_size * small_fraction))) if method.small else intermediate_size


@contextlib.contextmanager
def base_routers(routers: list[torch.nn.Module], originals: list[list[torch.Tensor]]):
    """Temporarily put the original router weights back (a trained router's teacher)."""
    saved = [[p.detach().clone() for p in r.parameters()] for r in routers]
    with torch.no_grad():
        for r, orig in zip(routers, originals):
            for p, o in zip(r.parameters(), orig):
                p.copy_(o)
    try:
        yield
    finally:
        with torch.no_grad():
            for r, s in zip(routers, saved):
                for p, o in zip(r.parameters(), s):
                    p.copy_(o)


def prepare_nexus(model, family, method: Method, width: int, selection: dict[int, list[int]] | None, base_path=None) -> Prepared:
    """Attach and initialise shared experts, freeze the base (routers too unless trained).

    :param selection: experts per layer to average (see :mod:`benchmarks.quality.nexus_path`);
        None leaves the fresh initialisation (parameter counting only).
    """
    from benchmarks.quality import nexus_path
    from nexus.shared_expert import disable_shared_experts, freeze_base

    if selection is None:
        from nexus.shared_expert import attach_shared_experts

        blocks = attach_shared_experts(model, family, width, method.gate)
    else:
        blocks = nexus_path.convert(model, family, base_path, selection, width, method.gate)
    routers = [family.router_capture(b).module for b in blocks] if method.train_router else []
    trainable = freeze_base(model, routers)
    originals = [[p.detach().clone() for p in r.parameters()] for r in routers]

    def teacher():
        stack = contextlib.ExitStack()
        stack.enter_context(disable_shared_experts(model))
        if routers:
            stack.enter_context(base_routers(routers, originals))
        return stack

    info = {"shared_intermediate_size": width, "gate": method.gate, "init": method.init}
    if selection is not None:
        info["selected_experts"] = {str(k): v for k, v in selection.items()}
    return Prepared(model, trainable, teacher, info)


def prepare_lora(model, method: Method, rank: int, alpha_ratio: float) -> Prepared:
    """Wrap ``model`` in a PEFT LoRA of ``rank`` on the expert weights or attention projections."""
    from peft import LoraConfig, get_peft_model

    if method.kind == "lora_experts":
        cfg = LoraConfig(r=rank, lora_alpha=alpha_ratio * rank, target_modules=[], target_parameters=EXPERT_TARGETS)
    else:
        cfg = LoraConfig(r=rank, lora_alpha=alpha_ratio * rank, target_modules=ATTENTION_TARGETS)
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Prepared(peft_model, trainable, peft_model.disable_adapter, {"rank": rank, "lora_alpha": alpha_ratio * rank})


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


def matched_rank(model_factory, method: Method, budget: int, alpha_ratio: float) -> tuple[int, int]:
    """The LoRA rank whose trainable count is closest to ``budget`` (counts are linear in r).

    :param model_factory: builds a fresh base model (random weights are fine).
    :return: ``(rank, trainable count at that rank)``.
    """
    c1 = count_trainable(prepare_lora(model_factory(), method, 1, alpha_ratio))
    c2 = count_trainable(prepare_lora(model_factory(), method, 2, alpha_ratio))
    slope, offset = c2 - c1, 2 * c1 - c2
    rank = max(1, int(round((budget - offset) / slope)))
    return rank, offset + slope * rank
