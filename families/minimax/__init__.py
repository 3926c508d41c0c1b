"""MiniMax family plugin (MiniMax-Text-01): Mixtral's declaration under another name.

The MoE block is Mixtral's, behind hybrid lightning/full attention. The decoder computes
``residual * mlp_alpha_factor + block_out * mlp_beta_factor``, so a shared expert added to the
block output is scaled by ``mlp_beta_factor`` like the routed experts.
"""

import dataclasses

from families.mixtral import SPEC as MIXTRAL
from nexus.spec import SpecFamily


def example_config():
    """A tiny MiniMax: a lightning-attention and a full-attention layer, 4 experts, top-2, hidden 64."""
    from transformers import MiniMaxConfig

    return MiniMaxConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
        block_size=16, mlp_alpha_factor=1.0, mlp_beta_factor=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = dataclasses.replace(
    MIXTRAL,
    name="minimax",
    model_types=("minimax",),
    description="MiniMax-Text-01: Mixtral-style MoE, block output scaled by mlp_beta_factor",
    example_config=example_config,
)

plugin = SpecFamily(SPEC)
