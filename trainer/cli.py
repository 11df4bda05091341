"""`loraserve train`: train one adapter from a JSONL file on the command line, without a server.

Exit codes: 0 trained and written, 1 training diverged, 2 bad input (flags, data, model, output
directory), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch
from loraserve.core.errors import LoraserveError
from loraserve.core.lora.ids import check_id
from loraserve.core.lora.layer import wrap_model
from loraserve.core.model.config import CPU_KERNELS, QUANTIZATIONS, ModelConfig
from loraserve.core.model.load import load_base
from loraserve.core.tasks.heads import KINDS
from loraserve.trainer.data import prepare, read_jsonl
from loraserve.trainer.loop import TrainingFailed, train_adapter
from loraserve.trainer.output import write_trained_adapter
from loraserve.trainer.progress import ProgressBar
from loraserve.trainer.settings import SCHEDULERS, TEMPLATES, TrainSettings, setting_type

# One line of help per setting; the full meaning is in TrainSettings' field docstrings.
SETTING_HELP = {
    "rank": "LoRA rank r",
    "alpha": "LoRA alpha (scaling alpha/r)",
    "dropout": "dropout on the LoRA input, in [0, 1)",
    "target_modules": "comma-separated module names that get LoRA",
    "use_rslora": "rank-stabilised scaling alpha/sqrt(r)",
    "learning_rate": "peak AdamW learning rate, in (0, 1]; default 2e-4, for qa 1e-3",
    "epochs": "passes over the training data (when --max-steps is 0)",
    "max_steps": "optimizer steps; 0 runs --epochs passes",
    "batch_size": "examples per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "warmup_ratio": "fraction of steps warming the learning rate up, in [0, 1)",
    "lr_scheduler": "learning-rate decay after warmup",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm; 0 disables",
    "seed": "seed for initialisation, split and shuffling",
    "eval_fraction": "share of examples held out for evaluation, in [0, 0.5]",
    "eval_steps": "evaluate every N steps; 0 once per epoch",
    "early_stopping_patience": "stop after N evaluations without improvement; 0 is off",
    "max_length": "longest example in tokens; longer ones are cut at the end",
    "template": "prompt/completion rendering: chat template, plain concatenation, or auto",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "bf16": "bfloat16 autocast (CUDA only)",
    "task": "what the adapter does: generation, seq_cls (classification), token_cls (entity tagging), qa",
    "labels": "comma-separated label names or BIO tags; empty takes the data's",
    "threshold": "multi-label: probability at which a label is predicted",
    "repeat_input": "token_cls: read the words twice, tag the second copy",
    "doc_stride": "qa: tokens shared by consecutive windows of a long context",
    "max_answer_tokens": "qa: longest answer in tokens",
    "head_learning_rate": "peak learning rate of the task head; 0 uses --learning-rate",
    "metric_for_best_model": "evaluation metric early stopping follows (accuracy, entity_f1, f1, ...); "
                             "empty: eval loss",
}
CHOICES = {"lr_scheduler": SCHEDULERS, "template": TEMPLATES, "task": KINDS}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data, model and output")
    io.add_argument("--data", required=True, metavar="FILE.jsonl",
                    help='training examples, one per line: {"prompt", "completion"} or {"messages": [...]}; '
                         '{"text", "label"} / {"text", "labels"} (seq_cls); {"tokens", "tags"} / {"text", "entities"} '
                         '(token_cls); SQuAD\'s {"context", "question", "answers"} (qa)')
    io.add_argument("--output", metavar="DIR", help="adapter directory to write (or --adapter-root and --adapter-id)")
    io.add_argument("--adapter-root", metavar="DIR", help="write to DIR/<adapter-id>, where a server finds it")
    io.add_argument("--adapter-id", metavar="ID", help="the adapter's name under --adapter-root")
    io.add_argument("--overwrite", action="store_true", help="replace an existing adapter directory")
    io.add_argument("--model", metavar="DIR", help="local Hugging Face model directory (default: embedded SmolLM2)")
    io.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4", help="base weights (default: nf4)")
    io.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    io.add_argument("--cpu-kernel", choices=CPU_KERNELS, default="auto",
                    help="NF4 on the CPU: bitsandbytes' packed AVX512-BF16 kernel or the generic one [auto]")
    add_setting_arguments(parser.add_argument_group("training settings (defaults in brackets)"), show_defaults=True)


def add_setting_arguments(group, show_defaults: bool) -> None:
    """One flag per TrainSettings field. Every argparse default stays None, so TrainSettings alone decides
    defaults and validation; show_defaults puts each in its help (a None default is described there)."""
    for f in fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kind, default = setting_type(f), f.default
        text = SETTING_HELP[f.name]
        if show_defaults and default is not None:
            text += f" [{','.join(default) if kind is tuple else default}]"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is tuple:
            group.add_argument(flag, metavar="NAMES", help=text)
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], help=text)
        else:
            group.add_argument(flag, type=kind, metavar="N", help=text)


def run_train(args: argparse.Namespace) -> int:
    try:
        settings = TrainSettings.from_dict({f.name: getattr(args, f.name) for f in fields(TrainSettings)
                                            if getattr(args, f.name, None) is not None})
        target, adapter_id = _target(args)
        if target.exists() and not args.overwrite:
            return _fail(f"{target} already exists: pass --overwrite to replace it", 2)
        examples = read_jsonl(args.data, kind=settings.task)
        base = _load_base(args)
        ctx, wrapped = _wrap(base)
        dataset = prepare(examples, base.tokenizer, settings, base.eos_token_ids)
        result = train_adapter(base, ctx, wrapped, settings, dataset, on_event=ProgressBar(sys.stderr))
        path = write_trained_adapter(target, result, settings, base, adapter_id=adapter_id, overwrite=args.overwrite)
    except TrainingFailed as e:
        return _fail(str(e), 1)
    except LoraserveError as e:
        return _fail(str(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted: no adapter was written", 130)
    m = result.metrics
    lines = [f"train_loss: {m.train_loss:.4f}"]
    if m.eval_loss is not None:
        lines += [f"eval_loss: {m.eval_loss:.4f}", f"perplexity: {m.perplexity:.3f}"]
    lines += [f"steps: {m.steps}{' (stopped early)' if m.stopped_early else ''}", f"tokens: {m.tokens}",
              f"seconds: {m.seconds:.1f}", f"tokens_per_second: {m.tokens_per_second:.1f}",
              f"truncated_examples: {result.stats.truncated}", f"adapter: {path}"]
    print("\n".join(lines))
    return 0


class _BadInput(LoraserveError):
    pass


def _target(args) -> tuple[Path, str | None]:
    if args.output and (args.adapter_root or args.adapter_id):
        raise _BadInput("give either --output or --adapter-root with --adapter-id, not both")
    if args.output:
        return Path(args.output), None
    if not (args.adapter_root and args.adapter_id):
        raise _BadInput("say where to write the adapter: --output DIR, or --adapter-root DIR and --adapter-id ID")
    return Path(args.adapter_root) / check_id(args.adapter_id), args.adapter_id


def _load_base(args):
    try:
        return load_base(ModelConfig(path=args.model, quantization=args.quantization, device=args.device,
                                     cpu_kernel=args.cpu_kernel))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise _BadInput(f"cannot load the base model: {e}") from None


def _wrap(base):
    # Training attaches its own parameters; no serving slots are needed, so keep the buffers minimal.
    return wrap_model(base.model, slots=0, max_rank=1, dtype=torch.float32, device=base.device)


def _fail(message: str, code: int) -> int:
    print(f"loraserve train: error: {message}", file=sys.stderr)
    return code
