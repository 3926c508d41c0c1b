"""GPT-OSS hook implementations: a declarative spec plus the two things it cannot say."""

from __future__ import annotations

from nexus import hookimpl
from nexus.expert_layout import ExpertLayout
from nexus.spec import ExportSpec, FamilySpec, RoutedFold, SpecFamily

from families.gpt_oss.modeling import ClampedSwiGLU


def example_config():
    """A tiny GPT-OSS (2 layers, 4 experts, top-2, hidden 64; MXFP4-compatible dims)."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=16,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


SPEC = FamilySpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    description="OpenAI gpt-oss-20b/120b: MXFP4 experts, clamped SwiGLU, biased experts and router",
    num_experts="num_local_experts",
    top_k="num_experts_per_tok",
    intermediate_size="intermediate_size",
    router="router",
    export=ExportSpec(RoutedFold(width="intermediate_size")),
    example_config=example_config,
    experts=ExpertLayout(
        gate_up="model.layers.{layer}.mlp.experts.gate_up_proj",
        down="model.layers.{layer}.mlp.experts.down_proj",
        transposed=True,
        interleaved=True,
        gate_up_bias="model.layers.{layer}.mlp.experts.gate_up_proj_bias",
        down_bias="model.layers.{layer}.mlp.experts.down_proj_bias",
        packed_formats=("mxfp4",),
    ),
)


class GptOssFamily(SpecFamily):
    @hookimpl
    def nexus_activation(self, family, config):
        if not self._mine(family):
            return None
        return ClampedSwiGLU(alpha=float(config.swiglu_alpha), limit=float(config.swiglu_limit))

    @hookimpl
    def nexus_write_checkpoint(self, family, model, path):
        if not self._mine(family):
            return None
        from families.gpt_oss.quant import save_mxfp4_checkpoint

        save_mxfp4_checkpoint(model, path)
        return True


plugin = GptOssFamily(SPEC)
