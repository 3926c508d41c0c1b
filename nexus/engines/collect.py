"""``collect``: streaming statistics of router probabilities over the user's data.

The frozen base runs forward (eval mode, no grad) over tokenised data; every MoE block's router
logits are captured with forward hooks (:class:`nexus.routing.RouterRecorder`) and turned into
probabilities with the family's scoring (softmax or sigmoid). Per MoE layer, float64 sums are
accumulated on the model's device:

- ``count``: tokens counted, ``N``;
- ``sum_p``: ``sum_t p_t``, ``Tensor[E]``;
- ``sum_pp``: ``sum_t p_t p_t^T``, ``Tensor[E, E]``;
- ``topk_count``: how often each expert is among a token's top-k, ``Tensor[E]``;
- ``topk_weight``: the sum of each expert's routing weight when selected, ``Tensor[E]``.

Memory is ``O(L E^2)``, independent of the number of tokens (storing ``[N, L, E]`` probabilities
instead takes 9 GB per million tokens for gpt-oss-120b). Because the statistics are sums, shards
from several processes or from an interrupted and resumed run merge by addition
(:meth:`RouterStats.merge`).

Top-k rule: the experts the family's :class:`nexus.types.RouterCapture` selects, i.e. the
block's ``top_k`` largest probabilities (for softmax and sigmoid scoring the same set as the
top-k logits), plus the capture's ``selection_bias`` when the family chooses with one
(DeepSeek-V3-style ``e_score_correction_bias``); group-limited routing is not applied. The
routing weight of a selected expert is its *unbiased* probability renormalised over the token's
top-k (sum 1 per token), as GPT-OSS and Mixtral weight their experts. The moments (``sum_p``,
``sum_pp``) are always of the unbiased probabilities.

Which tokens count: padding never does (``attention_mask == 0``). With ``target_tokens`` the run
stops at exactly that many tokens: inside the last batch only the first real tokens in row-major
order (row 0's tokens, then row 1's, ...) are counted; across processes the global batch is the
ranks' rows in rank order, so ``accelerate launch`` with W processes of batch B counts the same
tokens as one process of batch ``W * B``.

Resuming: every ``checkpoint_every`` batches the partial sums, the next batch index and the
run's identity (base fingerprint, data fingerprint, target, global batch size, seed) are written
atomically to the output directory; a rerun with the same identity continues from there, a rerun
with another identity is refused unless ``overwrite``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from nexus.constants import ROUTER_STATS_NAME
from nexus.engines.collect_config import CollectArgs, CollectConfig
from nexus.errors import Interrupted, NexusError
from nexus.interrupts import StopFlag, signal_name
from nexus.fingerprint import config_fingerprint, model_weights_fingerprint, rows_fingerprint
from nexus.io import output_lock
from nexus.router_stats import FIELDS, LayerStats, RouterStats
from nexus.routing import RouterRecorder

log = logging.getLogger(__name__)

def process_state():
    """accelerate's process state; on a machine without an accelerator, processes started by
    ``torchrun``/``accelerate launch`` join a CPU (gloo) process group."""
    import os

    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.accelerator.is_available()
    return PartialState(cpu=cpu)


def _distributed():
    """``(rank, world_size, reduce_sum, gather, barrier)`` from accelerate's process state."""
    from accelerate.utils import gather, reduce

    state = process_state()
    if state.num_processes == 1:
        return 0, 1, (lambda t: t), (lambda t: t), (lambda: None)
    return state.process_index, state.num_processes, (lambda t: reduce(t.clone(), "sum")), gather, state.wait_for_everyone


def run_identity(config, data, args: CollectArgs, world_size: int) -> dict:
    """What must match for a rerun to resume a run: base, data, target, global batch, seed."""
    return {
        "base_fingerprint": config_fingerprint(config),
        "data_fingerprint": rows_fingerprint(data.rows),
        "target_tokens": args.target_tokens,
        "global_batch_size": args.batch_size * world_size,
        "seed": args.seed,
    }


def check_writable(output: Path) -> None:
    """Fail early, leaving nothing behind, when ``output`` cannot be created or written."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise NexusError(f"cannot write {output}: {existing} is not a writable directory; choose a writable --output")


def _resume(output: Path | None, identity: dict, overwrite: bool, device) -> RouterStats | None:
    """The statistics in ``output`` when they belong to the run ``identity`` (None when there are
    none, or with ``overwrite``); another run's raise :class:`NexusError`."""
    if output is None or not (output / ROUTER_STATS_NAME).exists() or overwrite:
        return None
    old = RouterStats.load(output, device=device)
    prev = old.meta.get("identity", {})
    diff = sorted(k for k in set(prev) | set(identity) if prev.get(k) != identity.get(k))
    if diff:
        details = ", ".join(f"{k}: {prev.get(k)!r} -> {identity.get(k)!r}" for k in diff)
        raise NexusError(
            f"{output} holds router statistics of another run ({details}); "
            f"pass --overwrite to start over or choose another --output"
        )
    return old


