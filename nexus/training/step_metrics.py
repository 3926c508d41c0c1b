"""The numbers a training run logs: per-step sums of the loss parts, averaged into a metrics line.

Each optimizer step stacks its micro-batches' detached loss parts into one vector
(:func:`stack_sums`), sums it over processes, and adds it to a :class:`MetricsWindow`; every
``log_every`` steps the window becomes one line of ``metrics.jsonl`` (:meth:`MetricsWindow.record`)
and, flattened (:func:`flat_scalars`), one point for the experiment trackers.
"""

from __future__ import annotations

import time

import torch


def stack_sums(sums: torch.Tensor | None, loss: torch.Tensor, parts, kd_parts=None) -> torch.Tensor:
    """Add a micro-batch's detached loss and loss parts to ``sums``.

    :param sums: the vector so far, or None for the window's first micro-batch.
    :param loss: the micro-batch's back-propagated loss (scalar tensor).
    :param parts: its :class:`nexus.training.train_step.LossParts` (of the domain batch).
    :param kd_parts: with ``--kd-data``, the parts of the kd batch: KD, router KL and the router
        metrics are taken from it, and its (not back-propagated) CE is appended as ``kd_data_ce``.
    :return: ``Tensor[4]`` (loss, ce, kd, router_kl), ``Tensor[5]`` (..., kd_data_ce) with
        ``kd_parts``, plus ``3L`` per-layer router drift, student entropy and teacher entropy sums.
    """
    if kd_parts is None:
        head, routers = (loss, parts.ce, parts.kd, parts.router_kl), parts
    else:
        head, routers = (loss, parts.ce, kd_parts.kd, kd_parts.router_kl, kd_parts.ce), kd_parts
    vec = [t.detach().float().reshape(1) for t in head]
    if routers.drift is not None:
        vec += [routers.drift.float(), routers.ent_student.float(), routers.ent_teacher.float()]
    v = torch.cat(vec)
    return v if sums is None else sums + v


# Where each loss part of a metrics line comes from when distillation has its own stream.
KD_STREAM_SOURCES = {"ce": "data", "kd": "kd_data", "router_kl": "kd_data", "kd_data_ce": "kd_data",
                     "router_drift": "kd_data"}


class MetricsWindow:
    """The sums of the optimizer steps since the last metrics line (and the clock since then).

    :param kd_stream: the run distils on a separate stream (``--kd-data``): the sums carry
        ``kd_data_ce`` and :meth:`add` receives that stream's token counts.
    """

    def __init__(self, kd_stream: bool = False):
        self.sums, self.n_pred, self.n_in, self.grad_norms, self.merge_steps, self.steps = None, 0.0, 0.0, [], [], 0
        self.kd_stream, self.n_pred_kd, self.n_in_kd = kd_stream, 0.0, 0.0
        self.started = time.perf_counter()

    def add(self, reduced: torch.Tensor, n_pred: float, n_in: float, grad_norm: float, merged: bool,
            step: int, kd_tokens: tuple[float, float] | None = None) -> None:
        """Add one optimizer step.

        :param reduced: its :func:`stack_sums` vector, summed over the window and every process.
        :param n_pred, n_in: its predicted / input tokens on every process.
        :param merged: SFA merged the weights after this step.
        :param kd_tokens: with ``kd_stream``, the kd stream's ``(n_pred, n_in)`` on every process.
        """
        self.sums = reduced.detach().cpu() if self.sums is None else self.sums + reduced.detach().cpu()
        self.n_pred, self.n_in, self.steps = self.n_pred + n_pred, self.n_in + n_in, self.steps + 1
        if kd_tokens is not None:
            self.n_pred_kd, self.n_in_kd = self.n_pred_kd + kd_tokens[0], self.n_in_kd + kd_tokens[1]
        self.grad_norms.append(grad_norm)
        if merged:
            self.merge_steps.append(step)

    def record(self, step: int, lrs: list[float], tokens: int, sfa_merges: int, layers: list[int],
               n_layers: int, kd_tokens: int = 0) -> dict:
        """The metrics line: ``loss`` is the mean over the steps of the back-propagated loss; its
        parts are token-weighted over those steps, each over the tokens of the stream it came from
        (``loss_sources`` names the stream of each part when distillation has its own).

        :param lrs: the learning rate of each optimizer param group (shared experts, then routers).
        :param tokens: input tokens seen by the run so far.
        :param sfa_merges: SFA merges done by the run so far.
        :param layers: the MoE layer indices, for the per-layer router metrics.
        :param n_layers: the number of MoE layers the router KL is averaged over.
        :param kd_tokens: input tokens of the kd stream seen by the run so far (with ``kd_stream``).
        """
        s, n_pred, n_in = self.sums, max(self.n_pred, 1.0), max(self.n_in, 1.0)
        head, kd_pred, kd_in = 4, n_pred, n_in
        if self.kd_stream:
            head, kd_pred, kd_in = 5, max(self.n_pred_kd, 1.0), max(self.n_in_kd, 1.0)
        ce, kd, rkl = float(s[1]) / n_pred, float(s[2]) / kd_pred, float(s[3]) / (kd_in * n_layers)
        seconds = time.perf_counter() - self.started
        rec = {
            "step": step,
            "loss": float(s[0]) / self.steps,
            "ce": ce, "kd": kd, "router_kl": rkl,
            "lr": lrs[0], "router_lr": lrs[1] if len(lrs) > 1 else None,
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "tokens": tokens, "tokens_per_s": self.n_in / max(seconds, 1e-9),
            "sfa_merges": sfa_merges, "sfa_merge_steps": self.merge_steps,
        }
        if self.kd_stream:
            rec.update(kd_data_ce=float(s[4]) / kd_pred, kd_tokens=kd_tokens,
                       kd_tokens_per_s=self.n_in_kd / max(seconds, 1e-9), loss_sources=KD_STREAM_SOURCES)
        if len(s) > head:
            L = (len(s) - head) // 3
            r = s[head:] / kd_in
            drift, ent_s, ent_t = r[:L], r[L : 2 * L], r[2 * L :]
            rec.update(router_layers=layers[:L], router_drift=drift.tolist(),
                       router_entropy_student=ent_s.tolist(), router_entropy_teacher=ent_t.tolist())
        return rec


def flat_scalars(record: dict) -> dict:
    """Scalars only, per-layer lists expanded (``router_drift/layer_3``), for trackers."""
    out = {}
    layers = record.get("router_layers", [])
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list) and k.startswith("router_") and k != "router_layers":
            out.update({f"{k}/layer_{layer}": x for layer, x in zip(layers, v)})
    return out
