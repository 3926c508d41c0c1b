"""``ToyMoeConfig``: the configuration of the ToyMoE architecture (``model_type`` ``toymoe``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig


@strict
class ToyMoeConfig(PretrainedConfig):
    """A small Llama-style decoder whose MLPs are mixtures of fused SwiGLU experts.

    Fields beyond the usual decoder ones:

    - ``num_experts`` (E) and ``num_experts_per_tok`` (k): softmax router, top-k, renormalised.
    - ``expert_intermediate_size``: width of one routed expert.
    - ``dense_layers``: layer indices that keep a plain SwiGLU MLP of ``intermediate_size``.
    """

    model_type = "toymoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    num_experts: int = 4
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 32
    dense_layers: list[int] | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dense_layers is None:
            self.dense_layers = []
        super().__post_init__(**kwargs)
