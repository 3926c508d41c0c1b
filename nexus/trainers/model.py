"""``NexusModel``: a base model with NEXUS shared experts, wearing PEFT's habits.

The wrapper subclasses :class:`peft.PeftModel` so that every library that asks
``isinstance(model, PeftModel)`` (transformers' ``Trainer``, accelerate, TRL) treats it as an
adapter model: ``Trainer`` saves checkpoints through :meth:`NexusModel.save_pretrained` (the
adapter only) and resumes through :meth:`NexusModel.load_adapter`; TRL's ``DPOTrainer`` takes the
reference log-probabilities with the adapter switched off. PEFT's own ``__init__`` is not run:
NEXUS is not a PEFT tuner (see docs/trainers.md), every ``PeftModel`` method those libraries call
is implemented here on top of :mod:`nexus.shared_expert` and :mod:`nexus.adapter`.

Layout, as PEFT's: ``NexusModel.base_model`` is a thin module whose ``model`` is the transformers
model carrying the shared experts; :meth:`NexusModel.get_base_model` returns that model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from nexus.errors import NexusError

try:
    from peft import PeftModel
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise NexusError("the trainer integration needs peft: pip install 'nexus-moe[trainers]'") from exc

from nexus.adapter import (AdapterConfig, adapter_state_dict, check_base, read_adapter_config, read_adapter_tensors,
                           save_adapter)
from nexus.errors import AdapterMismatchError
from nexus.fingerprint import config_fingerprint
from nexus.shared_expert import attach_shared_experts, disable_shared_experts, freeze_base, is_shared_parameter
from nexus.trainers.config import NexusConfig

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"


class _BaseModelHolder(nn.Module):
    """PEFT's nesting (``peft_model.base_model.model``) so that code written for PEFT finds the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def source_checkpoint(model: nn.Module) -> Path | None:
    """The checkpoint directory ``model`` was loaded from, when it is a local one (else None)."""
    for candidate in (getattr(model, "_nexus_source", None), getattr(model.config, "_name_or_path", None)):
        if candidate and (Path(candidate).expanduser() / "config.json").exists():
            return Path(candidate).expanduser()
    return None


