"""DBRX family plugin (databricks/dbrx): experts stored flat as ``w1``/``v1``/``w2`` of shape ``(E*I, H)``.

Expert ``e`` is rows ``e*I:(e+1)*I`` of each tensor: ``w1`` is its gate and ``v1`` its up
projection in ``nn.Linear`` layout, ``w2`` its down projection transposed. Config fields sit
under ``ffn_config``, the activation is ``ffn_config.ffn_act_fn["name"]``. transformers 5.23 cannot
build DBRX from a fresh config unless ``attn_config`` carries ``rope_theta`` and ``clip_qkv``.
"""

from nexus.expert_layout import ExpertLayout
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily


def example_config():
    """A tiny DBRX: 2 blocks, 4 experts, top-2, d_model 64, expert width 32."""
    from transformers import DbrxConfig

    return DbrxConfig(
        vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2, "ffn_act_fn": {"name": "silu"}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


# -- start dbrx_spec --
SPEC = FamilySpec(
    name="dbrx",
    model_types=("dbrx",),
    description="Databricks DBRX: flat (E*I, H) expert tensors, p-norm-normalised softmax top-k",
    num_experts="ffn_config.moe_num_experts",
    top_k="ffn_config.moe_top_k",
    intermediate_size="ffn_config.ffn_hidden_size",
    hidden_size="d_model",
    layers="transformer.blocks",
    block="ffn",
    router="router",
    logits_index=None,
    activation_field="ffn_config.ffn_act_fn.name",
    # p-norm normalised top-k weights: with p = 1 they sum to 1
    export=ExportSpec(RoutedFold(width="ffn_config.ffn_hidden_size",
                                 normalized_by="ffn_config.moe_normalize_expert_weights", normalized_when=1)),
    example_config=example_config,
    experts=ExpertLayout(
        gate_up="transformer.blocks.{layer}.ffn.experts.mlp.w1",
        up="transformer.blocks.{layer}.ffn.experts.mlp.v1",
        down="transformer.blocks.{layer}.ffn.experts.mlp.w2",
        flat=True,
        down_transposed=True,
    ),
)

plugin = SpecFamily(SPEC)
# -- end dbrx_spec --
