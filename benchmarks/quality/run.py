"""Orchestration: corpora -> tokenizer -> cached base models -> LR sweep x methods x seeds.

Per base model the parent process prepares a *context* (evaluation rows, the base model's
perplexities and router probabilities, the expert selection of the product's ``collect`` and
``select`` stages, LoRA ranks matched to the NEXUS budgets) in the work directory; each (method, LR, seed) run then executes in a fresh
spawned process (so its peak RSS is its own) and writes one JSON there. Finished runs are
reused while their method's variant definition is unchanged, so an interrupted benchmark resumes
where it stopped.

LR selection: every method is first run with seed 0 over the same grid; the best LR is the
one with the lowest final held-out *validation* domain perplexity (the test split is only
reported). When the best LR sits on an edge of the grid, the grid grows by one step on that
side (up to ``lr_extensions`` times); a best LR still on the edge is flagged in the report.
The remaining seeds then run at the best LR.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality.config import BenchConfig, ModelRecipe, digest
from benchmarks.quality.corpus import DOMAINS, general_corpus
from benchmarks.quality.evaluate import perplexity, router_drift, router_probs
from benchmarks.quality.methods import (
    METHODS,
    METHODS_BY_NAME,
    Method,
    count_trainable,
    matched_rank,
    nexus_budget,
    prepare_full_experts,
    prepare_lora,
    shared_width,
    training_definition,
)
from benchmarks.quality.pretrain import build_config, cached_base
from benchmarks.quality.rows import spread, stream_rows
from benchmarks.quality.tokenizer import cached_stream, cached_tokenizer
from benchmarks.quality.trainer import TrainSettings, eval_steps, train
from nexus.io import atomic_path, write_json

log = logging.getLogger(__name__)

EVAL_SPLITS = ("domain_val", "domain_test", "general_test")
RUN_FORMAT = 4  # bump when a change to the runs invalidates cached run results


def bench_cache() -> Path:
    """``nexus.demo.cache_root() / "bench"`` (``$NEXUS_CACHE`` respected)."""
    from nexus.demo import cache_root

    return cache_root() / "bench"


# --------------------------------------------------------------------------- inputs


def prepare_inputs(cfg: BenchConfig, cache: Path, domain: str = "python") -> dict:
    """Corpora, the tokenizer and every split's cached token stream.

    :param domain: the adaptation domain, a key of :data:`benchmarks.quality.corpus.DOMAINS`.

    :return: ``general``/``domain`` corpora, ``tokenizer``, ``tokenizer_dir``,
        ``streams[(corpus, split)]`` -> path of a ``uint16`` ``.npy`` stream (evaluation and
        pretraining), ``domain_train_jsonl``: the domain training documents, one JSON
        ``{"text": ...}`` per line, which every adaptation method trains on (packed by
        :func:`nexus.data.load_token_data`), and ``general_train_jsonl``: the general training
        documents, the distillation stream of ``kd_on="general"`` variants (``--kd-data``).
    """
    general = general_corpus(max_chars=cfg.general_max_chars)
    domain = DOMAINS[domain][0](max_chars=cfg.domain_max_chars)
    tokenizer, tok_dir = cached_tokenizer(general.texts("train"), cfg.vocab_size, cache, general.fingerprint)
    data_path = _write_jsonl(cache / "streams" / f"domain-train-{domain.fingerprint}.jsonl", domain.texts("train"))
    general_path = _write_jsonl(cache / "streams" / f"general-train-{general.fingerprint}.jsonl",
                                general.texts("train"))
    streams = {}
    for corpus in (general, domain):
        for split in ("train", "val", "test"):
            key = f"stream-{digest(tok_dir.name, corpus.fingerprint, split)}"
            cached_stream(tokenizer, corpus.texts(split), cache / "streams", key)
            streams[(corpus.name, split)] = cache / "streams" / f"{key}.npy"
    return {"general": general, "domain": domain, "tokenizer": tokenizer, "tokenizer_dir": tok_dir, "streams": streams,
            "domain_train_jsonl": data_path, "general_train_jsonl": general_path}


def _write_jsonl(path: Path, texts) -> Path:
    """``texts`` as one JSON ``{"text": ...}`` per line at ``path`` (kept when it exists). :return: ``path``."""
    if not path.exists():
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for text in texts:
                    f.write(json.dumps({"text": text}) + "\n")
    return path


def _rows(inputs: dict, corpus: str, split: str, seq_len: int) -> torch.Tensor:
    return stream_rows(np.load(inputs["streams"][(corpus, split)]), seq_len)


def _family(name: str):
    """The registered NEXUS family ``name``, or None when no plugin provides it."""
    from nexus.errors import FamilyError
    from nexus.family import resolve_family

    try:
        return resolve_family(name=name)
    except FamilyError:
        return None


def _expert_width(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def budget_keys() -> dict:
    """Per LoRA variant, a digest of its definition and of the NEXUS variant its budget follows."""
    return {m.name: digest(m.definition(), METHODS_BY_NAME[m.budget_of].definition())
            for m in METHODS if m.kind.startswith("lora") and m.budget_of}


def match_budgets(recipe: ModelRecipe, family, width: int) -> tuple[dict, dict]:
    """Trainable counts of the NEXUS variants that LoRA variants are matched to, and those LoRA ranks.

    :param family: the NEXUS family (None: count the shared experts' weights alone).
    :param width: the routed expert width.
    :return: ``(budgets {nexus variant: count}, ranks {lora variant: r})``.
    """
    from transformers import AutoModelForCausalLM

    config = build_config(recipe)
    factory = lambda: AutoModelForCausalLM.from_config(config)  # noqa: E731
    budgets: dict[str, int] = {}
    if family is not None:
        for name in sorted({m.budget_of for m in METHODS if m.budget_of}):
            m = METHODS_BY_NAME[name]
            budgets[name] = nexus_budget(factory(), family, m, shared_width(m, width))
    ranks: dict[str, int] = {}
    for m in METHODS:
        if m.kind.startswith("lora") and m.budget_of:
            budget = budgets.get(m.budget_of)
            if budget is None:  # no family to count with: the shared expert's weights alone
                shared = shared_width(METHODS_BY_NAME[m.budget_of], width)
                budget = config.num_hidden_layers * 3 * config.hidden_size * shared
            ranks[m.name], _ = matched_rank(factory, m, budget)
    return budgets, ranks


def build_context(cfg: BenchConfig, recipe: ModelRecipe, inputs: dict, cache: Path, work: Path) -> dict:
    """Pretrain (or reuse) the base model of ``recipe`` and prepare everything its runs share.

    :return: the context dict, also written to ``work/context.json`` (tensors beside it in
        ``context.pt``): base path and pretraining record, base perplexities, the expert
        selection file, trainable budgets and LoRA ranks (for every method of :data:`METHODS`).
    """
    from benchmarks.quality import nexus_path
    from nexus.data import load_token_data
    from nexus.loading import load_model

    path = work / "context.json"
    if path.exists():
        ctx = json.loads(path.read_text())
        stale = ctx.get("general_jsonl") != str(inputs["general_train_jsonl"])
        ctx["general_jsonl"] = str(inputs["general_train_jsonl"])
        if ctx.get("budget_keys") != budget_keys():  # a variant file was added or changed since
            family = _family(recipe.family)
            ctx["nexus_budgets"], ctx["lora_ranks"] = match_budgets(recipe, family, ctx["expert_width"])
            ctx["budget_keys"] = budget_keys()
            stale = True
        if stale:
            write_json(path, ctx)
        return ctx
    general = inputs["general"]
    base_key = recipe.key(inputs["tokenizer_dir"].name, general.fingerprint)
    base_path, record = cached_base(
        recipe,
        inputs["tokenizer"],
        base_key,
        cache,
        train_rows=_rows(inputs, "general", "train", recipe.seq_len),
        val_rows=spread(_rows(inputs, "general", "val", recipe.seq_len), 32),
        test_rows={
            "general_test": spread(_rows(inputs, "general", "test", recipe.seq_len), 64),
            "domain_test": spread(_rows(inputs, "domain", "test", recipe.seq_len), 64),
        },
        device=cfg.device,
    )
    eval_rows = {
        "domain_val": spread(_rows(inputs, "domain", "val", cfg.seq_len), cfg.eval_rows["domain_val"]),
        "domain_test": spread(_rows(inputs, "domain", "test", cfg.seq_len), cfg.eval_rows["domain_test"]),
        "general_test": spread(_rows(inputs, "general", "test", cfg.seq_len), cfg.eval_rows["general_test"]),
    }
    drift_rows = {
        "domain": spread(eval_rows["domain_test"], cfg.drift_rows),
        "general": spread(eval_rows["general_test"], cfg.drift_rows),
    }
    model = load_model(base_path, device=cfg.device)
    top_k = model.config.num_experts_per_tok
    base_ppl = {name: perplexity(model, rows) for name, rows in eval_rows.items()}
    base_probs = {name: router_probs(model, rows) for name, rows in drift_rows.items()}
    load = base_probs["domain"].topk(top_k, -1).indices
    expert_load = [torch.bincount(load[i].reshape(-1), minlength=base_probs["domain"].shape[-1]).tolist() for i in range(len(load))]

    family = _family(recipe.family)
    width = _expert_width(model.config)
    work.mkdir(parents=True, exist_ok=True)
    data = load_token_data(inputs["domain_train_jsonl"], inputs["tokenizer"], cfg.seq_len)
    selection_path = None
    if family is not None:
        k = min(cfg.nexus_top_k, family.moe_blocks(model)[0].num_experts)
        selection_path = nexus_path.select_stage(base_path, inputs["domain_train_jsonl"], cfg.seq_len,
                                                 cfg.collect_rows * cfg.seq_len, k, work / "select")
    budgets, ranks = match_budgets(recipe, family, width)
    del model

    tensors_path = work / "context.pt"
    torch.save({"eval_rows": eval_rows, "drift_rows": drift_rows, "base_probs": base_probs}, tensors_path)
    ctx = {
        "model": recipe.name,
        "family": recipe.family,
        "family_registered": family is not None,
        "base_path": str(base_path),
        "base_key": base_key,
        "pretrain": record,
        "base_ppl": base_ppl,
        "base_expert_load_domain": expert_load,
        "top_k": top_k,
        "expert_width": width,
        "nexus_budgets": budgets,
        "lora_ranks": ranks,
        "budget_keys": budget_keys(),
        "nexus_pipeline": "nexus stages",
        "selection_path": str(selection_path) if selection_path else None,
        "tensors": str(tensors_path),
        "train_jsonl": str(inputs["domain_train_jsonl"]),
        "general_jsonl": str(inputs["general_train_jsonl"]),
        "domain_train_rows": len(data.rows),
        "seq_len": cfg.seq_len,
        "config": asdict(cfg),
    }
    write_json(path, ctx)
    return ctx


# --------------------------------------------------------------------------- one run


def prepare_method(ctx: dict, method: Method, model):
    """Turn the loaded base ``model`` into a baseline ``method``'s trainable :class:`Prepared`."""
    if method.kind in ("lora_experts", "lora_attention"):
        return prepare_lora(model, method, ctx["lora_ranks"][method.name])
    if method.kind == "full_experts":
        return prepare_full_experts(model)
    raise ValueError(f"method kind {method.kind!r} has no baseline loop")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (``VmHWM``) by writing 5 to ``/proc/self/clear_refs``.

    :return: whether it worked (Linux >= 4.0); when not, :func:`peak_rss_mb` is the process's
        peak since it started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB: ``VmHWM`` from ``/proc/self/status``.

    Not ``getrusage``: its ``ru_maxrss`` survives ``exec``, so a spawned worker would report the
    parent's resident size at fork time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_train_data(ctx: dict, path: str | None = None):
    """Training rows loaded as the training engine loads them: the base model's tokenizer
    (:func:`nexus.data.load_tokenizer`) and :func:`nexus.data.load_token_data` on the domain
    training documents, or on ``path`` (the general text of ``kd_on="general"``). Every method
    pays the same data-loading memory.

    :return: a :class:`nexus.data.TokenData`.
    """
    from nexus.data import load_token_data, load_tokenizer

    return load_token_data(path or ctx["train_jsonl"], load_tokenizer(ctx["base_path"]), ctx["seq_len"])


def settings_of(cfg: dict, method: Method, lr: float, seed: int) -> TrainSettings:
    """One run's optimisation settings: the preset's budget and schedule, the variant's loss and SFA."""
    sfa_every = max(1, round(method.sfa_interval_frac * cfg["steps"])) if method.sfa_interval_frac else 0
    return TrainSettings(
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=lr,
        seed=seed,
        warmup_frac=cfg["warmup_frac"],
        kd_weight=method.kd_weight,
        kd_temperature=float(method.train.get("temperature", 1.0)),
        kd_on=method.kd_on,
        kd_batch_size=method.train.get("kd_batch_size"),
        sfa_beta=float(method.train.get("sfa_beta", 0.5)) if sfa_every else 0.0,
        sfa_every=sfa_every,
        eval_at=eval_steps(cfg["steps"], cfg["eval_points"]),
    )


def variant_digest(method: Method) -> str:
    """16 hex chars over ``method``'s resolved definition: a cached run is reused only under the same one."""
    return digest(method.definition())


def same_training(done: dict, method: Method) -> bool:
    """Whether a finished run (its JSON) trained ``method`` as defined now: the definitions are
    equal but for the presentation keys (:data:`benchmarks.quality.methods.PRESENTATION_KEYS`),
    so retitling a variant or marking it a milestone keeps its runs."""
    if done.get("variant_digest") == variant_digest(method):
        return True
    if "variant" not in done:
        return False
    return training_definition(done["variant"]) == training_definition(method.definition())


def run_one(job: dict) -> dict:
    """Run one (method, LR, seed) adaptation and write its JSON (see the module docstring).

    NEXUS methods go through the product's ``convert`` and ``train`` stages
    (:func:`benchmarks.quality.nexus_path.train_nexus`); the baselines through :func:`trainer.train`.
    Every perplexity is :func:`benchmarks.quality.evaluate.perplexity` (:mod:`nexus.losses`).

    :param job: ``context`` (path of context.json), ``method``, ``lr``, ``seed``, ``out`` (JSON
        path), ``threads`` (torch threads; default the context's), ``isolated`` (running in its
        own process), ``log_level``.
    :return: the run's result dict.
    """
    import shutil

    from benchmarks.quality import nexus_path
    from nexus.loading import load_model

    logging.basicConfig(level=job.get("log_level", logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = json.loads(Path(job["context"]).read_text())
    cfg = ctx["config"]
    torch.set_num_threads(job.get("threads") or cfg["threads"])
    method = METHODS_BY_NAME[job["method"]]
    seed, lr = job["seed"], job["lr"]
    rss_reset = reset_peak_rss()
    tensors = torch.load(ctx["tensors"])
    settings = settings_of(cfg, method, lr, seed)
    device = cfg.get("device", "cpu")

    def evaluate_model(model, step: int) -> dict:
        model.eval()
        return {f"{name}_ppl": perplexity(model, rows) for name, rows in tensors["eval_rows"].items()}

    t_start = time.perf_counter()
    if method.kind == "nexus":
        width = shared_width(method, ctx["expert_width"])
        scratch = Path(job["out"]).with_suffix(".work")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            out = nexus_path.train_nexus(method, ctx["base_path"], ctx["train_jsonl"], ctx["selection_path"], width,
                                         settings, ctx["seq_len"], scratch, evaluate_model,
                                         general_path=ctx.get("general_jsonl"), device=device)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        trained = out.pop("model")
        initial = out.pop("initial")
        trainable = out.pop("trainable")
        info = {"pipeline": "nexus stages", "shared_intermediate_size": width, "gate": method.gate,
                "init": method.init, "kd_on": method.kd_on, **out.pop("configs")}
        record = out
    else:
        data = load_train_data(ctx)
        # LoRA and full fine-tuning of the experts need them as float parameters, not packed bytes.
        model = load_model(ctx["base_path"], dequantize=True, device=device)
        torch.manual_seed(seed)
        prepared = prepare_method(ctx, method, model)
        initial = evaluate_model(prepared.model, 0)
        kd_data = load_train_data(ctx, ctx["general_jsonl"]) if method.kd_on == "general" else None
        record = train(prepared, data, settings, lambda step: evaluate_model(prepared.model, step), kd_data=kd_data)
        trained, trainable = prepared.model, count_trainable(prepared)
        info = {"pipeline": "benchmark loop", **prepared.info}
    wall = time.perf_counter() - t_start
    drift = {}
    if not record["diverged"]:
        for name, rows in tensors["drift_rows"].items():
            drift[name] = router_drift(router_probs(trained, rows), tensors["base_probs"][name], ctx["top_k"])
    final = record["evals"][-1] if record["evals"] and not record["diverged"] else {}
    result = {
        "model": ctx["model"],
        "method": method.name,
        "lr": lr,
        "seed": seed,
        "variant": method.definition(),
        "variant_digest": variant_digest(method),
        "trainable_params": trainable,
        "info": info,
        "initial": {k: initial[k] for k in ("domain_test_ppl", "general_test_ppl")},
        "final": {k: final.get(f"{k}_ppl", float("inf")) for k in EVAL_SPLITS},
        "router_drift": drift,
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_isolated": bool(job.get("isolated")),
        "rss_reset": rss_reset,
        "data_loading": "load_token_data",
        **record,
    }
    write_json(job["out"], result)
    return result


def execute(jobs: list[dict], isolate: bool, workers: int = 1) -> list[dict]:
    """Run ``jobs``, each in a fresh spawned process when ``isolate``; a job whose JSON exists with
    the same variant definition (:func:`variant_digest`) is reused. :return: results in job order."""
    results: dict[int, dict] = {}
    todo = []
    for i, job in enumerate(jobs):
        done = json.loads(Path(job["out"]).read_text()) if Path(job["out"]).exists() else None
        if done is not None and same_training(done, METHODS_BY_NAME[job["method"]]):
            results[i] = done
        else:
            todo.append(i)
    if todo:
        log.info("%d runs to do (%d reused)", len(todo), len(jobs) - len(todo))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="adaptation runs", unit="run", leave=False, disable=None)
    if isolate and todo:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run_one, {**jobs[i], "isolated": True}): i for i in todo}
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    else:
        for i in todo:
            results[i] = run_one({**jobs[i], "isolated": False})
            bar.update(1)
    bar.close()
    return [results[i] for i in range(len(jobs))]


