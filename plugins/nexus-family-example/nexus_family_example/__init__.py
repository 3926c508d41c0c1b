"""nexus-family-example: the ToyMoE architecture and its NEXUS family plugin.

Importing the package registers ``ToyMoeConfig``/``ToyMoeForCausalLM`` with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained`` opens ``toymoe`` checkpoints. NEXUS imports
it through the ``nexus`` entry point ``toymoe = "nexus_family_example:plugin"``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from nexus.expert_layout import ExpertLayout
from nexus.spec import FamilySpec, SpecFamily
from nexus_family_example.configuration import ToyMoeConfig
from nexus_family_example.modeling import ToyMoeForCausalLM

__version__ = "0.1.0"

AutoConfig.register("toymoe", ToyMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyMoeConfig, ToyMoeForCausalLM, exist_ok=True)


# -- start toymoe_example_config --
def example_config():
    """A tiny ToyMoE: 3 layers (layer 1 dense), 4 experts, top-2, hidden 64, expert width 32."""
    return ToyMoeConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_intermediate_size=32, dense_layers=[1],
    )
# -- end toymoe_example_config --


# -- start toymoe_spec --
SPEC = FamilySpec(
    name="toymoe",
    model_types=("toymoe",),
    description="ToyMoE: the example third-party family (Llama attention, fused softmax-routed experts)",
    num_experts="num_experts",
    top_k="num_experts_per_tok",
    intermediate_size="expert_intermediate_size",
    block="moe",
    router="router",
    logits_index=0,
    is_moe_layer=lambda config, layer: layer not in config.dense_layers,
    example_config=example_config,
    experts=ExpertLayout(
        gate_up="model.layers.{layer}.moe.experts.gate_up_proj",
        down="model.layers.{layer}.moe.experts.down_proj",
    ),
)

plugin = SpecFamily(SPEC)
# -- end toymoe_spec --

__all__ = ["ToyMoeConfig", "ToyMoeForCausalLM", "SPEC", "plugin", "example_config"]