def _batches(data, batch_size: int, seed, start: int, rank: int, world_size: int):
    """``(index, batch or None)`` for every global batch of one pass from ``start``: a rank whose
    share of the last global batch is empty gets None, so every rank sees every index."""
    per_pass = max(1, -(-len(data) // (batch_size * world_size)))
    it = data.batches(batch_size, seed=seed, start=start, rank=rank, world_size=world_size)
    pending = next(it, None)
    for index in range(start, per_pass):
        if pending is not None and pending[0] == index:
            yield index, pending[1]
            pending = next(it, None)
        else:
            yield index, None


def collect_router_stats(
    model,
    family,
    data,
    args: CollectArgs,
    output: str | Path | None = None,
    *,
    source: dict | None = None,
    max_batches: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RouterStats:
    """Accumulate router statistics of ``model`` over ``data`` (see the module docstring).

    Runs under every process of an ``accelerate launch`` (each its share of every global batch;
    the sums are reduced across processes before each save), or alone.

    :param model: the base ``*ForCausalLM`` (put in eval mode here), on its compute device.
    :param family: its :class:`nexus.family.Family`.
    :param data: a :class:`nexus.data.TokenData` (token id rows + padding id).
    :param args: a :class:`CollectArgs`.
    :param output: directory for ``router_stats.safetensors``/``.json`` and the resume
        checkpoints; None keeps everything in memory (no resume).
    :param source: informational provenance recorded in the metadata (model path, data path, ...).
    :param max_batches: stop after this many batches in this call (the statistics are saved
        incomplete; call again to continue). None: run to the end.
    :param overwrite: discard statistics of a different run found in ``output``.
    :param progress: show a tqdm bar in tokens (main process only).
    :return: the :class:`RouterStats` (summed over processes), ``meta["complete"]`` telling
        whether the target was reached or the data exhausted.
    """
    from tqdm.auto import tqdm

    rank, world, reduce_sum, gather, barrier = _distributed()
    device = next(model.parameters()).device
    output = Path(output) if output is not None else None
    if output is not None:
        check_writable(output)
    model.eval()
    blocks = family.moe_blocks(model)
    identity = run_identity(model.config, data, args, world)
    meta = {
        "family": family.name,
        "base_fingerprint": identity["base_fingerprint"],
        "model_type": getattr(model.config, "model_type", ""),
        "identity": identity,
        "args": asdict(args),
        "source": dict(source or {}),
        "world_size": world,
        "base_weights_fingerprint": "",
        "base_weights_tensors": [],
        "topk_rule": "the family's selection (top-k of probabilities + selection_bias); weights: unbiased "
                     "probabilities renormalised over the top-k",
    }
    meta["base_weights_fingerprint"], meta["base_weights_tensors"] = model_weights_fingerprint(model, family, blocks)
    resumed = _resume(output, identity, overwrite, device)
    if resumed is not None and resumed.meta.get("complete"):
        log.info("%s already holds complete statistics of this run (%d tokens); nothing to do", output, resumed.tokens)
        return resumed.to("cpu")
    start = resumed.meta.get("next_batch", 0) if resumed is not None else 0
    seen = resumed.tokens if resumed is not None else 0
    if resumed is not None:
        log.info("resuming router statistics from batch %d (%d tokens)", start, seen)
    # Rank 0 carries what was already counted; every rank adds only its own tokens, so the
    # reduced sum counts each token once.
    stats = RouterStats.for_blocks(family, blocks, device, meta)
    if resumed is not None and rank == 0:
        stats.merge(resumed)
        stats.meta = meta

    target = args.target_tokens
    total = target if target is not None else data.num_tokens
    bar = tqdm(total=total, initial=min(seen, total), unit="tok", unit_scale=True, desc="router stats",
               disable=not progress or rank != 0)

    def save(next_batch: int, complete: bool) -> RouterStats:
        """Sum over processes, record the position, write (main process); every rank gets the sum."""
        summed = stats if world == 1 else _reduced(stats, reduce_sum)
        summed.meta.update(next_batch=next_batch, complete=complete, tokens=summed.tokens)
        if output is not None and rank == 0:
            summed.save(output)
        barrier()
        return summed

    captures = {b.layer: family.router_capture(b) for b in blocks}
    next_batch, done_batches, complete, stopped_by = start, 0, False, 0
    stop = StopFlag("collect", "after this batch, with the statistics saved")
    with stop, RouterRecorder(family, blocks) as rec, torch.no_grad():
        for index, batch in _batches(data, args.batch_size, args.seed, start, rank, world):
            if max_batches is not None and done_batches >= max_batches:
                break
            mask = batch["attention_mask"].reshape(-1).bool() if batch is not None else torch.zeros(0, dtype=torch.bool)
            local = int(mask.sum())
            # Every process learns of a signal any of them received, so they all stop at this batch.
            flags = gather(torch.tensor([local, stop.signum or 0], device=device)).reshape(-1, 2)
            if int(flags[:, 1].max()):
                stopped_by = int(flags[:, 1].max())
                break
            counts = flags[:, 0].tolist()
            budget = sum(counts) if target is None else min(sum(counts), target - seen)
            allowed = max(0, min(local, budget - sum(counts[:rank])))
            if batch is not None and allowed > 0:
                rec.clear()
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                keep = (mask & (mask.cumsum(0) <= allowed)).to(device)
                for block in blocks:
                    logits = rec.logits[block.layer]
                    if logits.shape[0] != keep.shape[0]:
                        raise NexusError(
                            f"family {family.name!r}: layer {block.layer}'s router returned {logits.shape[0]} rows "
                            f"for {keep.shape[0]} tokens; its RouterCapture must give one row per token"
                        )
                    kept = logits[keep]
                    cap = captures[block.layer]
                    stats.layers[block.layer].update(cap.probabilities(kept), cap.select(kept, block.top_k))
            seen += budget
            bar.update(budget)
            done_batches += 1
            next_batch = index + 1
            if target is not None and seen >= target:
                complete = True
                break
            if args.checkpoint_every and next_batch % args.checkpoint_every == 0:
                save(next_batch, False)
        else:
            complete = True
    bar.close()
    result = save(next_batch, complete)
    if stopped_by:
        where = f"saved in {output}: run the same command again to continue" if output else "not saved (no output)"
        raise Interrupted(f"collect stopped by {signal_name(stopped_by)} after {result.tokens} tokens; the statistics "
                          f"so far are {where}", stopped_by)
    if complete and target is not None and result.tokens < target:
        log.warning("the data ran out after %d tokens, short of --target-tokens %d; the statistics cover all of it",
                    result.tokens, target)
    if complete and result.tokens == 0:
        raise NexusError("no tokens were counted: the data holds no non-padding tokens")
    return result.to("cpu")


def _reduced(stats: RouterStats, reduce_sum) -> RouterStats:
    layers = {}
    for layer, s in stats.layers.items():
        t = {n: reduce_sum(getattr(s, n)) for n in FIELDS}
        layers[layer] = LayerStats(s.layer, s.num_experts, s.top_k, s.scoring, **t)
    return RouterStats(layers, dict(stats.meta))


def run_collect(config: CollectConfig, family_name: str | None = None, *, progress: bool = True) -> RouterStats:
    """Load the base, its tokenizer and the data of ``config``, then :func:`collect_router_stats`
    into ``config.output``.

    The family (``family_name``, default detected) is resolved, and a dense model refused, before
    anything heavy is loaded.
    """
    from nexus.data import load_token_data, load_tokenizer
    from nexus.family import resolve_family
    from nexus.io import local_data_path, refuse_output_over_inputs
    from nexus.loading import load_config, load_model

    if not config.model or not config.data:
        raise NexusError("collect needs --model and --data")
    refuse_output_over_inputs(config.output, {"--model": config.model, "--data": local_data_path(config.data)})
    model_path, output, args = config.model, config.output, config.args()
    dtype = getattr(torch, config.dtype)
    base_config = load_config(model_path)
    family = resolve_family(base_config, name=family_name)
    tokenizer = load_tokenizer(model_path, base_config)
    data = load_token_data(config.data, tokenizer, config.seq_len, text_column=config.text_column,
                           max_tokens=args.target_tokens)
    state = process_state()
    check_writable(Path(output))
    with output_lock(output, enabled=state.is_main_process):
        identity = run_identity(base_config, data, args, state.num_processes)
        done = _resume(Path(output), identity, config.overwrite, "cpu")  # fail early
        if done is not None and done.meta.get("complete"):
            log.info("%s already holds complete statistics of this run (%d tokens); nothing to do", output, done.tokens)
            return done
        model = load_model(model_path, dtype=dtype, device=state.device, dequantize=config.dequantize)
        family.moe_blocks(model)  # a clear error for a model without MoE blocks
        source = {"base_model": str(model_path), "data": str(config.data), "seq_len": config.seq_len,
                  "text_column": config.text_column, "dtype": config.dtype}
        return collect_router_stats(model, family, data, args, output, source=source, max_batches=config.max_batches,
                                    overwrite=config.overwrite, progress=progress)
