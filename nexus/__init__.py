"""NEXUS: fine-tune frozen Mixture-of-Experts models through one small shared expert per MoE block."""

__version__ = "0.1.0"

from nexus.hookspecs import hookimpl  # noqa: E402
from nexus.training.deepspeed_import import install as _quiet_deepspeed  # noqa: E402
from nexus.training.optimizers import quiet_bitsandbytes as _quiet_bitsandbytes  # noqa: E402

_quiet_deepspeed()
_quiet_bitsandbytes()

__all__ = ["__version__", "hookimpl", "load_adapter", "save_adapter", "attach_shared_experts", "disable_shared_experts",
           "export", "get_nexus_model", "NexusConfig", "NexusModel"]


def __getattr__(name):
    # The heavy modules (torch, transformers) load only when their API is used, so that
    # `import nexus` in a plugin's module stays cheap.
    if name in ("load_adapter", "save_adapter"):
        from nexus import adapter

        return getattr(adapter, name)
    if name in ("attach_shared_experts", "disable_shared_experts"):
        from nexus import shared_expert

        return getattr(shared_expert, name)
    if name == "export":
        from nexus.engines.export import export

        return export
    if name in ("get_nexus_model", "NexusConfig", "NexusModel"):
        from nexus.trainers import model

        return getattr(model, name)
    raise AttributeError(f"module 'nexus' has no attribute {name!r}")
