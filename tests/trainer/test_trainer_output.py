"""Writing adapters: stock PEFT loads them and computes what the serving layer computes; the write
is atomic and never clobbers an existing adapter unasked."""

from __future__ import annotations

import json
import os

import pytest
import torch
from loraserve.core.errors import AlreadyExists
from loraserve.core.lora.layer import LoraBatch, TrainableLora
from loraserve.core.lora.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_weights,
    read_spec,
)
from loraserve.core.prompt import CHAT, parse_rendering
from loraserve.trainer import output
from loraserve.trainer.data import parse_records, prepare
from loraserve.trainer.loop import train_adapter
from loraserve.trainer.output import METADATA_FILE, write_trained_adapter
from loraserve.trainer.settings import TrainSettings
from peft import PeftModel
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module", params=[False, True], ids=["alpha/r", "rslora"])
def trained(request, fp32_model):
    settings = TrainSettings(rank=4, alpha=8, dropout=0.1, learning_rate=2e-2, max_steps=6, batch_size=4,
                             eval_fraction=0.2, use_rslora=request.param)
    records = [{"prompt": f"Question {i}: the word?", "completion": "XYZZY"} for i in range(20)]
    data = prepare(parse_records(records), fp32_model.base.tokenizer, settings, fp32_model.base.eos_token_ids)
    return train_adapter(fp32_model.base, fp32_model.ctx, fp32_model.wrapped, settings, data), settings


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_stock_peft_gives_the_serving_layers_logits(tmp_path, trained, fp32_model, tiny_model_dir):
    result, settings = trained
    target = write_trained_adapter(tmp_path / "xyzzy", result, settings, fp32_model.base)
    tokenizer = fp32_model.base.tokenizer
    input_ids = torch.tensor([tokenizer("Question 3: the word? And some more text")["input_ids"]])

    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = logits_of(stock, input_ids)
    peft_logits = logits_of(PeftModel.from_pretrained(stock, target).eval(), input_ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter does something

    model, ctx, wrapped = fp32_model.base.model, fp32_model.ctx, fp32_model.wrapped
    # Training path: the trained parameters attached as ctx.train.
    lora = TrainableLora(rank=4, alpha=8.0, dropout=0.0, targets=list(settings.target_modules),
                         use_rslora=settings.use_rslora)
    for name, (a, b) in result.modules.items():
        lora.a[TrainableLora.key(name)] = torch.nn.Parameter(a)
        lora.b[TrainableLora.key(name)] = torch.nn.Parameter(b)
    ctx.train = lora
    try:
        train_logits = logits_of(model, input_ids)
    finally:
        ctx.train = None
    torch.testing.assert_close(train_logits, peft_logits, atol=1e-4, rtol=0)

    # Serving path: the written files loaded into a slot and selected by a LoraBatch.
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in wrapped.items()}
    weights = load_weights(target, shapes, max_rank=16, dtype=torch.float32)
    assert set(weights.modules) == set(result.modules)
    for name, layer in wrapped.items():
        layer.write_slot(1, *weights.modules.get(name, (None, None)))
    ctx.batch = LoraBatch([1], [weights.max_rank], torch.device("cpu"))
    try:
        slot_logits = logits_of(model, input_ids)
    finally:
        ctx.batch = None
        for layer in wrapped.values():
            layer.write_slot(1, None, None)
    torch.testing.assert_close(slot_logits, peft_logits, atol=1e-4, rtol=0)


def test_files_and_metadata(tmp_path, trained, fp32_model):
    result, settings = trained
    target = write_trained_adapter(tmp_path / "root" / "my-adapter", result, settings, fp32_model.base,
                                   task_id="job-1")
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE])
    spec = read_spec(target)
    assert (spec.rank, spec.alpha, spec.use_rslora) == (4, 8.0, settings.use_rslora)
    assert spec.targets_list == list(settings.target_modules)
    meta = json.loads((target / METADATA_FILE).read_text())
    assert meta["adapter_id"] == "my-adapter" and meta["task_id"] == "job-1"
    assert meta["base_model"] == {"name": fp32_model.base.name, "fingerprint": fp32_model.base.fingerprint,
                                  "quantization": "fp32"}
    assert meta["settings"] == settings.to_dict()
    assert meta["data"]["sha256"] == result.data_hash and meta["data"]["examples"] == 20
    assert meta["metrics"]["steps"] == 6 and meta["metrics"]["eval_loss"] == result.metrics.eval_loss
    assert meta["timings"]["seconds"] == result.metrics.seconds and meta["created_at"].endswith("+00:00")
    assert meta["loraserve_version"] == "0.1.0"
    # settings.template "auto" on a tokenizer with a chat template: prompts were rendered as chat.
    assert settings.template == "auto" and meta["rendering"]["template"] == "chat"
    assert parse_rendering(meta["rendering"]) == CHAT
    assert [p.name for p in target.parent.iterdir()] == ["my-adapter"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in target.iterdir())


def test_existing_target_is_refused_then_replaced_on_request(tmp_path, trained, fp32_model):
    result, settings = trained
    target = write_trained_adapter(tmp_path / "a", result, settings, fp32_model.base, task_id="first")
    with pytest.raises(AlreadyExists, match="already exists"):
        write_trained_adapter(target, result, settings, fp32_model.base, task_id="second")
    assert json.loads((target / METADATA_FILE).read_text())["task_id"] == "first"
    write_trained_adapter(target, result, settings, fp32_model.base, task_id="second", overwrite=True)
    assert json.loads((target / METADATA_FILE).read_text())["task_id"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_failed_write_leaves_nothing(tmp_path, trained, fp32_model, monkeypatch):
    result, settings = trained

    def broken(directory, spec, modules, head=None):
        (directory / WEIGHTS_FILE).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(output, "write_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        write_trained_adapter(tmp_path / "a", result, settings, fp32_model.base)
    assert list(tmp_path.iterdir()) == []
