"""Qwen3-MoE family plugin (Qwen3-30B-A3B, Qwen3-235B-A22B): dense layers set by mlp_only_layers/decoder_sparse_step."""

from nexus.expert_layout import PER_EXPERT_FP8
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily, sparse_step_layers


def example_config():
    """A tiny Qwen3-MoE: 3 layers (layer 1 dense through ``mlp_only_layers``), 8 experts, top-2, hidden 64."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1], decoder_sparse_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    description="Qwen3-MoE: softmax top-k router; mlp_only_layers/decoder_sparse_step pick dense layers",
    num_experts="num_experts",
    top_k="num_experts_per_tok",
    intermediate_size="moe_intermediate_size",
    is_moe_layer=sparse_step_layers(),
    export=ExportSpec(RoutedFold(width="moe_intermediate_size", normalized_by="norm_topk_prob")),
    example_config=example_config,
    experts=PER_EXPERT_FP8,  # the official FP8 releases keep experts packed
)

plugin = SpecFamily(SPEC)
