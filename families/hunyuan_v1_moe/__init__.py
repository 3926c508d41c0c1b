"""HunYuan-MoE-V1 family plugin (Hunyuan-A13B): fp32 softmax router ``gate.wg``, native ungated ``shared_mlp``."""

from nexus.expert_layout import PER_EXPERT_PROJ
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny HunYuan-MoE: 2 layers, 4 experts, top-2, hidden 64."""
    from transformers import HunYuanMoEV1Config

    return HunYuanMoEV1Config(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_experts=4, moe_topk=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


SPEC = FamilySpec(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    description="Tencent Hunyuan-A13B: fp32 softmax router, native shared_mlp",
    num_experts="num_experts",
    top_k="moe_topk",
    intermediate_size="intermediate_size",
    native_shared="shared_mlp",
    export=ExportSpec(RoutedFold(width="intermediate_size", tied=("shared_mlp",))),
    example_config=example_config,
    experts=PER_EXPERT_PROJ,
)

plugin = SpecFamily(SPEC)
