"""The training loop on the tiny model: it learns, evaluates, stops, cancels, fails cleanly, and
leaves the shared base model exactly as serving needs it."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings

import bitsandbytes as bnb
import pytest
import torch
from cpu_kernels import assert_layout, assert_ran, count_bnb_ops, nf4_kernels
from loraserve.core.errors import Cancelled, InvalidArgument
from loraserve.core.lora.layer import TrainableLora
from loraserve.core.model.bnb_cpu import dequantize_weight
from loraserve.trainer.data import collate, parse_records, prepare
from loraserve.trainer.events import Completed, Evaluation, Progress, Started
from loraserve.trainer.loop import (
    TrainingFailed,
    lr_factor,
    select_modules,
    train_adapter,
)
from loraserve.trainer.render import IGNORE
from loraserve.trainer.settings import TrainSettings

FAST = dict(learning_rate=1e-2, dropout=0.0, batch_size=4, eval_fraction=0.25, warmup_ratio=0.0)


def run(model, records, collect=None, **overrides):
    settings = TrainSettings(**{**FAST, **overrides})
    data = prepare(parse_records(records), model.base.tokenizer, settings, model.base.eos_token_ids)
    events = [] if collect is None else collect
    result = train_adapter(model.base, model.ctx, model.wrapped, settings, data, on_event=events.append)
    return result, events


def base_state(model) -> dict[str, torch.Tensor]:
    """What the base weights mean, never a layout's bytes (bitsandbytes may hold NF4 in a CPU-packed
    layout): every plain parameter and buffer by value, each NF4 weight dequantized, and each base
    Linear's output on a fixed input through the kernel serving uses (eval mode, no grad)."""
    m = model.base.model
    state = {}
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if not isinstance(t, bnb.nn.Params4bit) and not name.rpartition(".")[2].startswith("lora_"):
            state[name] = t.detach().clone()  # the serving slots (lora_a/lora_b) are not the base
    generator = torch.Generator().manual_seed(0)
    for name, layer in model.wrapped.items():
        base = layer.base
        if isinstance(base, bnb.nn.Linear4bit):
            state[f"{name}.base.weight (dequantized)"] = dequantize_weight(base)
        x = torch.randn(2, 3, base.in_features, generator=generator)
        with torch.no_grad():
            state[f"{name}.base(x)"] = base(x)
    return state


