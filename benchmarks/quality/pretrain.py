"""Base models: a small MoE pretrained on the general corpus, cached by a hash of its recipe.

The GPT-OSS model is written by its family's ``write_checkpoint`` (experts MXFP4-packed, as the
released checkpoints), so adaptation starts from the quantised model, dequantised on load like
a real one. The held-out perplexity recorded for the base is measured on that reloaded model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.quality.config import ModelRecipe
from benchmarks.quality.evaluate import causal_ce, perplexity
from benchmarks.quality.rows import batches
from nexus.io import atomic_dir, write_json

log = logging.getLogger(__name__)

RECORD_NAME = "pretrain.json"


def build_config(recipe: ModelRecipe):
    """The transformers config of ``recipe`` (``model_type`` picks the class)."""
    from transformers import AutoConfig

    kwargs = dict(recipe.config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 down to ``floor``
    (the training engine's ``lr_lambda`` with ``schedule="cosine"``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(recipe: ModelRecipe, device: str):
    """bf16 autocast on CUDA when ``recipe.bf16``, else a no-op context."""
    import contextlib

    if recipe.bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pretrain(recipe: ModelRecipe, train_rows: torch.Tensor, val_rows: torch.Tensor, device: str = "cpu"):
    """Pretrain a fresh model of ``recipe`` on ``train_rows[N, S]`` (CE + load-balancing loss).

    :param val_rows: held-out general rows for the curve, every ``recipe.eval_every`` steps.
    :param device: where to train (``cuda``: under bf16 autocast when ``recipe.bf16``); the
        model is initialised on the CPU first, so its weights do not depend on the device.
    :return: ``(model, record)``; the record holds the curve (step, tokens, seconds, loss,
        aux loss), held-out perplexities along the way, steps done and whether the time cap hit.
    """
    from transformers import AutoModelForCausalLM

    config = build_config(recipe)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, recipe.steps, recipe.warmup))
    curve, evals = [], []
    data = batches(train_rows, recipe.batch_size, recipe.seed)
    start = time.perf_counter()
    truncated = False
    step = 0
    bar = tqdm(total=recipe.steps, desc=f"pretrain {recipe.name}", unit="step", leave=False, disable=None)
    for step in range(1, recipe.steps + 1):
        model.train()
        ids = next(data).to(device)
        with autocast(recipe, device):
            out = model(input_ids=ids, output_router_logits=True)
        ce = causal_ce(out.logits, ids)
        aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros((), device=ids.device)
        loss = ce + recipe.aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        ce_value, aux_value = float(ce.detach()), float(aux.detach())
        curve.append(
            {"step": step, "tokens": step * ids.numel(), "seconds": round(elapsed, 3), "loss": ce_value, "aux": aux_value}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{ce_value:.3f}")
        if step % recipe.eval_every == 0 or step == recipe.steps:
            model.eval()
            with autocast(recipe, device):
                ppl = perplexity(model, val_rows)
            evals.append({"step": step, "tokens": step * ids.numel(), "general_val_ppl": ppl})
            log.info("pretrain %s step %d: loss %.3f, held-out ppl %.2f", recipe.name, step, ce_value, evals[-1]["general_val_ppl"])
        if elapsed > recipe.max_seconds:
            truncated = True
            log.warning("pretraining %s hit its %.0f s cap at step %d of %d", recipe.name, recipe.max_seconds, step, recipe.steps)
            break
    bar.close()
    model.eval()
    record = {
        "recipe": recipe.name,
        "steps_done": step,
        "truncated": truncated,
        "seconds": round(time.perf_counter() - start, 1),
        "tokens": step * recipe.batch_size * recipe.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "bf16_autocast": bool(recipe.bf16 and torch.device(device).type == "cuda"),
        "curve": curve,
        "evals": evals,
    }
    return model, record


def write_base(model, recipe: ModelRecipe, path: Path) -> str:
    """Write ``model`` with its family's ``write_checkpoint`` when the family is registered
    (GPT-OSS: MXFP4), else ``save_pretrained``. :return: how it was written."""
    from nexus.errors import FamilyError
    from nexus.family import resolve_family

    try:
        family = resolve_family(name=recipe.family)
    except FamilyError:
        model.save_pretrained(path)
        return "save_pretrained (family not registered)"
    family.write_checkpoint(model, path)
    return f"{recipe.family} write_checkpoint"


def cached_base(
    recipe: ModelRecipe,
    tokenizer,
    key: str,
    cache: Path,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    test_rows: dict[str, torch.Tensor],
    device: str = "cpu",
) -> tuple[Path, dict]:
    """The pretrained base model of ``recipe``: ``cache/<name>-<key>``, built on first use.

    :param key: identifies the recipe, tokenizer and corpus (see :meth:`ModelRecipe.key`).
    :param test_rows: split name -> rows evaluated on the reloaded (stored) model, e.g.
        ``{"general_test": ..., "domain_test": ...}``; the float model before writing is
        evaluated too, so the record shows what MXFP4 storage costs.
    :param device: where to pretrain and evaluate (:func:`pretrain`); the checkpoint is written from the CPU.
    :return: ``(checkpoint directory, record)``; the record is also ``pretrain.json`` there.
    """
    from nexus.loading import load_model

    path = Path(cache) / f"{recipe.name}-{key}"
    record_path = path / RECORD_NAME
    if record_path.exists():
        log.info("reusing the cached %s base model %s", recipe.name, path)
        return path, json.loads(record_path.read_text())
    log.info("pretraining the %s base model (%d steps) -> %s", recipe.name, recipe.steps, path)
    model, record = pretrain(recipe, train_rows, val_rows, device)
    record["key"] = key
    record["float_ppl"] = {name: perplexity(model, rows) for name, rows in test_rows.items()}
    with atomic_dir(path) as tmp:
        record["written_by"] = write_base(model.cpu(), recipe, tmp)
        tokenizer.save_pretrained(tmp)
        stored = load_model(tmp, device=device)
        record["stored_ppl"] = {name: perplexity(stored, rows) for name, rows in test_rows.items()}
        write_json(tmp / RECORD_NAME, record)
    log.info("base %s: held-out ppl float %s, stored %s", recipe.name, record["float_ppl"], record["stored_ppl"])
    return path, record
