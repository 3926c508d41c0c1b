"""What a training run starts from: the student (base + adapter, trainable parameters, optimizer),
the teacher, and the token data of ``--data`` and ``--kd-data``; :mod:`nexus.engines.train` runs them."""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from nexus.adapter import adapter_family, load_adapter, read_adapter_config
from nexus.errors import NexusError
from nexus.training.optimizers import build_optimizer, import_bitsandbytes
from nexus.training.train_config import TrainConfig
from nexus.training.train_state import ADAPTER_SUBDIR

log = logging.getLogger(__name__)


@dataclass
class Student:
    """The base with its adapter loaded and the trainable parameters chosen, before the strategy wraps it."""

    model: torch.nn.Module
    family: object
    blocks: list
    optimizer: torch.optim.Optimizer
    base_originals: dict[str, torch.Tensor]  # base weights an adapter replaces, as in the base
    adapter_config: object
    trained_base_keys: list[str]  # routers / native shared experts trained here (saved in the adapter)

    def save_config(self, config: TrainConfig):
        """The adapter config written with every checkpoint and the final adapter."""
        cfg = copy.deepcopy(self.adapter_config)
        cfg.base_keys = sorted(set(cfg.base_keys) | set(self.trained_base_keys))
        cfg.args = {"command": "train", **config.to_dict()}
        return cfg


def load_student(config: TrainConfig, strategy, checkpoint: Path | None) -> Student:
    """Load the base on ``strategy.load_device``, the adapter (or the checkpoint's), freeze the base
    except routers / native shared experts when trained, and build the optimizer (``--optim``) over
    the trainable parameters (routers in their own group, at ``--router-lr``)."""
    from nexus.loading import load_config, load_model
    from nexus.quant.packed_experts import set_reuse_bytes
    from nexus.shared_expert import base_parameters, freeze_base, native_shared_modules, router_parameters

    if config.experts_on == "host" and strategy.kind == "fsdp2":
        raise NexusError("--experts-on host is not supported under FSDP2, which shards the packed experts across "
                         "processes itself; drop --experts-on host, or train with DDP")
    check_strategy_options(config, strategy.kind)
    adapter_cfg = read_adapter_config(config.adapter)
    if config.packed_cache_bytes and getattr(load_config(config.model), "quantization_config", None) is None:
        raise _nothing_to_cache(config.model)
    model = load_model(config.model, dtype=torch.bfloat16 if config.bf16 else torch.float32,
                       device=strategy.load_device, dequantize=config.dequantize, experts_on=config.experts_on,
                       embeddings_on=config.embeddings_on)
    if set_reuse_bytes(model, config.packed_cache_bytes) is None and config.packed_cache_bytes:
        raise _nothing_to_cache(config.model)
    family = adapter_family(adapter_cfg, model, config.adapter)
    blocks = family.moe_blocks(model)
    routers = router_parameters(model, family, blocks)
    # The self-teacher runs the base as it was, so the base weights this run changes are kept.
    touched_base = config.train_routers or config.train_native_shared or bool(adapter_cfg.base_keys)
    base_originals = {}
    if touched_base:
        base_originals = {n: p.detach().clone() for n, p in base_parameters(model, family, blocks).items()}
    load_adapter(model, checkpoint / ADAPTER_SUBDIR if checkpoint else config.adapter, family=family)
    router_modules = [family.router_capture(b).module for b in blocks] if config.train_routers else []
    native = native_shared_modules(blocks) if config.train_native_shared else []
    if config.train_native_shared and not native:
        raise NexusError(f"--train-native-shared: family {family.name!r} has no shared expert of its own")
    if config.bf16:
        for m in (*router_modules, *native):
            m.float()  # optimise fp32 copies; autocast feeds them bf16 activations
    freeze_base(model, router_modules, native)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    router_names = sorted(n for n in named if n in routers)
    native_names = sorted(n for n in named if n in base_originals and n not in routers)
    groups = [{"params": [p for n, p in named.items() if n not in routers], "lr": config.lr, "name": "shared"}]
    if router_names:
        groups.append({"params": [named[n] for n in router_names], "lr": config.router_lr or config.lr,
                       "name": "routers"})
    optimizer = build_optimizer(config.optim, groups, config.lr, config.weight_decay)
    return Student(model, family, blocks, optimizer, base_originals, adapter_cfg, router_names + native_names)


