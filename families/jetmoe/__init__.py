"""JetMoE family plugin (JetMoE-8B).

JetMoE's attention is a mixture too (``self_attention.experts`` with its own router); NEXUS
attaches shared experts to the MLP mixture only, and captures only ``mlp.router``, whose output
tuple carries the fp32 logits at index 4. Experts are ``input_linear.weight[E, 2I, H]`` and
``output_linear.weight[E, H, I]``; the block adds one bias ``mlp.bias[H]`` per token, which
belongs to no expert and is not read. The activation is ``config.activation_function``.
"""

from nexus.expert_layout import ExpertLayout
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny JetMoE: 2 layers, 4 experts (MLP and attention), top-2, hidden 64."""
    from transformers import JetMoeConfig

    return JetMoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_key_value_heads=2, kv_channels=16, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="jetmoe",
    model_types=("jetmoe",),
    description="JetMoE: mixture of attention heads and MLP experts; NEXUS adapts the MLP mixture",
    num_experts="num_local_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    router="router",
    logits_index=4,
    activation_field="activation_function",
    export=ExportSpec(RoutedFold(width="intermediate_size")),
    example_config=example_config,
    experts=ExpertLayout(
        gate_up="model.layers.{layer}.mlp.input_linear.weight",
        down="model.layers.{layer}.mlp.output_linear.weight",
    ),
)

plugin = SpecFamily(SPEC)
