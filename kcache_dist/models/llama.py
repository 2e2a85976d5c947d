"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a flat batch of new tokens.

The model sees token ids, positions and a ForwardContext; where the cache lives and which
attention runs is the cache's business.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from ..forward_context import ForwardContext
from ..layers.activation import silu_and_mul
from ..layers.attention import Attention
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.rmsnorm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.total_num_heads,
                                          config.total_num_kv_heads, config.qkv_bias, dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.total_num_heads * d, config.hidden_size, config.o_proj_bias, dtype)
        self.rotary = rotary
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, d)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous(), ctx))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [i, i], config.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(i, config.hidden_size, config.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype)

    def attention_block(self, positions: torch.Tensor, delta: torch.Tensor, residual: Optional[torch.Tensor],
                        ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream [T, hidden] is `residual` + `delta` (the previous block's output) or,
        in the first layer, `delta` alone (the embeddings; `residual` None). -> (this block's output,
        the residual stream it is to be added to)."""
        if residual is None:
            normed, residual = self.input_layernorm(delta), delta
        else:
            normed, residual = self.input_layernorm(delta, residual)
        return self.self_attn(positions, normed, ctx), residual

    def mlp_block(self, delta: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`attention_block` for the MLP: the residual stream is `residual` + `delta` (the attention
        block's output) -> (this block's output, the residual stream it is to be added to)."""
        normed, residual = self.post_attention_layernorm(delta, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, self.rotary, dtype)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        for hidden in self.blocks(input_ids, positions, ctx):
            pass
        return hidden

    def blocks(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> Iterator[torch.Tensor]:
        """`forward` one block at a time: yields the output of each layer's attention block and of
        its MLP block (each ends in the tensor-parallel all-reduce of its output projection), then
        the final normed hidden states. A block's output is added to the residual stream by the
        norm that follows it (`RMSNorm(delta, residual)`, one kernel on CUDA), as the sum rounded
        to the dtype. The model runner interleaves micro-batches block by block."""
        delta, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            delta, residual = layer.attention_block(positions, delta, residual, ctx)
            yield delta
            delta, residual = layer.mlp_block(delta, residual)
            yield delta
        yield self.norm(delta, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Checkpoint names map onto this module's parameters through `packed_modules_mapping`:
    q/k/v_proj load into qkv_proj and gate/up_proj into gate_up_proj, each with its shard id."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, ctx)

    def blocks(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> Iterator[torch.Tensor]:
        """`forward` block by block (`LlamaModel.blocks`); the last item is the final hidden states."""
        return self.model.blocks(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] in float32."""
        return self.lm_head(hidden).float()