def _router_parameters(model: nn.Module, family, blocks) -> dict[str, nn.Parameter]:
    ids = {id(p) for b in blocks for p in family.router_capture(b).module.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _load_tensors_in_place(model: nn.Module, path: Path, config: AdapterConfig) -> None:
    """Copy the adapter tensors at ``path`` into ``model``'s attached shared experts (and base keys)."""
    tensors = read_adapter_tensors(path, config)
    expected = adapter_state_dict(model, config.base_keys)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise NexusError(f"adapter {path} does not fit the wrapped model (missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]}); load it with NexusModel.from_pretrained on a fresh base model")
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise NexusError(f"adapter {path}: {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(params[name].shape)}; it was made with another shared width or gate")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


class NexusModel(PeftModel):
    """A transformers causal LM with one trainable NEXUS shared expert per MoE block.

    Build it with :func:`get_nexus_model` or :meth:`from_pretrained`; hand it to ``Trainer``,
    ``SFTTrainer`` or ``DPOTrainer`` unchanged. ``forward``/``generate`` are the base model's
    (``input_ids: Tensor[B, S]`` -> ``logits: Tensor[B, S, V]``) with the shared experts active.
    """

    def __init__(self, model: nn.Module, config: NexusConfig, adapter_config: AdapterConfig, family,
                 router_originals: dict[str, torch.Tensor] | None = None, is_trainable: bool = True):
        nn.Module.__init__(self)
        self.base_model = _BaseModelHolder(model)
        self.nexus_config = config
        self.adapter_config = adapter_config
        self.family = family
        self.special_peft_forward_args = set()
        self._router_originals = router_originals or {}
        # Adapter names: "default" holds the shared experts; names added by add_adapter are empty
        # slots that run the base (see add_adapter).
        self._slots = {DEFAULT_ADAPTER: config}
        self._active = DEFAULT_ADAPTER
        self._adapters_disabled = False
        self._checkpointing_layers = False
        self._nexus_off = None
        self.peft_type = config.peft_type
        self._set_trainable(is_trainable)
        if config.experts_on == "host":
            from nexus.quant.streaming import stream_experts

            stream_experts(model, "NexusConfig(experts_on='host')")
        if config.embeddings_on == "host":
            from nexus.host_embedding import keep_embeddings_on_host

            keep_embeddings_on_host(model, "NexusConfig(embeddings_on='host')")

    # ----- what PEFT's PeftModel exposes -------------------------------------------------------

    @property
    def peft_config(self) -> dict:
        """``{adapter name: config}``, as ``PeftModel.peft_config``."""
        return self._slots

    @property
    def active_adapter(self) -> str:
        """The active adapter's name."""
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]``: NEXUS runs one adapter at a time."""
        return [self._active]

    @property
    def active_peft_config(self) -> NexusConfig:
        """The active adapter's config."""
        return self._slots[self._active]

    @property
    def modules_to_save(self):
        """None: NEXUS saves no copies of base modules."""
        return None

    def get_base_model(self) -> nn.Module:
        """The transformers model (shared experts attached; they follow :meth:`disable_adapter`)."""
        return self.base_model.model

    def forward(self, *args, **kwargs):
        """The base model's forward with the shared experts active (unless disabled)."""
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's ``generate`` with the shared experts active (unless disabled)."""
        return self.get_base_model().generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; packed experts count the weights they decode to
        (``E * 3 * H * I`` per layer, biases included), as the dequantised model would."""
        from nexus.quant.packed_loading import packed_modules

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        packed = sum(m.num_experts * 3 * m.hidden_size * m.intermediate_size
                     + sum(b.numel() for b in (m.gate_up_bias, m.down_bias) if b is not None)
                     for m in packed_modules(self).values())
        return trainable, sum(p.numel() for p in self.parameters()) + packed

    def print_trainable_parameters(self) -> None:
        """Log PEFT's line of trainable and total parameter counts at INFO (logger
        ``nexus.trainers.model``); :meth:`get_nb_trainable_parameters` returns the numbers."""
        trainable, total = self.get_nb_trainable_parameters()
        log.info("trainable params: %s || all params: %s || trainable%%: %.4f",
                 f"{trainable:,d}", f"{total:,d}", 100 * trainable / max(total, 1))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run as the base model inside the block: shared experts off, original routers back.

        The self-distillation teacher and the DPO reference: the same weights, no second copy.
        """
        if self._adapters_disabled:
            yield
            return
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(True)

    def add_adapter(self, adapter_name: str, peft_config=None, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an **empty** adapter slot: activating it (:meth:`set_adapter`) runs the base model.

        NEXUS holds one trained adapter per model. TRL's ``DPOTrainer`` adds a ``ref`` adapter to a
        wrapped model and activates it for the reference log-probabilities; with NEXUS that slot
        is the base (adapter disabled), so DPO's reference costs no copy of anything.
        """
        if adapter_name in self._slots:
            raise NexusError(f"adapter {adapter_name!r} already exists; choose another name")
        self._slots[adapter_name] = peft_config or self.nexus_config

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate ``adapter_name``: ``default`` (the shared experts) or an empty slot (the base)."""
        if adapter_name not in self._slots:
            raise NexusError(f"no adapter named {adapter_name!r}; the model has {', '.join(self._slots)}")
        self._active = adapter_name
        if not self._adapters_disabled:
            self._apply_enabled(adapter_name == DEFAULT_ADAPTER)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an empty slot added by :meth:`add_adapter` (the trained adapter cannot be removed)."""
        if adapter_name == DEFAULT_ADAPTER or adapter_name not in self._slots:
            raise NexusError(f"cannot delete adapter {adapter_name!r}; only empty slots can be deleted")
        if self._active == adapter_name:
            self.set_adapter(DEFAULT_ADAPTER)
        del self._slots[adapter_name]

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, selected_adapters=None,
                        is_main_process: bool = True, state_dict: dict | None = None, **kwargs) -> None:
        """Write the adapter (``nexus_config.json`` + ``adapter_model.safetensors``), never the base.

        :param state_dict: a gathered state dict of this wrapper (``Trainer`` under FSDP/ZeRO-3);
            default the model's own tensors.
        """
        if not is_main_process:
            return
        tensors = None
        if state_dict is not None:
            wanted = set(adapter_state_dict(self.get_base_model(), self.adapter_config.base_keys))
            prefix = "base_model.model."
            tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
            tensors = {k: v.detach().cpu() for k, v in tensors.items() if k in wanted}
            if set(tensors) != wanted:
                tensors = None  # not this wrapper's state dict: read the model's own tensors
        save_adapter(self.get_base_model(), save_directory, self.adapter_config, tensors=tensors)

    def load_adapter(self, model_id: str | Path, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                     **kwargs) -> None:
        """Load the adapter tensors at ``model_id`` into this model in place (``Trainer``'s resume).

        :raises AdapterMismatchError: the adapter was made for another base.
        :raises NexusError: another adapter name, or an adapter of another shape.
        """
        if adapter_name != DEFAULT_ADAPTER:
            raise NexusError(f"NEXUS holds one trained adapter per model (named {DEFAULT_ADAPTER!r}); "
                             f"cannot load {model_id} as {adapter_name!r}")
        path = Path(model_id)
        config = read_adapter_config(path)
        if config.base_fingerprint != self.adapter_config.base_fingerprint:
            # Compared with the base as wrapped: trainers rewrite loss settings in the live config
            # (TRL sets router_aux_loss_coef, pad_token_id), which would change its fingerprint.
            raise AdapterMismatchError(
                f"adapter {path} was made for base fingerprint {config.base_fingerprint} "
                f"({config.base_model or '?'}), this model has {self.adapter_config.base_fingerprint} "
                f"({self.adapter_config.base_model or '?'}); use the base model it was made for")
        if (config.gate_mode, config.shared_intermediate_size) != (self.adapter_config.gate_mode,
                                                                   self.adapter_config.shared_intermediate_size):
            raise NexusError(f"adapter {path} has gate {config.gate_mode} and width "
                             f"{config.shared_intermediate_size}, this model {self.adapter_config.gate_mode} and "
                             f"{self.adapter_config.shared_intermediate_size}; use NexusModel.from_pretrained")
        _load_tensors_in_place(self.get_base_model(), path, config)
        self._set_trainable(is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, config: NexusConfig | None = None, **kwargs) -> "NexusModel":
        """Attach the adapter at ``model_id`` (any NEXUS adapter dir: ``nexus convert``/``train``, or
        :meth:`save_pretrained`) to the base ``model`` and wrap it.

        :param is_trainable: leave the adapter trainable (else everything is frozen, for inference).
        :raises AdapterMismatchError: the adapter was made for another base (both fingerprints named).
        """
        from nexus.adapter import adapter_family, load_adapter

        if adapter_name != DEFAULT_ADAPTER:
            raise NexusError(f"NEXUS holds one adapter per model, named {DEFAULT_ADAPTER!r}; got {adapter_name!r}")
        acfg = read_adapter_config(model_id)
        family = adapter_family(acfg, model, model_id)
        blocks = family.moe_blocks(model)
        originals = {n: p.detach().clone() for n, p in _router_parameters(model, family, blocks).items()
                     if n in acfg.base_keys}
        load_adapter(model, model_id, family=family)
        nexus_config = config or NexusConfig(shared_intermediate_size=acfg.shared_intermediate_size,
                                             gate_mode=acfg.gate_mode, train_routers=bool(originals),
                                             family=acfg.family)
        return cls(model, nexus_config, acfg, family, originals, is_trainable=is_trainable)

    def merge_and_unload(self, progress: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The exported stock model: base + adapter folded into the base's own architecture
        (``nexus export`` into a temporary directory, loaded with ``AutoModelForCausalLM``).

        Every expert is written dequantised in the base's dtype (float32 or bfloat16), so that the fold
        is exact in memory; ``nexus export`` keeps MXFP4 blocks for serving.

        :raises NexusError: no exact fold for this family/gate (the reason and the options), or the
            base was not loaded from a local checkpoint directory.
        """
        from transformers import AutoModelForCausalLM

        from nexus.engines.export import export
        from nexus.host_embedding import compute_device

        base = self.get_base_model()
        source = source_checkpoint(base)
        if source is None:
            raise NexusError("merge_and_unload needs the base's checkpoint directory (load the base with "
                             "from_pretrained(<local dir>) or nexus.loading.load_model); or run `nexus export`")
        dtype = "float32" if next(base.parameters()).dtype == torch.float32 else "bfloat16"
        with tempfile.TemporaryDirectory(prefix="nexus-merge-") as tmp:
            adapter = Path(tmp) / "adapter"
            self.save_pretrained(adapter)
            out = Path(tmp) / "merged"
            export(source, adapter, out, dtype=dtype, dequantize=True, family_name=self.family.name)
            merged = AutoModelForCausalLM.from_pretrained(out, dtype=next(base.parameters()).dtype, device_map=None)
            merged.to(compute_device(base))
        return merged.eval()

    def unload(self) -> nn.Module:
        """Remove the shared experts and return the base model as loaded (routers restored)."""
        from nexus.shared_expert import detach_shared_experts

        base = self.get_base_model()
        self._apply_enabled(True)
        self._swap_routers()  # the originals back into the routers
        self._router_originals = {}
        detach_shared_experts(base)
        return base

    # ----- training mode and gradient checkpointing ---------------------------------------------

    def train(self, mode: bool = True) -> "NexusModel":
        """Training mode for the shared experts only: the frozen base stays in ``eval()`` (several
        families' routers add jitter in train mode). Decoder layers get ``training=mode`` without
        recursion when gradient checkpointing is on, which is what turns it on in transformers."""
        self.training = mode
        base = self.get_base_model()
        base.eval()
        for name, module in base.named_modules():
            if is_shared_parameter(name + ".x"):
                module.train(mode)
        if self._checkpointing_layers:
            self._mark_checkpointing_layers(mode)
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers' activation (gradient) checkpointing on the base, non-reentrant unless asked
        otherwise; ``kwargs`` (``every_n_layers``, ``offload``) go to the base model's method."""
        ckpt_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        base = self.get_base_model()
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if ckpt_kwargs["use_reentrant"]:
            base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        self._checkpointing_layers = True
        self._mark_checkpointing_layers(self.training)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off again."""
        base = self.get_base_model()
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
        self._mark_checkpointing_layers(False)
        self._checkpointing_layers = False

    def gradient_checkpointing_disable(self) -> None:
        """The older name of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on."""
        return self._checkpointing_layers

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on."""
        return self._checkpointing_layers

    # ----- internals ----------------------------------------------------------------------------

    def _mark_checkpointing_layers(self, mode: bool) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in self.get_base_model().modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.training = mode

    def _set_trainable(self, is_trainable: bool) -> None:
        base = self.get_base_model()
        routers = []
        if self.adapter_config.base_keys:
            params = dict(base.named_parameters())
            routers = [params[k] for k in self.adapter_config.base_keys]
        freeze_base(base)
        for p in routers:
            p.requires_grad_(True)
        if not is_trainable:
            for p in base.parameters():
                p.requires_grad_(False)
        self.train(self.training and is_trainable)

    def _set_enabled(self, enabled: bool) -> None:
        self._adapters_disabled = not enabled
        self._apply_enabled(enabled and self._active == DEFAULT_ADAPTER)

    def _apply_enabled(self, enabled: bool) -> None:
        base = self.get_base_model()
        if enabled:
            if self._nexus_off is not None:
                self._nexus_off.__exit__(None, None, None)
                self._nexus_off = None
                self._swap_routers()
        elif self._nexus_off is None:
            self._nexus_off = disable_shared_experts(base)
            self._nexus_off.__enter__()
            self._swap_routers()

    def _swap_routers(self) -> None:
        """Exchange the trained and the original router weights (called in pairs)."""
        if not self._router_originals:
            return
        params = dict(self.get_base_model().named_parameters())
        with torch.no_grad():
            for name, other in self._router_originals.items():
                current = params[name].detach().clone()
                params[name].copy_(other)
                self._router_originals[name] = current


def get_nexus_model(model: nn.Module, config: NexusConfig | None = None) -> NexusModel:
    """Attach freshly initialised shared experts to ``model`` and wrap it (``peft.get_peft_model``'s habit).

    Only the shared experts (and the routers with ``train_routers``) are trainable; the base is
    frozen and kept in ``eval()``.

    :param model: a transformers MoE causal LM of a registered family (``AutoModelForCausalLM`` or
        :func:`nexus.loading.load_model`).
    :param config: how to build the adapter; default ``NexusConfig()`` (``zeros`` init, the default gate
        :data:`nexus.constants.DEFAULT_GATE_MODE`).
    :return: the wrapped model; ``model`` itself is modified in place (as PEFT does).
    :raises NexusError: not an MoE model, a strategy that needs the checkpoint directory on a
        model built in memory, a selection made for another model.
    """
    from nexus import __version__
    from nexus.family import resolve_family

    config = config or NexusConfig()
    family = resolve_family(model.config, name=config.family)
    blocks = family.moe_blocks(model)
    if not blocks:
        raise NexusError(f"{type(model).__name__} has no MoE blocks; NEXUS adapts Mixture-of-Experts models")
    if getattr(model, "_nexus_source", None) is None and source_checkpoint(model) is not None:
        model._nexus_source = str(source_checkpoint(model))  # loaded from there: record its weights fingerprint
    routers = _router_parameters(model, family, blocks) if config.train_routers else {}
    originals = {n: p.detach().clone() for n, p in routers.items()}
    size = config.shared_intermediate_size or blocks[0].intermediate_size
    init = {"strategy": config.init_strategy}
    if config.init_strategy == "zeros":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            attach_shared_experts(model, family, size, config.gate_mode)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_shared_parameter(name) and ".down_proj." in name:
                    p.zero_()
    else:
        source = source_checkpoint(model)
        if source is None:
            raise NexusError(f"init_strategy {config.init_strategy!r} reads the routed experts from the base's "
                             f"checkpoint directory, but this model was not loaded from one; load it from a local "
                             f"directory or use NexusConfig(init_strategy='zeros')")
        from nexus.engines.convert import ConvertConfig, convert

        with tempfile.TemporaryDirectory(prefix="nexus-init-") as tmp:
            adapter = convert(ConvertConfig(model=str(source), output=str(Path(tmp) / "adapter"),
                                            selection=config.selection, strategy=config.init_strategy,
                                            gate_mode=config.gate_mode, shared_intermediate_size=size,
                                            weighted=config.weighted, seed=config.seed),
                              family.name, progress=False)
            converted = read_adapter_config(adapter)
            check_base(converted, model.config, what=f"the adapter converted from {source}")
            attach_shared_experts(model, family, size, config.gate_mode)
            _load_tensors_in_place(model, adapter, converted)
            init = converted.init or init
    adapter_config = AdapterConfig(
        family=family.name, base_fingerprint=config_fingerprint(model.config), shared_intermediate_size=size,
        gate_mode=config.gate_mode, base_keys=sorted(routers), base_model=str(source_checkpoint(model) or ""),
        model_type=model.config.model_type, init=init, args={"api": "nexus.get_nexus_model", **config.to_dict()},
        nexus_version=__version__)
    return NexusModel(model, config, adapter_config, family, originals, is_trainable=True)