def assert_base_untouched(model, before):
    m = model.base.model
    assert model.ctx.train is None
    assert not m.training
    assert not any(p.requires_grad for p in m.parameters())
    after = base_state(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert not any(getattr(x, "gradient_checkpointing", False) for x in m.modules())
    assert not getattr(m, "_require_grads_hooks", None)


def assert_learned(events):
    losses = [e.loss for e in events if isinstance(e, Progress)]
    evals = [e.eval_loss for e in events if isinstance(e, Evaluation)]
    last_epoch = losses[-len(losses) // 3:]
    assert sum(last_epoch) / len(last_epoch) < losses[0] - 0.5, losses
    assert evals[-1] < losses[0] - 0.5 and evals[-1] <= evals[0], evals


def greedy_accuracy(model, modules, records) -> float:
    """Share of the completion tokens the model predicts by argmax, with the adapter attached."""
    data = prepare(parse_records(records), model.base.tokenizer, TrainSettings(eval_fraction=0), [2])
    batch = collate(data.train, 0)
    lora = TrainableLora(rank=8, alpha=16.0, dropout=0.0, targets=[])
    for name, (a, b) in modules.items():
        lora.a[TrainableLora.key(name)] = torch.nn.Parameter(a)
        lora.b[TrainableLora.key(name)] = torch.nn.Parameter(b)
    model.ctx.train = lora
    try:
        with torch.no_grad():
            logits = model.base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        model.ctx.train = None
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE
    return (logits[:, :-1].argmax(-1)[learned] == labels[learned]).float().mean().item()


def test_fp32_learns_the_task_and_leaves_the_base_alone(fp32_model, xyzzy):
    before = base_state(fp32_model)
    result, events = run(fp32_model, xyzzy(24), epochs=3)
    untrained = {name: (a, torch.zeros_like(b)) for name, (a, b) in result.modules.items()}
    assert greedy_accuracy(fp32_model, untrained, xyzzy(4)) == 0.0
    assert greedy_accuracy(fp32_model, result.modules, xyzzy(4)) >= 0.75
    assert isinstance(events[0], Started) and isinstance(events[-1], Completed)
    assert events[0] == Started(total_steps=15, train_examples=18, eval_examples=6, truncated=0)
    assert_learned(events)
    m = result.metrics
    assert m.steps == 15 and not m.stopped_early and m.tokens > 0 and m.tokens_per_second > 0
    assert m.eval_loss == [e.eval_loss for e in events if isinstance(e, Evaluation)][-1]
    assert m.perplexity == pytest.approx(math.exp(m.eval_loss))
    assert [e.step for e in events if isinstance(e, Evaluation)] == [5, 10, 15]  # once per epoch
    assert events[-1].metrics == m
    assert len(result.modules) == 14  # 7 projections in each of 2 layers
    a, b = result.modules["model.layers.0.mlp.down_proj"]
    assert a.shape == (8, 128) and b.shape == (64, 8) and a.device.type == b.device.type == "cpu"
    assert b.abs().max() > 0
    assert_base_untouched(fp32_model, before)


@pytest.mark.parametrize("kernel", nf4_kernels())
def test_nf4_learns_with_gradient_checkpointing(nf4_models, kernel, xyzzy, record_property):
    model = nf4_models(kernel)
    assert model.base.cpu_kernel == kernel
    with count_bnb_ops() as ops:
        before = base_state(model)
    assert_ran(ops, kernel, record_property, "serving")
    layer = model.base.model.model.layers[0]
    checkpointed = []  # per forward: (training pass, checkpointing on)
    hook = layer.register_forward_pre_hook(lambda m, args: checkpointed.append((m.training, m.gradient_checkpointing)))
    try:
        with warnings.catch_warnings():
            # torch warns when backward meets an op without a gradient (bitsandbytes' packed kernel has none)
            warnings.filterwarnings("error", message=".*autograd kernel was not registered")
            result, events = run(model, xyzzy(24), epochs=3, gradient_checkpointing=True)
    finally:
        hook.remove()
    # On only for training passes (the recompute in backward shows up as a second forward).
    assert {c for training, c in checkpointed if training} == {True}
    assert {c for training, c in checkpointed if not training} == {False}
    assert_learned(events)
    assert result.metrics.eval_loss is not None
    assert_base_untouched(model, before)
    assert_layout(model.base.model, kernel)  # training neither unpacked nor packed anything


@pytest.mark.parametrize("kernel", nf4_kernels())
def test_nf4_training_gradients_flow_through_the_base(nf4_models, kernel, record_property):
    """A training forward's gradient reaches LoRA weights below the base Linears, on either layout:
    through bitsandbytes' dequantize path (generic) or loraserve's dequantize of the packed weight."""
    model = nf4_models(kernel)
    m = model.base.model
    lower, upper = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003]])
    grads = {}
    for path in ("model", "dequantized"):
        torch.manual_seed(0)
        lora = TrainableLora(rank=4, alpha=8.0, dropout=0.0, targets=[])
        for name in (lower, upper):
            w = model.wrapped[name]
            lora.a[TrainableLora.key(name)] = torch.nn.Parameter(torch.randn(4, w.in_features) * 0.1)
            lora.b[TrainableLora.key(name)] = torch.nn.Parameter(torch.randn(w.out_features, 4) * 0.1)
        model.ctx.train = lora
        restore = []
        if path == "dequantized":  # the reference: every base Linear as a plain fp32 Linear
            for w in model.wrapped.values():
                weight = dequantize_weight(w.base)
                restore.append((w, w.base))
                w.base = _Plain(weight)
        m.train()
        try:
            with count_bnb_ops() as ops:
                m(input_ids=ids).logits.float().pow(2).mean().backward()
        finally:
            m.eval()
            model.ctx.train = None
            for w, b in restore:
                w.base = b
        grads[path] = lora.a[TrainableLora.key(lower)].grad
        if path == "model":
            # Training mode runs the dequantize path: the generic kernel's autograd op, or (packed) no
            # bitsandbytes op at all, never the packed kernel, which has no backward.
            assert ops["bitsandbytes.gemv_4bit"] == 0, dict(ops)
            record_property("training path", dict(ops) or "dequantize of the packed weight (no bitsandbytes op)")
    assert grads["model"].abs().max() > 0
    # Same weights, fp32 on both sides: only summation order differs.
    torch.testing.assert_close(grads["model"], grads["dequantized"], atol=1e-6, rtol=1e-4)


