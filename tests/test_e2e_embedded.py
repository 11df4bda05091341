"""End to end on the real embedded SmolLM2-135M-Instruct, NF4 (as `loraserve serve` runs by default)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_peft_adapter
from harness import RunningServer
from loraserve.core.model.bnb_cpu import select_cpu_kernel
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

QUESTION = [{"role": "user", "content": "What is 2+2? Answer with the number."}]


@pytest.fixture(scope="module")
def srv(embedded_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    make_peft_adapter(embedded_model_dir, root / "random-r8", seed=3, rank=8, alpha=8)
    s = RunningServer(embedded_model_dir, root, quantization="nf4", max_lora_rank=16)
    yield s
    s.close()


def test_base_model_answers(srv):
    got = srv.client.predict(messages=QUESTION, max_new_tokens=24)
    assert "4" in got.text and got.finish_reason == "stop"
    streamed = "".join(c.text for c in srv.client.stream(messages=QUESTION, max_new_tokens=24))
    assert streamed == got.text


def test_adapter_output_equals_peft_on_the_same_nf4_base(srv, embedded_model_dir):
    got = srv.client.predict(messages=QUESTION, adapter_id="random-r8", max_new_tokens=12)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        embedded_model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True))
    if srv.server.base.cpu_kernel:
        select_cpu_kernel(model, srv.server.base.cpu_kernel)  # the served base's bitsandbytes kernel, before PEFT
    model = PeftModel.from_pretrained(model, srv.registry.root / "random-r8")
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    want = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got.text == want
    assert got.text != srv.client.predict(messages=QUESTION, max_new_tokens=12).text
