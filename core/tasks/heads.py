"""Task heads: one small Linear per adapter over the shared backbone's final hidden states.

An adapter of a task kind beside generation is PEFT's format for the matching Transformers model
class (a LoRA on the backbone plus the head in modules_to_save):

| kind | PEFT task_type | Transformers class | head | reads |
|---|---|---|---|---|
| seq_cls | SEQ_CLS | *ForSequenceClassification | score [labels, hidden], no bias | the last token |
| token_cls | TOKEN_CLS | *ForTokenClassification | score [labels, hidden] + bias | every token |
| qa | QUESTION_ANS | *ForQuestionAnswering | qa_outputs [2, hidden] + bias | every token (start, end) |

PEFT saves the head as base_model.model.<head>.weight/bias. Its question-answering class names the
decoder `transformer` where the others say `model`, so LoRA keys of a QA adapter are mapped back.
Label names are not part of PEFT's files: they live in loraserve_metadata.json ("task"), and an
adapter without them gets Transformers' default names LABEL_0, LABEL_1, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from loraserve.core.errors import FailedPrecondition, InvalidArgument
from loraserve.core.tasks.inputs import check_options
from loraserve.core.tasks.words import check_bio

GENERATION, SEQ_CLS, TOKEN_CLS, QA = "generation", "seq_cls", "token_cls", "qa"
KINDS = (GENERATION, SEQ_CLS, TOKEN_CLS, QA)
HEAD_KINDS = (SEQ_CLS, TOKEN_CLS, QA)
PEFT_TASK_TYPE = {GENERATION: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS", TOKEN_CLS: "TOKEN_CLS", QA: "QUESTION_ANS"}
KIND_OF_TASK_TYPE = {v: k for k, v in PEFT_TASK_TYPE.items()}
HEAD_MODULE = {SEQ_CLS: "score", TOKEN_CLS: "score", QA: "qa_outputs"}
HEAD_BIAS = {SEQ_CLS: False, TOKEN_CLS: True, QA: True}
# PEFT adds its own names to modules_to_save ("classifier" with "score"); any of them is a head.
HEAD_MODULE_NAMES = {"score", "classifier", "qa_outputs"}
BACKBONE_PREFIX = {QA: "transformer."}
MAX_LABELS = 4096
MAX_LABEL_CHARS = 128
QA_LABELS = ("start", "end")


def kind_of(task_type: str) -> str:
    """The kind an adapter_config.json task_type names; unknown types serve as generation, as before."""
    return KIND_OF_TASK_TYPE.get(task_type, GENERATION) if isinstance(task_type, str) else GENERATION


def default_labels(count: int) -> tuple[str, ...]:
    return tuple(f"LABEL_{i}" for i in range(count))


@dataclass(frozen=True)
class HeadSpec:
    """What a head adapter serves: its kind, label names (by output index) and how inputs are built."""

    kind: str
    labels: tuple[str, ...]
    multi_label: bool = False
    """seq_cls: one sigmoid per label (problem_type multi_label_classification) instead of a softmax."""
    threshold: float = 0.5
    """multi_label: a label is predicted when its probability reaches this."""
    input: dict = field(default_factory=dict)
    """How the trainer built inputs (see core.tasks.inputs); requests are built the same way."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels), "multi_label": self.multi_label,
                "threshold": self.threshold, "input": dict(self.input)}


def parse_head_spec(value, kind: str, outputs: int) -> HeadSpec:
    """The metadata's "task" object checked against the head in the weights (`outputs` rows). None
    (no metadata) gives Transformers' default label names. FailedPrecondition for anything unusable,
    tagging labels that are not BIO tags included (entities could not be read from them)."""
    spec = _head_spec(value, kind, outputs)
    if kind == TOKEN_CLS:
        try:
            check_bio(list(spec.labels))
        except InvalidArgument as e:
            raise FailedPrecondition(
                f"a token_cls adapter's labels must be BIO tags (O, B-<type>, I-<type>) to be read as entities: {e}; "
                'adapters made elsewhere name theirs in loraserve_metadata.json: {"task": {"labels": [...]}}') from None
    return spec


