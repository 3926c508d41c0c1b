"""PhiMoE family plugin (Phi-3.5-MoE): sparsemixer router that always picks 2 experts.

``PhimoeTopKRouter`` ignores ``num_experts_per_tok`` (``sparsemixer`` selects exactly two), so
the spec fixes ``top_k=2``. In train mode the router samples (Gumbel); keep the base in eval.
"""

from nexus.expert_layout import PER_EXPERT_W1_W3_W2
from nexus.spec import ExportSpec, FamilySpec, SpecFamily


def example_config():
    """A tiny PhiMoE: 2 layers, 4 experts, hidden 64; ``num_experts_per_tok=1`` is ignored by the model."""
    from transformers import PhimoeConfig

    return PhimoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="phimoe",
    model_types=("phimoe",),
    description="Microsoft Phi-3.5-MoE: sparsemixer router, always top-2",
    num_experts="num_local_experts",
    top_k=2,
    intermediate_size="intermediate_size",
    router="router",
    export=ExportSpec(no_fold="sparsemixer routing weights do not sum to a constant, and the block has no "
                              "shared-expert slot"),
    example_config=example_config,
    experts=PER_EXPERT_W1_W3_W2,
)

plugin = SpecFamily(SPEC)
