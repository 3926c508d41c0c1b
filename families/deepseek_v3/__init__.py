"""DeepSeek-V3 family plugin (DeepSeek-V3/R1, Kimi-K2 style): sigmoid router with a selection-only bias.

The router scores experts with ``sigmoid``; ``gate.e_score_correction_bias`` is added only to
choose the top-k, and the first ``first_k_dense_replace`` layers are dense. Each MoE block
already has ungated ``shared_experts``.
"""

from nexus.expert_layout import PER_EXPERT_FP8
from nexus.spec import ExportSpec, FamilySpec, SlotFold, SpecFamily, dense_prefix_layers


def example_config():
    """A tiny DeepSeek-V3: 3 layers (layer 0 dense), 8 routed experts + 1 shared, top-2, hidden 64, MLA attention."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    description="DeepSeek-V3: sigmoid router with e_score_correction_bias, first_k_dense_replace dense layers",
    num_experts="n_routed_experts",
    top_k="num_experts_per_tok",
    intermediate_size="moe_intermediate_size",
    scoring="sigmoid",
    selection_bias="gate.e_score_correction_bias",
    is_moe_layer=dense_prefix_layers("first_k_dense_replace"),
    native_shared="shared_experts",
    export=ExportSpec(SlotFold()),
    example_config=example_config,
    experts=PER_EXPERT_FP8,  # the official FP8 releases keep experts packed
)

plugin = SpecFamily(SPEC)
