"""DeepSpeed, imported by NEXUS before any process group exists, prints nothing on a CPU machine."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is an optional extra")
def test_importing_deepspeed_through_nexus_prints_nothing_on_cpu():
    code = ("import os; os.environ.pop('DS_ACCELERATOR', None)\n"
            "from nexus.training.distributed import _import_group_default_holders\n"
            "_import_group_default_holders()\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "assert get_accelerator().device_name() == 'cpu'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator" not in out.stdout + out.stderr and out.stdout == ""
