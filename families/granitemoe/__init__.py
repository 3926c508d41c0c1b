"""GraniteMoE family plugin (IBM Granite 3.x MoE).

The block lives at ``block_sparse_moe``; the decoder multiplies its output by
``residual_multiplier``, so a shared expert added to the block output is scaled the same way.
On disk the fused experts are renamed to ``input_linear``/``output_linear`` (same layout).
"""

from nexus.expert_layout import ExpertLayout
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny GraniteMoE: 2 layers, 4 experts, top-2, hidden 64, ``residual_multiplier`` 0.5."""
    from transformers import GraniteMoeConfig

    return GraniteMoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="granitemoe",
    model_types=("granitemoe",),
    description="IBM GraniteMoE: top-k on logits then softmax, block output scaled by residual_multiplier",
    num_experts="num_local_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    block="block_sparse_moe",
    router="router",
    export=ExportSpec(RoutedFold(width="intermediate_size")),
    example_config=example_config,
    experts=ExpertLayout(
        gate_up=(
            "model.layers.{layer}.block_sparse_moe.input_linear.weight",
            "model.layers.{layer}.block_sparse_moe.experts.gate_up_proj",
        ),
        down=(
            "model.layers.{layer}.block_sparse_moe.output_linear.weight",
            "model.layers.{layer}.block_sparse_moe.experts.down_proj",
        ),
    ),
)

plugin = SpecFamily(SPEC)