def carry_over(results_path: Path, cache: Path) -> int:
    """Seed the run cache with the runs of an earlier results JSON of the same experiment.

    A run is carried over when its work directory (named by a hash of the adaptation settings,
    the base model's recipe and the corpora: everything that changes a result but the variant's
    definition, which :func:`execute` checks) is
    the same as now, and it loaded its training data as runs do now (the training engine, or
    :func:`load_train_data`); runs already in the cache are kept. Each carried run records
    ``carried_from`` (the file and the date of the earlier benchmark), because its timings and
    peak RSS were measured then.

    The base model is checked when the benchmark runs (:func:`drop_mismatched_carried`): a
    carried run whose base perplexities differ from the rebuilt base's is deleted.

    :return: the number of runs written into the cache.
    """
    results = json.loads(Path(results_path).read_text())
    written = 0
    for model in results.get("models", {}).values():
        work = Path(cache) / "quality-runs" / Path(model["work_dir"]).name
        for name, entry in model["methods"].items():
            for run in entry["runs"]:
                if run.get("data_loading") != "load_token_data" and run["info"].get("pipeline") not in ("engines", "nexus stages"):
                    continue
                out = Path(_job(work, name, run["lr"], run["seed"], 0, 1)["out"])
                if out.exists():
                    continue
                write_json(out, {**run, "carried_from": f"{Path(results_path).name} (started {results['started']})",
                                 "carried_base_ppl": model["context"]["base_ppl"]})
                written += 1
    return written


