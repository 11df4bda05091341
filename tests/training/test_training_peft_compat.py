"""An adapter trained with stock PEFT + transformers (no loraserve code) serves here with the same
greedy output as stock PEFT gives. (The other direction, an adapter trained through the Train RPC
loaded by stock PEFT, is in test_training_learns.py.)"""

from __future__ import annotations

import torch
from harness import RunningServer
from transformers import AutoModelForCausalLM, AutoTokenizer

ANSWER = "XYZZY"


def chat_ids(tokenizer, prompt: str, completion: str | None = None) -> list[int]:
    turns = [{"role": "user", "content": prompt}]
    if completion is None:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    turns.append({"role": "assistant", "content": completion})
    return tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False)


def train_with_stock_peft(model_dir, out_dir, examples, steps: int = 30):
    """PEFT's own LoRA on transformers' model, a plain AdamW loop, completion-only loss."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]))
    rows = []
    for e in examples:
        full, prompt = chat_ids(tokenizer, e["prompt"], e["completion"]), chat_ids(tokenizer, e["prompt"])
        rows.append((full, [-100] * len(prompt) + full[len(prompt):]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(steps):
        batch = slice((step * 4) % len(rows), (step * 4) % len(rows) + 4)
        loss = model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return model.eval(), tokenizer


def test_a_stock_peft_adapter_serves_with_the_same_output(learnable_model_dir, task_examples, unseen_prompts,
                                                           tmp_path):
    model, tokenizer = train_with_stock_peft(learnable_model_dir, tmp_path / "adapters" / "peft-xyzzy",
                                             task_examples)
    srv = RunningServer(learnable_model_dir, tmp_path / "adapters")
    try:
        for prompt in [*unseen_prompts, task_examples[5]["prompt"]]:
            ids = torch.tensor([chat_ids(tokenizer, prompt)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
            want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            got = srv.client.predict(messages=[{"role": "user", "content": prompt}], adapter_id="peft-xyzzy",
                                     max_new_tokens=16)
            assert got.text == want == ANSWER and got.finish_reason == "stop"
    finally:
        srv.close()

