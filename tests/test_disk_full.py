"""A write that finds no room (here a real file-size limit, ``ulimit -f``) ends the command with one
``Error:`` line naming the file and the errno: no traceback, no temporary left, what was written
before intact. Unit tests cover the errno found in each library's exception."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_export import base_and_adapter
from helpers_train import make_base, make_data, subprocess_env
from nexus.errors import OutputWriteError
from nexus.io import atomic_dir, atomic_path, no_room_errno, save_torch, write_safetensors

CLI = "import sys; from nexus.cli import main; sys.argv[0] = 'nexus'; main()"


def _nexus(*args, limit: int | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a child whose files may not grow beyond ``limit`` bytes (SIGXFSZ ignored, so a
    write past it fails with EFBIG as on a full filesystem)."""

    def apply_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", CLI, "-q", *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, preexec_fn=apply_limit if limit else None)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".body", ".old", ".lock"))]


def _one_error_line(r: subprocess.CompletedProcess, file: Path) -> str:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert f"cannot write {file}: File too large (errno 27); raise the file-size limit" in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base(gpt_oss_mxfp4_dir, tmp_path_factory):
    return make_base(gpt_oss_mxfp4_dir, tmp_path_factory.mktemp("disk_full") / "base")


def test_convert_over_an_adapter_with_no_room_keeps_the_old_one(base, tmp_path):
    out = tmp_path / "adapter"
    r = _nexus("convert", "--model", base, "--strategy", "mean_all", "--output", out)
    assert r.returncode == 0, r.stderr
    before = _snapshot(tmp_path)
    weights = (out / "adapter_model.safetensors").stat().st_size
    # Room for each layer's file of the work directory (a third of the weights), not for the adapter.
    r = _nexus("convert", "--model", base, "--strategy", "mean_all", "--seed", 1, "--output", out, "--overwrite",
               limit=weights * 2 // 3)
    _one_error_line(r, out / "adapter_model.safetensors")
    assert _snapshot(out) == before_of(before, "adapter")
    assert _leftovers(tmp_path) == []


def before_of(snapshot: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in snapshot.items() if k.startswith(prefix + "/")}


def test_train_checkpoint_with_no_room_keeps_the_earlier_checkpoint(base, tmp_path):
    from helpers_train import make_adapter

    adapter = make_adapter(base, tmp_path / "adapter")
    data = make_data(tmp_path / "data.jsonl", n=8)
    run = tmp_path / "run"
    common = ("--model", base, "--adapter", adapter, "--data", data, "--output", run, "--seq-len", 24,
              "--batch-size", 2, "--max-steps", 2, "--save-every", 1)
    r = _nexus("train", *common, "--stop-after", 1)
    assert r.returncode == 0, r.stderr
    step1 = run / "checkpoints" / "step-1"
    before = _snapshot(step1)
    state, weights = (step1 / "trainer_state.pt").stat().st_size, (step1 / "adapter" / "adapter_model.safetensors")
    assert state > weights.stat().st_size
    # Room for the adapter of the next checkpoint, not for its optimizer state (written by torch.save).
    r = _nexus("train", *common, "--resume", limit=(state + weights.stat().st_size) // 2)
    _one_error_line(r, run / "checkpoints" / "step-2" / "trainer_state.pt")
    assert _snapshot(step1) == before
    assert not (run / "checkpoints" / "step-2").exists() and not (run / "final").exists()
    assert _leftovers(run) == []


def test_export_over_a_checkpoint_with_no_room_keeps_the_old_one(tmp_path):
    base, adapter = base_and_adapter(tmp_path, "gpt_oss", width=40)
    out = tmp_path / "served"
    r = _nexus("export", "--model", base, "--adapter", adapter, "--output", out)
    assert r.returncode == 0, r.stderr
    before = _snapshot(out)
    r = _nexus("export", "--model", base, "--adapter", adapter, "--output", out, "--overwrite",
               limit=(out / "model.safetensors").stat().st_size // 2)
    line = _one_error_line(r, out / "model.safetensors")  # the file being written when room ran out
    assert ".tmp" not in line
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []


# --- the errno in each library's exception -------------------------------------------------------------------------


@pytest.mark.parametrize("exc, code", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), errno.EFBIG),  # safetensors
    (OSError("[Errno 122] Error writing bytes to file. Detail: [errno 122] Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None),  # torch: no errno
    (ValueError("errno 2 is not one"), None),
])
def test_no_room_errno(exc, code):
    assert no_room_errno(exc) == code


def test_the_errno_is_found_through_the_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert no_room_errno(outer) == errno.ENOSPC


def test_a_nested_write_is_named_by_its_final_path(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run" / "checkpoints" / "step-3"
    with pytest.raises(OutputWriteError) as err:
        with atomic_dir(out) as tmp:
            with atomic_dir(tmp / "adapter") as inner:
                write_safetensors(inner / "adapter_model.safetensors", {"w": torch.zeros(2)})
    assert err.value.errno == errno.ENOSPC and err.value.path == out / "adapter" / "adapter_model.safetensors"
    assert str(err.value).startswith(f"cannot write {out}/adapter/adapter_model.safetensors: No space left on device "
                                     "(errno 28); free space on that disk")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_other_failures_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.json"):
            raise KeyError("not a write")
    with pytest.raises(OSError) as err:
        with atomic_dir(tmp_path / "d"):
            raise OSError(errno.ENOENT, "No such file or directory")
    assert not isinstance(err.value, OutputWriteError)
    assert list(tmp_path.iterdir()) == []


def test_save_torch_reports_the_errno_torch_loses(tmp_path):
    """torch.save's own error says only "unexpected pos"; a limit in a child shows what save_torch says."""
    code = ("import resource, signal, sys, torch; from nexus.io import save_torch; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n    save_torch({'x': torch.zeros(10000)}, sys.argv[1])\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.pt")], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.startswith(f"OutputWriteError cannot write {tmp_path / 'state.pt'}: File too large (errno 27)"), (
        r.stdout + r.stderr)
    assert list(tmp_path.iterdir()) == []
    save_torch({"x": 1}, tmp_path / "ok.pt")
    import torch

    assert torch.load(tmp_path / "ok.pt") == {"x": 1}
