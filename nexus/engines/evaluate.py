"""``nexus evaluate`` and ``nexus generate``: held-out quality of an adapter against its base.

Perplexity is ``exp(total NLL / predicted tokens)`` over every non-padding next-token target of
the data (padding masked, each batch weighted by its predicted tokens), computed from the final
hidden states a chunk of tokens at a time (:mod:`nexus.chunked_losses`), as the KL. With an adapter, the
same model is run twice per batch: adapted, and as the base (:func:`base_view`: shared experts
off, original routers), so no second copy is loaded. Router health per MoE layer: mean entropy
of the router probabilities and load, the fraction of (token, top-k slot) assignments each
expert receives (sums to 1; uniform is ``1/E``). The experts a token is assigned are the family's
own choice (:meth:`nexus.types.RouterCapture.select`, selection bias included), as ``collect``
counts them.

Rows of a single token (nothing to predict) are left out when the data is cut into rows; their
number is logged and reported as ``dropped_rows``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nexus import __version__
from nexus.engines.evaluate_config import EvaluateConfig, GenerateConfig
from nexus.errors import NexusError
from nexus.io import check_writable_output, local_data_path, locks_output, refuse_output_over_inputs, write_json

log = logging.getLogger(__name__)


class _RouterTally:
    """Per-layer sums for router entropy and top-k load over non-padding tokens."""

    def __init__(self, family, blocks):
        self.blocks = blocks
        self.captures = {b.layer: family.router_capture(b) for b in blocks}
        self.tokens = 0
        self.entropy = {b.layer: 0.0 for b in blocks}
        self.load = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}

    def add(self, recorder, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        from nexus.losses import entropy_sum

        probs = {}
        for b in self.blocks:
            p = recorder.probs(b.layer)
            probs[b.layer] = p
            self.entropy[b.layer] += float(entropy_sum(p, mask))
            top = self.captures[b.layer].select(recorder.logits[b.layer][mask], b.top_k)
            self.load[b.layer] += torch.bincount(top.reshape(-1).cpu(), minlength=b.num_experts).double()
        self.tokens += int(mask.sum())
        return probs

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        layers = [b.layer for b in self.blocks]
        loads = [(self.load[layer] / self.load[layer].sum().clamp_min(1)).tolist() for layer in layers]
        return {
            "layers": layers,
            "entropy": [self.entropy[layer] / n for layer in layers],
            "load": loads,
            "load_max": [max(x) for x in loads],
            "load_min": [min(x) for x in loads],
        }


def check_output(config: EvaluateConfig) -> Path | None:
    """Refuse, before any work, an ``--output`` that is or lies inside an input (the model, the
    adapter, the data, the tokenizer) or cannot be written.

    :return: the output path (``~`` expanded), or None without one.
    """
    if not config.output:
        return None
    refuse_output_over_inputs(config.output, {"--model": config.model, "--adapter": config.adapter,
                                              "--data": local_data_path(config.data), "--tokenizer": config.tokenizer})
    return check_writable_output(config.output, directory=False)


@locks_output("config.output", before=lambda arguments: check_output(arguments["config"]))
def evaluate(config: EvaluateConfig, *, device: str | None = None) -> dict:
    """Evaluate the base ``config.model`` (and the adapted model, with ``config.adapter``) on
    ``config.data``, in rows of ``config.seq_len`` tokens; with ``config.output``, also write the
    result there as JSON (atomically), checked to be writable before anything is loaded.

    :param device: where to run (default: cuda when available, else cpu).
    :return: a JSON-able dict: ``tokens``, ``dropped_rows``, ``base``/``adapted`` (``nll``,
        ``perplexity``, ``router``), ``kl_base_adapted`` (mean per predicted token of
        KL(base || adapted)) and ``router_drift`` (per layer mean ``|p_adapted - p_base|``), plus provenance.
    :raises AdapterMismatchError: the adapter was made for another base (config or weights).
    """
    from nexus.adapter import adapter_family, load_adapter, read_adapter_config
    from nexus.data import load_token_data, load_tokenizer
    from nexus.shared_expert import base_parameters, base_view
    from nexus.family import resolve_family
    from nexus.fingerprint import config_fingerprint
    from nexus.loading import load_model
    from nexus.chunked_losses import cross_entropy_sum, forward_hidden, kl_div_sum
    from nexus.losses import l1_drift_sum, shift_for_next_token
    from nexus.progress import progress_bar
    from nexus.routing import RouterRecorder

    model_path, data, adapter, seq_len = config.model, config.data, config.adapter, config.seq_len
    batch_size, max_batches, tokenizer, text_column = config.batch_size, config.max_batches, config.tokenizer, \
        config.text_column
    output, bf16, dequantize = config.output, config.bf16, config.dequantize
    output = Path(output).expanduser() if output is not None else None
    adapter_cfg = read_adapter_config(adapter) if adapter else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, dtype=torch.bfloat16 if bf16 else torch.float32, device=device,
                       dequantize=dequantize)
    family = adapter_family(adapter_cfg, model, adapter) if adapter_cfg else resolve_family(model.config)
    blocks = family.moe_blocks(model)
    originals = {n: p.detach().clone() for n, p in base_parameters(model, family, blocks).items()} if adapter_cfg and adapter_cfg.base_keys else {}
    if adapter:
        load_adapter(model, adapter, family=family)
    model.eval()
    tok = load_tokenizer(tokenizer or model_path, model.config)
    tdata = load_token_data(data, tok, seq_len, text_column)
    if tdata.dropped_rows:
        log.warning("%d rows of a single token (nothing to predict) were left out of %s", tdata.dropped_rows, data)
    base_tally, adapted_tally = _RouterTally(family, blocks), _RouterTally(family, blocks)
    nll = {"base": 0.0, "adapted": 0.0}
    kl, drift, n_pred = 0.0, {b.layer: 0.0 for b in blocks}, 0
    total = -(-len(tdata.rows) // batch_size)
    if max_batches:
        total = min(total, max_batches)
    batches = tdata.batches(batch_size)
    bar_tokens = sum(len(r) for r in tdata.rows[: total * batch_size])
    bar = progress_bar(bar_tokens, desc="evaluate", unit="tok", unit_scale=True)
    for i, (_, batch) in enumerate(batches):
        if i >= total:
            break
        bar.update(int(batch["attention_mask"].sum()))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        in_mask = mask.reshape(-1).bool()
        with torch.no_grad():
            with base_view(model, originals), RouterRecorder(family, blocks) as rec:
                base_out = forward_hidden(model, input_ids=ids, attention_mask=mask, use_cache=False)
            base_probs = base_tally.add(rec, in_mask)
            hb, labels = shift_for_next_token(base_out.states, batch["labels"].to(device))
            s, n = cross_entropy_sum(hb, base_out.head, labels)
            nll["base"] += float(s)
            n_pred += int(n)
            if adapter:
                with RouterRecorder(family, blocks) as rec:
                    out = forward_hidden(model, input_ids=ids, attention_mask=mask, use_cache=False)
                probs = adapted_tally.add(rec, in_mask)
                ha, _ = shift_for_next_token(out.states, batch["labels"].to(device))
                nll["adapted"] += float(cross_entropy_sum(ha, out.head, labels)[0])
                kl += float(kl_div_sum(hb, base_out.head, ha, out.head, labels != -100))
                for layer in drift:
                    drift[layer] += float(l1_drift_sum(base_probs[layer], probs[layer], in_mask))
    bar.close()
    if n_pred == 0:
        raise NexusError(f"data {data} has no tokens to predict")
    import math

    def _ppl(x: float) -> dict:
        return {"nll": x / n_pred, "perplexity": math.exp(x / n_pred)}

    result = {
        "nexus_version": __version__,
        "family": family.name,
        "base_fingerprint": config_fingerprint(model.config),
        "model": str(model_path),
        "adapter": str(adapter) if adapter else None,
        "data": str(data),
        "args": {"seq_len": seq_len, "batch_size": batch_size, "max_batches": max_batches, "bf16": bf16},
        "tokens": n_pred,
        "dropped_rows": tdata.dropped_rows,
        "base": {**_ppl(nll["base"]), "router": base_tally.summary()},
    }
    if adapter:
        result["adapted"] = {**_ppl(nll["adapted"]), "router": adapted_tally.summary()}
        result["kl_base_adapted"] = kl / n_pred
        result["router_drift"] = [drift[b.layer] / max(base_tally.tokens, 1) for b in blocks]
        result["perplexity_ratio"] = result["adapted"]["perplexity"] / result["base"]["perplexity"]
    if output is not None:
        write_json(output, result)
    return result


def generate(config: GenerateConfig, *, device: str | None = None) -> str:
    """Continue ``config.prompt`` with the (adapted) model and return the new text only.

    ``config.chat`` wraps the prompt as a user message with the tokenizer's chat template;
    ``config.temperature`` 0 decodes greedily, else samples at that temperature.

    :param device: where to run (default: cuda when available, else cpu).
    """
    model_path, prompt, adapter, chat = config.model, config.prompt, config.adapter, config.chat
    max_new_tokens, temperature, tokenizer, seed = config.max_new_tokens, config.temperature, config.tokenizer, \
        config.seed
    dequantize = config.dequantize
    from nexus.adapter import load_adapter
    from nexus.data import load_tokenizer
    from nexus.loading import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device=device, dequantize=dequantize)
    if adapter:
        load_adapter(model, adapter)
    tok = load_tokenizer(tokenizer or model_path, model.config)
    if chat:
        if getattr(tok, "chat_template", None) is None:
            raise NexusError(f"the tokenizer of {tokenizer or model_path} has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise NexusError("the prompt is empty after tokenisation; give some text")
    torch.manual_seed(seed)
    sample = temperature > 0
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, **kwargs,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
