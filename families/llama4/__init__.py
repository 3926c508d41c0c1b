"""Llama 4 text family plugin (Llama-4-Scout/Maverick language model, ``model_type`` ``llama4_text``).

The block (``feed_forward``) returns ``(out[T, H], router_logits)``; the router returns
``(scores, logits)``, so logits are at index 1 and scored with ``sigmoid``. Experts are fused
``gate_up_proj[E, H, 2I]`` used as ``x @ W`` (gate and up concatenated) and ``down_proj[E, I, H]``;
the same names are on disk. MoE layers are ``config.moe_layers`` (derived from
``interleave_moe_layer_step`` when not given); the others are dense MLPs.
"""

from nexus.expert_layout import ExpertLayout
from nexus.spec import ExportSpec, FamilySpec, SpecFamily, listed_layers


def example_config():
    """A tiny Llama 4 text model: 2 layers (layer 0 dense, layer 1 MoE), 4 experts, top-1, hidden 64."""
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, attention_chunk_size=64, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="llama4",
    model_types=("llama4_text",),
    description="Meta Llama 4 (text): sigmoid top-k router, interleaved dense/MoE layers, native shared expert",
    num_experts="num_local_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    block="feed_forward",
    router="router",
    logits_index=1,
    scoring="sigmoid",
    is_moe_layer=listed_layers("moe_layers"),
    native_shared="shared_expert",
    export=ExportSpec(no_fold="the router scales each expert's input (not its output), and the native shared expert's "
                              "width is the routed experts' intermediate_size"),
    example_config=example_config,
    experts=ExpertLayout(
        gate_up="model.layers.{layer}.feed_forward.experts.gate_up_proj",
        down="model.layers.{layer}.feed_forward.experts.down_proj",
        transposed=True,
    ),
)

plugin = SpecFamily(SPEC)
