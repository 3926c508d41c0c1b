"""Artifacts are created with the user's umask, as any other file they write (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from nexus.io import atomic_dir, atomic_path, current_umask, write_json


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_files_and_directories_get_the_umask(tmp_path, umask_027):
    write_json(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o640
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "b.bin") == 0o640
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "adapter") == 0o750


def test_a_permissive_umask_gives_group_and_other_read(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644 and _mode(tmp_path / "d") == 0o755


def test_safetensors_get_the_umask_like_json(tmp_path, umask_027):
    """safetensors writes its file with its own 0600 mode; the artifact still gets the user's usual one."""
    import torch

    from nexus.io import save_torch, write_safetensors

    write_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    save_torch({"x": 1}, tmp_path / "state.pt")
    assert _mode(tmp_path / "w.safetensors") == _mode(tmp_path / "state.pt") == 0o640


def test_safetensors_bytes_depend_on_the_content_only(tmp_path):
    """safetensors orders metadata keys at random; written twice, an artifact is byte-identical."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from nexus.io import write_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.bfloat16)}
    metadata = {f"key{i}": f"value {i}" for i in range(6)}
    files = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for f in files:
        write_safetensors(f, tensors, metadata)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == metadata
    assert all(torch.equal(load_file(files[0])[k], v) for k, v in tensors.items())
