"""Qwen2-MoE family plugin (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

Each MoE block already has a gated shared expert (``shared_expert`` scaled by
``sigmoid(shared_expert_gate(x))``). NEXUS attaches its own beside it; the native one is listed
in ``MoEBlock.native_shared`` so training code can unfreeze it too
(:func:`nexus.shared_expert.native_shared_modules`).
"""

from nexus.expert_layout import PER_EXPERT_PROJ
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily, sparse_step_layers


def example_config():
    """A tiny Qwen2-MoE: 3 layers (layer 0 dense), 8 experts, top-2, hidden 64, native shared expert 64 wide."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[0], decoder_sparse_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


# -- start qwen2_moe_spec --
SPEC = FamilySpec(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    description="Qwen2-MoE: softmax top-k router plus a native sigmoid-gated shared expert",
    num_experts="num_experts",
    top_k="num_experts_per_tok",
    intermediate_size="moe_intermediate_size",
    is_moe_layer=sparse_step_layers(),
    native_shared=("shared_expert", "shared_expert_gate"),
    export=ExportSpec(RoutedFold(width="moe_intermediate_size", normalized_by="norm_topk_prob")),
    example_config=example_config,
    experts=PER_EXPERT_PROJ,
)

plugin = SpecFamily(SPEC)
# -- end qwen2_moe_spec --
