"""``nexus export --check``: the exported directory, loaded by stock transformers in a fresh process
that never imports nexus, against base + adapter run by NEXUS on the same token ids."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nexus.errors import NexusError

log = logging.getLogger(__name__)

# Run by `python -c` in the child: load with stock transformers, write the logits, and prove that
# neither nexus nor the first-party families were imported.
CHILD = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

directory, inputs, outputs, trust = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=trust == "1")
model.eval()
logits = {}
with torch.no_grad():
    for name, ids in load_file(inputs).items():
        logits[name] = model(input_ids=ids).logits.float().contiguous()
save_file(logits, outputs)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("nexus", "families"))
assert not leaked, f"the check process imported {leaked}"
"""


def sample_inputs(vocab_size: int, sequences: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token-id batches ``{name: LongTensor[1, length]}``, random ids in ``[3, vocab)`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return {f"seq{i}": torch.randint(low, vocab_size, (1, length), generator=gen) for i in range(sequences)}


def stock_logits(directory: Path, inputs: dict[str, torch.Tensor], trust_remote_code: bool,
                 timeout: float | None = None) -> dict[str, torch.Tensor]:
    """Logits of ``directory`` loaded by ``AutoModelForCausalLM`` in a fresh Python process (fp32).

    :raises NexusError: the child failed (its last error line is quoted).
    """
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="nexus-export-check-") as tmp:
        tmp = Path(tmp)
        save_file(inputs, tmp / "inputs.safetensors")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"),
               "TRANSFORMERS_VERBOSITY": "error"}
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-c", CHILD, str(Path(directory).resolve()), str(tmp / "inputs.safetensors"),
               str(tmp / "logits.safetensors"), "1" if trust_remote_code else "0"]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            raise NexusError(f"transformers could not run the exported model in {directory}: "
                             f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        return load_file(tmp / "logits.safetensors")


def compare(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> dict:
    """Max abs logit difference and mean per-token KL(reference || exported) over every sequence."""
    diff, kl, tokens = 0.0, 0.0, 0
    for name, ref in reference.items():
        out = exported[name]
        diff = max(diff, float((ref - out).abs().max()))
        p, q = ref.float().log_softmax(-1), out.float().log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum(-1).sum())
        tokens += ref.shape[0] * ref.shape[1]
    # KL is >= 0; a tiny negative sum is rounding (identical distributions)
    return {"max_abs_logit_diff": diff, "kl_adapter_to_export": max(kl / max(tokens, 1), 0.0), "tokens": tokens,
            "sequences": len(reference)}