def _head_spec(value, kind: str, outputs: int) -> HeadSpec:
    if value is None:
        return HeadSpec(kind, QA_LABELS if kind == QA else default_labels(outputs))
    if not isinstance(value, dict):
        raise FailedPrecondition("loraserve_metadata.json: task must be an object")
    if value.get("kind", kind) != kind:
        raise FailedPrecondition(f"loraserve_metadata.json: task kind {str(value.get('kind'))[:40]!r} does not "
                                 f"match the adapter's task_type ({kind})")
    labels = value.get("labels")
    if kind == QA:
        labels = QA_LABELS
    elif labels is None:
        labels = default_labels(outputs)
    elif not (isinstance(labels, list) and 0 < len(labels) <= MAX_LABELS
              and all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels)
              and len(set(labels)) == len(labels)):
        raise FailedPrecondition(f"loraserve_metadata.json: task labels must be 1 to {MAX_LABELS} distinct "
                                 f"names of 1 to {MAX_LABEL_CHARS} characters")
    if len(labels) != outputs:
        raise FailedPrecondition(f"loraserve_metadata.json names {len(labels)} labels, but the head has {outputs} "
                                 "outputs")
    multi = value.get("multi_label", False)
    threshold = value.get("threshold", 0.5)
    inputs = value.get("input", {})
    if not isinstance(multi, bool) or (multi and kind != SEQ_CLS):
        raise FailedPrecondition("loraserve_metadata.json: task multi_label must be a boolean, true only for seq_cls")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise FailedPrecondition("loraserve_metadata.json: task threshold must be a number in (0, 1)")
    if not isinstance(inputs, dict):
        raise FailedPrecondition("loraserve_metadata.json: task input must be an object")
    return HeadSpec(kind, tuple(labels), multi, float(threshold), check_options(inputs))


@dataclass
class TaskHead:
    """A head ready to serve: float32 weights on the serving device."""

    spec: HeadSpec
    weight: torch.Tensor  # [L, hidden]
    bias: torch.Tensor | None  # [L]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] (any float dtype) -> [T, L] float32."""
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)

    def to(self, device: torch.device) -> TaskHead:
        bias = self.bias.to(device) if self.bias is not None else None
        return TaskHead(self.spec, self.weight.to(device), bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 4 + (self.bias.numel() * 4 if self.bias is not None else 0)


def head_from_tensors(kind: str, tensors: dict[str, torch.Tensor], hidden: int) -> tuple[torch.Tensor,
                                                                                         torch.Tensor | None]:
    """The head's (weight [L, hidden], bias [L] or None) from its PEFT tensors {"weight": ..., "bias": ...},
    checked as it will serve (float32, finite, shapes of this base)."""
    name = HEAD_MODULE[kind]
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None:
        raise FailedPrecondition(f"the {kind} adapter has no head weight {name}.weight (modules_to_save)")
    if weight.ndim != 2 or weight.shape[1] != hidden or not 0 < weight.shape[0] <= MAX_LABELS:
        raise FailedPrecondition(f"head {name}.weight is {tuple(weight.shape)}; this base needs [labels, {hidden}] "
                                 f"with 1 to {MAX_LABELS} labels")
    if kind == QA and weight.shape[0] != 2:
        raise FailedPrecondition(f"head qa_outputs.weight has {weight.shape[0]} outputs; question answering needs 2")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != weight.shape[0]):
        raise FailedPrecondition(f"head {name}.bias is {tuple(bias.shape)}, expected [{weight.shape[0]}]")
    if not weight.is_floating_point() or (bias is not None and not bias.is_floating_point()):
        raise FailedPrecondition(f"head {name} must hold floating-point weights")
    weight = weight.float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise FailedPrecondition(f"head {name} holds NaN or infinite weights")
    return weight, bias


def new_head(kind: str, outputs: int, hidden: int, generator: torch.Generator,
             initializer_range: float = 0.02) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers' initialisation of the head: normal(0, initializer_range), bias zeros."""
    weight = torch.empty(outputs, hidden).normal_(0.0, initializer_range, generator=generator)
    bias = torch.zeros(outputs) if HEAD_BIAS[kind] else None
    return weight, bias

