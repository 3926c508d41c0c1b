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


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is an optional extra")
def test_deepspeed_imported_lazily_by_a_library_prints_nothing_on_cpu(tmp_path):
    # transformers' save_pretrained imports DeepSpeed through accelerate (to unwrap an engine).
    code = ("import os, sys; os.environ.pop('DS_ACCELERATOR', None)\n"
            "import nexus\n"
            "from transformers import AutoModelForCausalLM, LlamaConfig\n"
            "cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
            "                  num_attention_heads=2, num_key_value_heads=2)\n"
            f"AutoModelForCausalLM.from_config(cfg).save_pretrained({str(tmp_path)!r})\n"
            "assert 'deepspeed' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator" not in out.stdout + out.stderr and out.stdout == ""