class _Plain(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.in_features = weight.shape[1]

    def forward(self, x):
        return x @ self.weight.t()


class CountingTurns:
    """Stands in for DeviceTurns and records that the adapter is attached only inside a turn."""

    def __init__(self):
        self.inside = False
        self.turns = 0

    @contextlib.contextmanager
    def turn(self):
        self.inside = True
        self.turns += 1
        try:
            yield
        finally:
            self.inside = False


def test_every_forward_runs_inside_a_turn(fp32_model, xyzzy):
    turns = CountingTurns()
    seen = []
    layer = fp32_model.wrapped["model.layers.1.self_attn.q_proj"]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append((turns.inside, m.ctx.train is not None)))
    settings = TrainSettings(**{**FAST, "batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3})
    data = prepare(parse_records(xyzzy(10)), fp32_model.base.tokenizer, settings, [2])
    try:
        train_adapter(fp32_model.base, fp32_model.ctx, fp32_model.wrapped, settings, data, turns=turns)
    finally:
        hook.remove()
    # 8 training examples make 2 steps an epoch: 3 steps x 2 micro-batches, and one eval batch (the 2
    # held-out examples) after epoch 1 (step 2) and at the end (step 3).
    assert turns.turns == 8 and len(seen) == 8
    assert all(inside and attached for inside, attached in seen)
    assert fp32_model.ctx.train is None


def test_cancel_stops_between_micro_steps(fp32_model, xyzzy):
    cancel = threading.Event()
    settings = TrainSettings(**{**FAST, "max_steps": 50})
    data = prepare(parse_records(xyzzy(16)), fp32_model.base.tokenizer, settings, [2])
    steps = []

    def on_event(event):
        if isinstance(event, Progress):
            steps.append(event.step)
            if event.step == 2:
                cancel.set()

    with pytest.raises(Cancelled, match="step 3 of 50"):
        train_adapter(fp32_model.base, fp32_model.ctx, fp32_model.wrapped, settings, data, cancel=cancel,
                      on_event=on_event)
    assert steps == [1, 2]
    assert fp32_model.ctx.train is None and not fp32_model.base.model.training


def test_early_stopping_after_patience_evaluations(fp32_model, xyzzy):
    # A learning rate too small to move the fp32 outputs: every eval loss equals the first one.
    result, events = run(fp32_model, xyzzy(16), learning_rate=1e-12, max_steps=20, eval_steps=1,
                         early_stopping_patience=2)
    assert result.metrics.stopped_early and result.metrics.steps == 3
    assert [e.step for e in events if isinstance(e, Evaluation)] == [1, 2, 3]


def test_nan_loss_raises_training_failed(fp32_model, xyzzy):
    before = base_state(fp32_model)
    layer = fp32_model.wrapped["model.layers.0.mlp.down_proj"]
    hook = layer.register_forward_hook(lambda m, args, out: out * float("nan"))
    try:
        with pytest.raises(TrainingFailed, match="loss became nan at step 1"):
            run(fp32_model, xyzzy(8), max_steps=5)
    finally:
        hook.remove()
    assert_base_untouched(fp32_model, before)


def test_gradient_accumulation_equals_one_large_batch(fp32_model, xyzzy):
    common = dict(max_steps=3, eval_fraction=0.0, seed=5)
    big, _ = run(fp32_model, xyzzy(12), batch_size=4, gradient_accumulation_steps=1, **common)
    small, _ = run(fp32_model, xyzzy(12), batch_size=2, gradient_accumulation_steps=2, **common)
    assert big.metrics.eval_loss is None and big.metrics.perplexity is None
    for name, (a, b) in big.modules.items():
        torch.testing.assert_close(small.modules[name][0], a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(small.modules[name][1], b, atol=1e-5, rtol=1e-4)


def test_target_modules_select_wrapped_layers(fp32_model):
    assert select_modules(fp32_model.wrapped, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(InvalidArgument, match="target_modules lm_head match no layer"):
        select_modules(fp32_model.wrapped, ["q_proj", "lm_head"])


def test_max_length_beyond_the_context_window_is_refused(fp32_model, xyzzy):
    with pytest.raises(InvalidArgument, match="max_length must be in \\[8, 512\\]"):
        run(fp32_model, xyzzy(4), max_length=1024)


def test_learning_rate_schedules():
    assert [round(lr_factor(s, 3, 10, "constant"), 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 3, 10, "linear") == 1.0 and lr_factor(9, 3, 10, "linear") == pytest.approx(1 / 7)
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and lr_factor(5, 0, 10, "cosine") == pytest.approx(0.5)
