"""ERNIE-4.5-MoE family plugin (ERNIE-4.5-21B-A3B, -300B-A47B).

Softmax router whose top-k choice adds ``moe_statics.e_score_correction_bias`` (the weights stay
the unbiased probabilities). MoE layers are every ``moe_layer_interval``-th layer between
``moe_layer_start_index`` and ``moe_layer_end_index``; the others are dense. Blocks have ungated
``shared_experts`` when ``moe_num_shared_experts > 0``.
"""

from nexus.expert_layout import PER_EXPERT_PROJ
from nexus.spec import ExportSpec, FamilySpec, SlotFold, SpecFamily, interval_layers


def example_config():
    """A tiny ERNIE-4.5-MoE: 3 layers (layer 0 dense), 8 experts + 1 shared, top-2, hidden 64."""
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
        moe_layer_end_index=-1, moe_layer_interval=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    description="Baidu ERNIE-4.5-MoE: softmax router with a selection-only correction bias, interval MoE layers",
    num_experts="moe_num_experts",
    top_k="moe_k",
    intermediate_size="moe_intermediate_size",
    selection_bias="gate.moe_statics.e_score_correction_bias",
    is_moe_layer=interval_layers("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index"),
    native_shared="shared_experts",
    export=ExportSpec(SlotFold(count="moe_num_shared_experts")),
    example_config=example_config,
    experts=PER_EXPERT_PROJ,
)

plugin = SpecFamily(SPEC)
