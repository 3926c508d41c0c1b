"""The ToyMoE causal LM: Llama attention and norms from transformers, its own MoE block.

The MoE block (``layers[i].moe``) holds a softmax top-k ``router`` and ``experts`` stored fused,
``gate_up_proj[E, 2I, H]`` (gate rows first) and ``down_proj[E, H, I]``, as most MoE families in
transformers do. ``output_router_logits=True`` returns one ``[T, E]`` logits tensor per MoE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from nexus_family_example.configuration import ToyMoeConfig


class ToyMoeRouter(nn.Module):
    """Softmax over E experts, top-k, renormalised.

    ``forward(x[T, H])`` returns ``(logits[T, E], weights[T, k], indices[T, k])``.
    """

    def __init__(self, config: ToyMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden_states.dtype), indices


class ToyMoeExperts(nn.Module):
    """E SwiGLU experts in two fused tensors: ``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``hidden_states[T, H]``, ``top_k_index[T, k]``, ``top_k_weights[T, k]`` -> ``Tensor[T, H]``."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class ToyMoeBlock(nn.Module):
    """The MoE block: ``Tensor[B, S, H]`` -> ``Tensor[B, S, H]``."""

    def __init__(self, config: ToyMoeConfig):
        super().__init__()
        self.router = ToyMoeRouter(config)
        self.experts = ToyMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.router(x)
        return self.experts(x, indices, weights).reshape(shape)


class ToyMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ToyMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        if layer_idx in config.dense_layers:
            self.mlp = LlamaMLP(config)
        else:
            self.moe = ToyMoeBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return hidden_states + ffn(self.post_attention_layernorm(hidden_states))


class ToyMoePreTrainedModel(PreTrainedModel):
    config_class = ToyMoeConfig
    config: ToyMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ToyMoeDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # What output_router_logits / output_hidden_states / output_attentions record, by module class.
    _can_record_outputs = {
        "router_logits": OutputRecorder(ToyMoeRouter, index=0),
        "hidden_states": ToyMoeDecoderLayer,
        "attentions": LlamaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ToyMoeExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, ToyMoeRouter):
            module.weight.normal_(0.0, std)


class ToyMoeModel(ToyMoePreTrainedModel):
    def __init__(self, config: ToyMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ToyMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> MoeModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class ToyMoeForCausalLM(ToyMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ToyMoeConfig):
        super().__init__(config)
        self.model = ToyMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None,
                logits_to_keep: int = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        """Standard causal-LM forward; ``router_logits`` holds one ``[B*S, E]`` tensor per MoE layer
        when ``output_router_logits`` is set. The loss is plain cross-entropy (no auxiliary loss)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs) if labels is not None else None
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
