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


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
"""The tags of the t-tag fixture adapter (conftest.task_adapter_sources)."""
TASK_CLASSES = {"seq_cls": ("AutoModelForSequenceClassification", "SEQ_CLS"),
                "token_cls": ("AutoModelForTokenClassification", "TOKEN_CLS"),
                "qa": ("AutoModelForQuestionAnswering", "QUESTION_ANS")}


def make_peft_task_adapter(model_dir: Path, out_dir: Path, kind: str, seed: int, num_labels: int = 3,
                           rank: int = 4, targets=ALL_PROJECTIONS) -> Path:
    """A random task adapter made by stock PEFT + transformers (LoRA non-zero, head random), in PEFT's format:
    seq_cls / token_cls / qa, the head saved as modules_to_save."""
    import transformers
    from peft import LoraConfig, get_peft_model

    _, task_type = TASK_CLASSES[kind]
    torch.manual_seed(seed)
    model = stock_task_model(model_dir, kind, num_labels)
    head = model.qa_outputs if kind == "qa" else model.score
    with torch.no_grad():
        head.weight.normal_(0, 0.5)
        if head.bias is not None:
            head.bias.normal_(0, 0.5)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  task_type=task_type, init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


def stock_task_model(model_dir: Path, kind: str, num_labels: int = 2):
    """The stock transformers model class of a task kind on a causal-LM checkpoint. Llama's
    question-answering class names its decoder `transformer`, and from_pretrained leaves it randomly
    initialised from a checkpoint whose keys say `model` (transformers 5.x): its backbone is copied
    over from the causal LM, as a user has to."""
    import transformers
    from transformers import AutoModelForCausalLM

    model = getattr(transformers, TASK_CLASSES[kind][0]).from_pretrained(
        model_dir, num_labels=2 if kind == "qa" else num_labels)
    if kind == "qa":
        model.transformer.load_state_dict(AutoModelForCausalLM.from_pretrained(model_dir).model.state_dict())
    return model