def check_strategy_options(config: TrainConfig, kind: str) -> None:
    """Refuse ``--optim adamw8bit`` and ``--embeddings-on host`` under the engines they do not run
    with (``kind``: the strategy's, ``ddp``, ``fsdp2`` or ``deepspeed``), and ``--optim adamw8bit``
    without bitsandbytes, before the model loads.

    :raises NexusError: naming the option and the engine, or the extra to install.
    """
    if config.optim != "adamw" and kind in ("deepspeed", "fsdp2"):
        why = ("partitions the optimizer state across processes itself" if kind == "deepspeed" else
               "shards the trainable parameters into DTensors, which bitsandbytes' 8-bit state does not take")
        raise NexusError(f"--optim {config.optim} is not supported under {_ENGINE_NAMES[kind]}, which {why}; "
                         f"train with --optim adamw, or under DDP")
    if config.optim == "adamw8bit":
        import_bitsandbytes()
    if config.embeddings_on == "host" and kind in ("deepspeed", "fsdp2"):
        why = ("shards every parameter, the embedding table included, across processes" if kind == "fsdp2" else
               "broadcasts every parameter from the compute device")
        raise NexusError(f"--embeddings-on host is not supported under {_ENGINE_NAMES[kind]}, which {why}; "
                         f"drop --embeddings-on host, or train with DDP")


_ENGINE_NAMES = {"deepspeed": "DeepSpeed ZeRO", "fsdp2": "FSDP2"}


