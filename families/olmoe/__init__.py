"""OLMoE family plugin (OLMoE-1B-7B): softmax top-k router, 64 small experts per layer."""

from nexus.expert_layout import PER_EXPERT_PROJ
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny OLMoE: 2 layers, 8 experts, top-2, hidden 64, expert width 32."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="olmoe",
    model_types=("olmoe",),
    description="AllenAI OLMoE: softmax top-k router (renormalised only with norm_topk_prob)",
    num_experts="num_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    export=ExportSpec(RoutedFold(width="intermediate_size", normalized_by="norm_topk_prob")),
    example_config=example_config,
    experts=PER_EXPERT_PROJ,
)

plugin = SpecFamily(SPEC)
