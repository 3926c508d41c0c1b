"""The optimizers ``nexus train --optim`` builds over the trainable parameters.

- ``adamw`` (default): ``torch.optim.AdamW``; fp32 state, two moments per parameter (8 bytes each);
- ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (the ``optim8bit`` extra), the same update with both
  moments stored as uint8 codes and one fp32 absmax per block of 256 values (about 2 bytes per
  parameter; tensors under 4,096 elements keep fp32 moments). It runs on CPU and CUDA tensors.

Both take the same parameter groups (the shared experts at ``--lr``, the routers at
``--router-lr``) and ``--weight-decay``, and their state goes through ``state_dict`` /
``load_state_dict`` into the checkpoint like AdamW's.
"""

from __future__ import annotations

import logging

from nexus.errors import NexusError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")
EXTRA = "optim8bit"  # pyproject's optional dependency group holding bitsandbytes

# bitsandbytes' CPU backend warns at import that an optional 4-bit matmul kernel (from the
# `kernels` package) is missing; NEXUS uses only its optimizer, so the line goes to debug. Other
# libraries import bitsandbytes too when it is installed (peft, transformers' Trainer), so
# ``import nexus`` installs the filter (this module imports torch only inside its functions).
_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOISE = ("Failed to load CPU gemm_4bit_forward",)


def _demote_noise(record: logging.LogRecord) -> bool:
    if str(record.msg).startswith(_NOISE):
        log.debug("bitsandbytes: %s", record.getMessage())
        return False
    return True


def quiet_bitsandbytes() -> None:
    """Route bitsandbytes' import-time kernel warning to this module's debug log (idempotent; imports nothing)."""
    logger = logging.getLogger(_NOISY_LOGGER)
    if _demote_noise not in logger.filters:
        logger.addFilter(_demote_noise)


def import_bitsandbytes():
    """bitsandbytes, imported quietly.

    :raises NexusError: it is not installed (naming the extra that installs it).
    """
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as exc:
        raise NexusError(f"--optim adamw8bit needs bitsandbytes, which is not installed ({exc}); install the "
                         f"extra: pip install 'nexus-moe[{EXTRA}]', or train with --optim adamw") from exc
    return bitsandbytes


def check_optim(value: str, flag: str = "--optim") -> str:
    """``value`` if it is one of :data:`OPTIMIZERS`.

    :raises NexusError: any other value.
    """
    if value not in OPTIMIZERS:
        raise NexusError(f"{flag} must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
    return value


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` (each with its own ``lr``), decoupled weight decay
    ``weight_decay``, betas (0.9, 0.999) and eps 1e-8 for both."""
    import torch

    if check_optim(name) == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    bnb = import_bitsandbytes()
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """``(bytes of every state tensor, elements of the parameters holding state)``: the optimizer's
    memory beside the weights (step counters and quantisation maps included)."""
    import torch

    nbytes = params = 0
    for p, state in optimizer.state.items():
        params += p.numel()
        nbytes += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return nbytes, params
