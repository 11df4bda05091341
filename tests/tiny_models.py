"""Tiny random models and PEFT adapters for tests: a module of its own (not conftest.py) so test files
can import it by name; several folders have a conftest.py, and `from conftest import` would get
whichever was loaded last."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model_dir(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random LlamaForCausalLM small enough for CPU tests, with SmolLM2's real tokenizer."""
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    embedded = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8, alpha: int = 16,
                      targets=ALL_PROJECTIONS) -> Path:
    """A random (non-zero B) LoRA adapter made by stock PEFT, saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir
