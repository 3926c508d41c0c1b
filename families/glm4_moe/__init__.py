"""GLM-4-MoE family plugin (GLM-4.5/4.6): DeepSeek-V3's declaration under another name.

Same sigmoid router with a selection-only bias, dense first layers and native shared experts; the
checkpoints ship per-expert ``gate/up/down_proj`` in bf16.
"""

import dataclasses

from families.deepseek_v3 import SPEC as DEEPSEEK_V3
from nexus.expert_layout import PER_EXPERT_PROJ
from nexus.spec import SpecFamily


def example_config():
    """A tiny GLM-4-MoE: 3 layers (layer 0 dense), 8 routed experts + 1 shared, top-2, hidden 64."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = dataclasses.replace(
    DEEPSEEK_V3,
    name="glm4_moe",
    model_types=("glm4_moe",),
    description="Zhipu GLM-4.5/4.6: sigmoid router with e_score_correction_bias, first_k_dense_replace dense layers",
    example_config=example_config,
    experts=PER_EXPERT_PROJ,
)

plugin = SpecFamily(SPEC)