def enable_checkpointing(model) -> None:
    """Gradient checkpointing that works with the base in ``eval()``.

    transformers only checkpoints a decoder layer when ``layer.training`` is True. Setting that
    flag on the layer modules alone (not recursively) turns checkpointing on while every
    submodule (attention dropout, routers) stays in eval mode.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def build_teacher(config, model, family, blocks, tokenizer, base_originals, device, autocast):
    """The teacher for ``config.teacher``, the cache when it is one (its rows are the data), and
    why router metrics (router KL, drift, entropies) are unavailable with it (None when they are)."""
    from nexus.loading import load_config, load_model
    from nexus.teacher_cache import TeacherCache, is_teacher_cache
    from nexus.training.teachers import CacheTeacher, ModelTeacher, SelfTeacher, check_same_vocab, same_router_layout

    if config.teacher == "self":
        return SelfTeacher(model, family, blocks, base_originals, autocast), None, None
    if is_teacher_cache(config.teacher):
        cache = TeacherCache(config.teacher)
        cache.check(model.config, tokenizer, need_routers=config.router_kl_weight > 0)
        cached_t = cache.meta["temperature"]
        if cached_t != config.temperature and config.kd_weight > 0:
            raise NexusError(
                f"teacher cache {config.teacher} holds log-probs at temperature {cached_t}, "
                f"but --temperature is {config.temperature}; train with --temperature {cached_t} or precompute again"
            )
        note = None if cache.has_router_logits else f"teacher cache {config.teacher} holds no router logits"
        return CacheTeacher(cache), cache, note
    teacher_config = load_config(config.teacher)
    check_same_vocab(model.config, tokenizer, config.teacher, teacher_config)
    # A quantised teacher streams its experts too; a float one has none packed to stream.
    experts_on = config.experts_on if getattr(teacher_config, "quantization_config", None) is not None else "device"
    teacher_model = load_model(config.teacher, dtype=torch.bfloat16 if config.bf16 else torch.float32, device=device,
                               dequantize=config.dequantize, experts_on=experts_on)
    teacher_model.requires_grad_(False)
    t_family, t_blocks, note = None, [], None
    try:
        from nexus.family import resolve_family

        t_family = resolve_family(teacher_model.config)
        t_blocks = t_family.moe_blocks(teacher_model)
        if not same_router_layout(blocks, t_blocks):
            note = (f"the MoE layers of teacher {config.teacher} (layer, experts: "
                    f"{[(b.layer, b.num_experts) for b in t_blocks]}) differ from the model's "
                    f"({[(b.layer, b.num_experts) for b in blocks]})")
            t_family, t_blocks = None, []
    except NexusError as exc:
        note = f"teacher {config.teacher} has no MoE layers nexus can read ({exc})"
        t_family, t_blocks = None, []
    if config.router_kl_weight > 0 and not t_blocks:
        raise NexusError(f"--router-kl-weight needs a teacher with the model's MoE layout; {config.teacher} differs. "
                         f"Set it to 0")
    return ModelTeacher(teacher_model, t_family, t_blocks, autocast), None, note


def load_train_data(config, tokenizer, cache):
    """``(ordering TokenData, collate(indices) -> batch)`` for the training rows."""
    from nexus.data import TokenData, load_token_data
    from nexus.fingerprint import rows_fingerprint

    if cache is not None:
        if config.data is not None:
            rows = load_token_data(config.data, tokenizer, cache.meta["seq_len"], config.text_column).rows
            if rows_fingerprint(rows) != cache.meta["data_fingerprint"]:
                raise NexusError(
                    f"--data {config.data} does not match the rows of teacher cache {config.teacher} (made from "
                    f"{cache.meta['data']} at seq_len {cache.meta['seq_len']}); "
                    f"omit --data to train on the cache's rows"
                )
        if cache.meta["seq_len"] != config.seq_len:
            log.info("training on the teacher cache's rows (seq_len %d; --seq-len is ignored)", cache.meta["seq_len"])
        return TokenData(cache.rows, cache.pad_id), cache.collate
    if config.data is None:
        if config.kd_data:
            raise NexusError("--data is required with --kd-data: the cross-entropy is computed on it (the domain)")
        raise NexusError("--data is required unless --teacher is a teacher cache")
    data = load_token_data(config.data, tokenizer, config.seq_len, config.text_column)
    return data, functools.partial(collate_rows, data)


def load_kd_data(config, tokenizer, cache):
    """``(ordering TokenData, collate(indices) -> batch)`` for the ``--kd-data`` rows: the teacher
    cache's rows (after checking that the cache was made from ``--kd-data``), else ``--kd-data`` itself.

    :raises NexusError: ``--kd-data`` is not the data the teacher cache was made from.
    """
    from nexus.data import TokenData, load_token_data
    from nexus.fingerprint import rows_fingerprint
    from nexus.training.train_config import kd_data_errors

    with kd_data_errors(config.kd_data):
        data = load_token_data(config.kd_data, tokenizer, cache.meta["seq_len"] if cache else config.seq_len,
                               config.kd_text_column)
    if cache is not None:
        rows = data.rows
        if rows_fingerprint(rows) != cache.meta["data_fingerprint"]:
            raise NexusError(
                f"--kd-data {config.kd_data} is not the data teacher cache {config.teacher} was made from "
                f"({cache.meta['data']} at seq_len {cache.meta['seq_len']}): a cache holds the teacher's outputs for "
                f"its own rows only; give that data as --kd-data, precompute a cache from --kd-data, "
                f"or use --teacher self"
            )
        return TokenData(cache.rows, cache.pad_id), cache.collate
    return data, functools.partial(collate_rows, data)


def collate_rows(data, indices: list[int]) -> dict:
    """The batch of ``data``'s rows at ``indices`` (``input_ids``/``attention_mask``/``labels`` ``[B, S]``)."""
    from nexus.data import collate

    return collate([data.rows[i] for i in indices], data.pad_id)


def _nothing_to_cache(model: str) -> NexusError:
    return NexusError(f"--packed-cache-bytes keeps decoded routed experts of a packed model, and {model} keeps none "
                      f"packed (a float checkpoint, or a family that dequantises it): drop --packed-cache-bytes")