def drop_mismatched_carried(work: Path, ctx: dict) -> int:
    """Delete carried-over runs (:func:`carry_over`) of ``work`` whose base model's held-out
    perplexities are not exactly those of the base in ``ctx``: another base, so not the same
    experiment. :return: how many were deleted (each is logged)."""
    dropped = 0
    for path in sorted((work / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        if "carried_from" in run and run.get("carried_base_ppl") != ctx["base_ppl"]:
            log.warning("dropping %s, carried from %s: its base model differs from this one", path, run["carried_from"])
            path.unlink()
            dropped += 1
    return dropped


# --------------------------------------------------------------------------- sweep


def _score(result: dict) -> float:
    v = result["final"]["domain_val"]
    return v if result.get("diverged") is False and np.isfinite(v) else float("inf")


def _job(work: Path, method: str, lr: float, seed: int, level: int, threads: int) -> dict:
    return {
        "threads": threads,
        "context": str(work / "context.json"),
        "method": method,
        "lr": lr,
        "seed": seed,
        "out": str(work / "runs" / method / f"lr{lr:.3g}-seed{seed}.json"),
        "log_level": level,
    }


def sweep(cfg: BenchConfig, work: Path, methods: list[Method], skipped: dict, isolate: bool, workers: int) -> dict:
    """The LR sweep (seed 0, growing past edges) then the extra seeds at each method's best LR.

    :return: ``{method: {"grid": [...], "best_lr": lr, "edge": None|"low"|"high", "runs": [result, ...]}}``.
    """
    level = logging.getLogger().getEffectiveLevel()
    names = [m.name for m in methods if m.name not in skipped]
    base = sorted(cfg.lrs)
    ratio = base[1] / base[0] if len(base) > 1 else 10.0
    grids = {n: list(base) for n in names}
    by_key: dict[tuple, dict] = {}
    for round_ in range(cfg.lr_extensions + 1):
        jobs = [_job(work, n, lr, 0, level, cfg.threads) for n in names for lr in grids[n] if (n, lr, 0) not in by_key]
        for job, res in zip(jobs, execute(jobs, isolate, workers)):
            by_key[(job["method"], job["lr"], 0)] = res
        grew = False
        for n in names:
            scores = [_score(by_key[(n, lr, 0)]) for lr in grids[n]]
            best = int(np.argmin(scores))
            if round_ < cfg.lr_extensions and len(grids[n]) > 1:
                if best == 0:
                    grids[n].insert(0, float(f"{grids[n][0] / ratio:.3g}"))
                    grew = True
                elif best == len(grids[n]) - 1:
                    grids[n].append(float(f"{grids[n][-1] * ratio:.3g}"))
                    grew = True
        if not grew:
            break
    out = {}
    seed_jobs = []
    for n in names:
        scores = [_score(by_key[(n, lr, 0)]) for lr in grids[n]]
        best = int(np.argmin(scores))
        edge = None
        if len(grids[n]) > 1 and best in (0, len(grids[n]) - 1):
            edge = "low" if best == 0 else "high"
        out[n] = {"grid": grids[n], "best_lr": grids[n][best], "edge": edge}
        seed_jobs += [_job(work, n, grids[n][best], s, level, cfg.threads) for s in range(1, cfg.seeds)]
    for job, res in zip(seed_jobs, execute(seed_jobs, isolate, workers)):
        by_key[(job["method"], job["lr"], job["seed"])] = res
    for n in names:
        out[n]["runs"] = [r for (m, _, _), r in by_key.items() if m == n]
    return out


def environment() -> dict:
    """Where the benchmark ran (for the results JSON): :func:`benchmarks.common.machine` plus peft's version."""
    from benchmarks.common import machine

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    env = machine()
    return {**env, "peft": peft_version, "load_average_at_start": env["load_average"]}


def run_benchmark(
    cfg: BenchConfig,
    methods: list[Method],
    models: list[str] | None = None,
    workers: int = 1,
    cache: Path | None = None,
    domain: str = "python",
) -> dict:
    """Run the whole benchmark and return the raw results (see :mod:`benchmarks.quality.report`).

    :param methods: methods to compare.
    :param models: recipe names to run (default all of the preset's).
    :param workers: concurrent runs (keep 1 when timing matters).
    :param cache: cache root (default :func:`bench_cache`).
    :param domain: the adaptation domain (:data:`benchmarks.quality.corpus.DOMAINS`); its runs have
        their own work directories (keyed by the corpus fingerprint).
    """
    from benchmarks.quality.device import require_device

    require_device(cfg.device, cfg.preset)
    cache = Path(cache or bench_cache())
    started = time.time()
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    inputs = prepare_inputs(cfg, cache, domain)
    results = {
        "benchmark": "quality",
        "preset": cfg.preset,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "environment": environment(),
        "config": asdict(cfg),
        "corpora": {"general": inputs["general"].summary(), "domain": inputs["domain"].summary()},
        "domain": {"name": domain, "label": DOMAINS[domain][1]},
        "tokenizer": {"path": str(inputs["tokenizer_dir"]), "vocab_size": len(inputs["tokenizer"])},
        "tokens": {f"{c}_{s}": int(np.load(p, mmap_mode="r").shape[0]) for (c, s), p in inputs["streams"].items()},
        "methods": {m.name: asdict(m) for m in methods},
        "models": {},
    }
    for recipe in cfg.models:
        if models and recipe.name not in models:
            continue
        base_key = recipe.key(inputs["tokenizer_dir"].name, inputs["general"].fingerprint)
        run_key = digest(RUN_FORMAT, cfg.adaptation_dict(), base_key, inputs["domain"].fingerprint)
        work = cache / "quality-runs" / f"{cfg.preset}-{recipe.name}-{run_key}"
        t_model = time.perf_counter()
        ctx = build_context(cfg, recipe, inputs, cache, work)
        drop_mismatched_carried(work, ctx)
        skipped = {
            m.name: f"no NEXUS family {recipe.family!r} is registered"
            for m in methods
            if m.needs_family and not ctx["family_registered"]
        }
        per_method = sweep(cfg, work, methods, skipped, cfg.isolate, workers)
        results["models"][recipe.name] = {
            "context": {k: v for k, v in ctx.items() if k not in ("config",)},
            "work_dir": str(work),
            "methods": per_method,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - t_model, 1),
        }
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results
