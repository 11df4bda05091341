"""A forward pass for Llama-family decoders written for the static engine (gpt-fast style).

It runs the loaded Hugging Face model's own modules and weight tensors (NF4 Linear4bit included),
so serving and training keep one copy of the base, but replaces the model's control flow: tokens of
all rows are packed into one [T, hidden] matrix, each token carries its own position, KV-cache row
and LoRA slot, and attention reads the preallocated cache (server/engine/static_cache.py). Nothing in
here depends on a Python value that changes from step to step, so a decode step can be captured as a
CUDA graph.

Supported: Llama, Mistral (within its sliding window), Qwen2 (q/k/v biases) and Qwen3 (q/k norms),
SmolLM2. Everything else runs on the generic path (server/engine/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

# Projections whose LoRA shrink is fused because they read the same input (one matmul, not three).
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def supports(model: nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral" and window and window < cfg.max_position_embeddings:
        return False  # the sliding window would change attention beyond it: keep the generic path
    return all(hasattr(model, a) for a in ("model", "lm_head")) and hasattr(model.model, "rotary_emb")


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@dataclass
class LayerParts:
    input_norm: nn.Module
    post_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None


class LlamaParts:
    """The model's modules, looked up once; attention geometry; rotary tables for max_len positions."""

    def __init__(self, model: nn.Module, max_len: int, device: torch.device, dtype: torch.dtype):
        cfg = model.config
        self.model = model
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.hidden = cfg.hidden_size
        self.vocab = cfg.vocab_size
        self.layers: list[LayerParts] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(LayerParts(
                layer.input_layernorm, layer.post_attention_layernorm, attn.q_proj, attn.k_proj, attn.v_proj,
                attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn,
                getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
        self.scaling = model.model.layers[0].self_attn.scaling
        # The model's own rotary module computes the tables (rope scaling variants included), once.
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, 1, self.head_dim, device=device, dtype=dtype)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(probe, positions)
        self.cos = cos[0].to(dtype).contiguous()  # [max_len, head_dim]
        self.sin = sin[0].to(dtype).contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]: the rotate-half RoPE that Llama checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def base(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base Linear of a LoRA-wrapped projection (LoRA is added by the caller, by slot index)."""
    return proj.base(x) if hasattr(proj, "base") else proj(x)


def forward(parts: LlamaParts, ids: torch.Tensor, positions: torch.Tensor, attend, lora) -> torch.Tensor:
    """ids, positions [T] -> final hidden states [T, hidden].

    attend(layer, q [T, H, D], k [T, KV, D], v [T, KV, D]) -> [T, H * D] writes K/V to the cache and
    attends; lora.add(layer, group, names, x, outputs) adds each token's adapter to the projections
    of one group in place. Both are supplied by the step (decode or prefill).
    """
    t = ids.shape[0]
    h = parts.embed(ids)  # [T, hidden]
    cos, sin = parts.cos[positions], parts.sin[positions]  # [T, D]
    hd = parts.head_dim
    for i, layer in enumerate(parts.layers):
        x = layer.input_norm(h)
        q, k, v = base(layer.q, x), base(layer.k, x), base(layer.v, x)
        lora.add(i, "qkv", x, (q, k, v))
        q, k, v = q.view(t, -1, hd), k.view(t, -1, hd), v.view(t, -1, hd)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = attend(i, q, k, v)  # [T, H * D]
        o = base(layer.o, a)
        lora.add(i, "o", a, (o,))
        h = h + o
        x = layer.post_norm(h)
        g, u = base(layer.gate, x), base(layer.up, x)
        lora.add(i, "gate_up", x, (g, u))
        m = layer.act(g) * u
        d = base(layer.down, m)
        lora.add(i, "down", m, (d,))
        h = h + d
    return parts.norm(h)


def logits(parts: LlamaParts, hidden: torch.Tensor) -> torch.Tensor:
    return parts.lm_head(hidden).float()  # [T, V]
