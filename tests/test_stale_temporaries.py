"""A process killed while writing leaves its temporary behind; the next write into that directory
on the same host removes it, and never touches the temporary of a live process or of another host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers_train import subprocess_env
from nexus.io import atomic_dir, atomic_path, remove_stale_temporaries, write_json


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _killed_while_writing(out: Path, kind: str = "atomic_dir") -> str:
    """Run a process that dies (SIGKILL) inside ``atomic_dir(out)`` (or ``atomic_path``); the temporary it left."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from nexus.io import {kind}
        with {kind}(sys.argv[1]) as tmp:
            (tmp / "weights" if tmp.is_dir() else tmp).write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = _temporaries(out.parent)
    assert len(left) == 1 and left[0].startswith(f".{out.name}."), left
    return left[0]


def test_the_next_write_removes_a_dead_process_temporary(tmp_path):
    out = tmp_path / "served"
    stale = _killed_while_writing(out)
    assert ".pid" in stale
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"y")
    assert _temporaries(tmp_path) == [] and (out / "weights").read_bytes() == b"y"


def test_a_dead_process_file_temporary_goes_too(tmp_path):
    out = tmp_path / "eval.json"
    _killed_while_writing(out, "atomic_path")
    write_json(tmp_path / "other.json", {})  # any write into the directory cleans it
    assert _temporaries(tmp_path) == []


def test_a_live_process_temporary_is_left_alone(tmp_path):
    out = tmp_path / "served"
    code = textwrap.dedent("""
        import sys, time
        from nexus.io import atomic_dir
        with atomic_dir(sys.argv[1]) as tmp:
            print("writing", flush=True)
            sys.stdin.read()  # until the test closes stdin
    """)
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], env=subprocess_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        theirs = _temporaries(tmp_path)
        assert len(theirs) == 1 and f".pid{child.pid}@" in theirs[0]
        with atomic_dir(tmp_path / "mine") as tmp:
            (tmp / "f").write_text("x")
        assert remove_stale_temporaries(tmp_path) == []
        assert _temporaries(tmp_path) == theirs
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert child.returncode == 0 and _temporaries(tmp_path) == [] and out.is_dir()


def test_another_host_or_an_unknown_writer_is_left_alone(tmp_path):
    dead = _dead_pid()
    foreign = [f".served.abc123.pid{dead}@some-other-host.tmp", ".served.k2j3h4.tmp", f".x.pid{dead}@.tmp",
               "served.pid1@h.tmp"]
    for name in foreign:
        (tmp_path / name).mkdir()
    with atomic_path(tmp_path / "served") as tmp:
        tmp.write_text("x")
    assert _temporaries(tmp_path) == sorted(foreign)


def _dead_pid() -> int:
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(r.stdout)


def test_a_killed_export_leaves_nothing_after_the_next_export(tmp_path):
    """The case that costs most: a partial checkpoint of the size of the base, removed by the next run."""
    from helpers_export import base_and_adapter

    base, adapter = base_and_adapter(tmp_path, "gpt_oss", width=40)
    out = tmp_path / "served"
    code = textwrap.dedent("""
        import os, signal, sys
        from nexus.engines import export_files
        from nexus.engines.export import export

        def die(self, name, raw):  # killed part-way through the first weights file
            os.kill(os.getpid(), signal.SIGKILL)

        export_files.StreamingWriter.copy_raw = die
        export(sys.argv[1], sys.argv[2], sys.argv[3])
    """)
    r = subprocess.run([sys.executable, "-c", code, str(base), str(adapter), str(out)], env=subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".served.")
    from nexus.cli import cli

    result = CliRunner().invoke(cli, ["export", "--model", str(base), "--adapter", str(adapter), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".served")] == []  # the dead lock went too


@pytest.mark.parametrize("pid_alive", [True, False])
def test_only_this_host_dead_pids_are_stale(tmp_path, monkeypatch, pid_alive):
    from nexus import io

    name = f".out.zz.pid{os.getpid() + 1}@{io._host_tag()}.tmp"
    (tmp_path / name).write_text("x")
    monkeypatch.setattr(io, "_pid_alive", lambda pid: pid_alive)
    removed = remove_stale_temporaries(tmp_path)
    assert (removed == []) == pid_alive and (tmp_path / name).exists() == pid_alive


def test_an_output_moved_aside_by_a_killed_replacement_is_restored(tmp_path):
    """Killed between moving the previous output aside and moving the new one in: the next write
    puts the previous output back (it never deletes it), whether or not the new write succeeds."""
    out = tmp_path / "adapter"
    aside = tmp_path / ".adapter.old"
    aside.mkdir()
    (aside / "weights").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("the new write fails")
    assert (out / "weights").read_text() == "previous" and not aside.exists()
    os.replace(out, aside)  # killed again at the same point
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and not aside.exists()
