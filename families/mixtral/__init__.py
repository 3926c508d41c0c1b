"""Mixtral family plugin (Mixtral-8x7B/8x22B): softmax top-k router, experts saved per expert as w1/w3/w2."""

from nexus.expert_layout import PER_EXPERT_W1_W3_W2
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny Mixtral: 2 layers, 4 experts, top-2, hidden 64, expert width 32."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="mixtral",
    model_types=("mixtral",),
    description="Mistral Mixtral 8x7B/8x22B: softmax top-k router, per-expert w1/w3/w2 on disk",
    num_experts="num_local_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    export=ExportSpec(RoutedFold(width="intermediate_size")),
    example_config=example_config,
    experts=PER_EXPERT_W1_W3_W2,
)

plugin = SpecFamily(SPEC)
