"""``torchrun`` entry for the FSDP2 tests: ``nexus.engines.train.train`` under accelerate's FSDP2.

accelerate selects FSDP only on accelerator devices; on a CPU-only machine the processes form a
gloo group and this script switches the accelerator's state to FSDP2 by hand, so that
``Accelerator.prepare`` shards the model with ``fully_shard`` exactly as on GPUs.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py CONFIG.json RESULT.json

CONFIG.json holds ``TrainConfig`` keyword arguments. RESULT.json (written by rank 0) says
whether every frozen parameter, gathered from its shards, is bit-identical to the checkpoint.
"""

from __future__ import annotations

import json
import sys

import torch


def main(config_path: str, result_path: str) -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    from nexus.engines.distributed import make_accelerator
    from nexus.engines.sharding import full_tensor, is_sharded
    from nexus.engines.train import train
    from nexus.engines.train_config import TrainConfig
    from nexus.loading import load_model

    torch.set_num_threads(1)
    config = TrainConfig(**json.loads(open(config_path).read()))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True)
    accelerator = make_accelerator(fsdp_plugin=plugin)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    result = train(config, accelerator=accelerator)

    reference = dict(load_model(config.model).named_parameters())
    frozen, sharded, identical = 0, 0, True
    for name, p in result.model.named_parameters():
        if p.requires_grad:
            continue
        frozen += 1
        sharded += is_sharded(p)
        identical &= torch.equal(full_tensor(p).cpu(), reference[name].detach())
    if accelerator.is_main_process:
        with open(result_path, "w") as f:
            json.dump({"frozen": frozen, "sharded": sharded, "frozen_identical": bool(identical), "step": result.step,
                       "world": accelerator.num_processes, "interrupted": result.interrupted}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
