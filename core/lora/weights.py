"""PEFT's on-disk LoRA format: read and validate (adapter_config.json + adapter_model.safetensors), write.

Everything is checked here, at load time, so the forward pass never sees a bad adapter. Adapter files
are untrusted input (uploads, shared volumes): every config field is type-checked and bounded, the
JSON is bounded in size and depth, and the regular expressions PEFT allows (target_modules as a
string, rank_pattern / alpha_pattern keys) run on RE2, whose matching time is linear in the input,
never on Python's backtracking `re`: a pattern cannot freeze the server.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import re2
import torch
from loraserve.core.errors import FailedPrecondition
from loraserve.core.tasks.heads import (
    BACKBONE_PREFIX,
    GENERATION,
    HEAD_BIAS,
    HEAD_MODULE,
    HEAD_MODULE_NAMES,
    TaskHead,
    head_from_tensors,
    kind_of,
    parse_head_spec,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "loraserve_metadata.json"  # loraserve's own record beside PEFT's files (trainer.output)
PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
MAX_CONFIG_BYTES = 1 << 20
MAX_METADATA_BYTES = 1 << 20  # a trainer's file is a few KiB (the evaluation report included)
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 4096
# What PEFT saves LoRA weights in. Integer, bool or complex tensors converted silently into nonsense (the
# imaginary part dropped); float8 failed the NaN check itself (no isfinite kernel) and so the upload.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=1024)
def _re2(pattern: str):
    return re2.compile(pattern)


def compile_pattern(pattern, what: str):
    """An adapter config's regular expression, compiled by RE2 (linear-time matching)."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise FailedPrecondition(f"{what} must be a regular expression of 1 to {MAX_PATTERN_CHARS} characters")
    try:
        return _re2(pattern)
    except re2.error as e:
        raise FailedPrecondition(f"{what} {pattern[:80]!r} is not a regular expression RE2 accepts: {e}") from None


@dataclass
class AdapterSpec:
    """What adapter_config.json says, normalised."""

    rank: int
    alpha: float
    target_modules: list[str] | str
    task_type: str = "CAUSAL_LM"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    dropout: float = 0.0

    def __post_init__(self):
        # PEFT's rule: a pattern key applies to a module whose name ends with it (after a dot).
        self._rank_res = [(compile_pattern(rf"(^|\.)(?:{k})$", "rank_pattern key"), v)
                          for k, v in self.rank_pattern.items()]
        self._alpha_res = [(compile_pattern(rf"(^|\.)(?:{k})$", "alpha_pattern key"), v)
                           for k, v in self.alpha_pattern.items()]

    def rank_alpha(self, module: str) -> tuple[int, float]:
        rank, alpha = self.rank, self.alpha
        for pattern, r in self._rank_res:
            if pattern.search(module):
                rank = int(r)
        for pattern, a in self._alpha_res:
            if pattern.search(module):
                alpha = float(a)
        return rank, alpha

    def scaling(self, module: str) -> float:
        rank, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def kind(self) -> str:
        """generation, or the task head kind its task_type names (core.tasks.heads)."""
        return kind_of(self.task_type)

    @property
    def targets_list(self) -> list[str]:
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)


@dataclass
class AdapterWeights:
    """One adapter ready for a slot: per module, A [r, in] and B [out, r] with the scaling folded in."""

    spec: AdapterSpec
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: TaskHead | None = None
    """The task head of a seq_cls / token_cls / qa adapter (float32, on the CPU); None for generation."""

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def nbytes(self) -> int:
        lora = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())
        return lora + (self.head.nbytes if self.head is not None else 0)


def read_spec(directory: Path) -> AdapterSpec:
    path = directory / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise FailedPrecondition(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"{CONFIG_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    except RecursionError:
        raise FailedPrecondition(f"{CONFIG_FILE} is nested too deeply") from None
    if not isinstance(raw, dict):
        raise FailedPrecondition(f"{CONFIG_FILE} must hold a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"peft_type {raw.get('peft_type')!r} is not supported: only LORA adapters serve")
    if raw.get("use_dora"):
        raise FailedPrecondition("DoRA adapters (use_dora) are not supported")
    if raw.get("bias", "none") != "none":
        raise FailedPrecondition(f"bias={raw.get('bias')!r} is not supported: train with bias='none'")
    task_type = raw.get("task_type") or "CAUSAL_LM"
    saved = raw.get("modules_to_save")
    if saved:
        # A task head is the one module besides LoRA that serves (PEFT lists it with its own aliases).
        if kind_of(task_type) == GENERATION or not (isinstance(saved, list) and len(saved) <= 8 and all(
                isinstance(m, str) and m in HEAD_MODULE_NAMES for m in saved)):
            raise FailedPrecondition(f"modules_to_save {str(saved)[:80]} is not supported: only LoRA weights and "
                                     "the task head of a SEQ_CLS, TOKEN_CLS or QUESTION_ANS adapter serve")
    if raw.get("layers_to_transform") is not None:
        raise FailedPrecondition("layers_to_transform is not supported")
    if "r" not in raw or "target_modules" not in raw:
        raise FailedPrecondition(f"{CONFIG_FILE}: the fields r and target_modules are required")
    rank = _integer(raw["r"], "r")
    alpha = _number(raw.get("lora_alpha", rank), "lora_alpha")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        compile_pattern(targets, "target_modules")
    elif not (isinstance(targets, list) and targets and len(targets) <= MAX_PATTERNS
              and all(isinstance(t, str) and 0 < len(t) <= MAX_PATTERN_CHARS for t in targets)):
        raise FailedPrecondition(f"{CONFIG_FILE}: target_modules must be a non-empty list of module names or a "
                                 "regular expression string")
    rank_pattern = {k: _integer(v, f"rank_pattern[{k[:40]!r}]") for k, v in _mapping(raw, "rank_pattern").items()}
    alpha_pattern = {k: _number(v, f"alpha_pattern[{k[:40]!r}]") for k, v in _mapping(raw, "alpha_pattern").items()}
    dropout = _number(raw.get("lora_dropout") or 0.0, "lora_dropout")
    if not 0 <= dropout < 1:
        raise FailedPrecondition(f"{CONFIG_FILE}: lora_dropout must lie in [0, 1), got {dropout}")
    use_rslora = raw.get("use_rslora", False)
    base_model = raw.get("base_model_name_or_path")
    if not isinstance(use_rslora, bool) or not isinstance(task_type, str) or not isinstance(base_model, (str, type(None))):
        raise FailedPrecondition(f"{CONFIG_FILE}: use_rslora must be a boolean, task_type and "
                                 "base_model_name_or_path strings")
    return AdapterSpec(rank=rank, alpha=alpha, target_modules=targets, task_type=task_type[:64],
                       use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                       base_model=base_model, dropout=dropout)


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not 1 <= value <= 1 << 16:
        raise FailedPrecondition(f"{CONFIG_FILE}: {what} must be a whole number from 1 to 65536, got {value!r:.80}")
    return int(value)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FailedPrecondition(f"{CONFIG_FILE}: {what} must be a finite number, got {value!r:.80}")
    return float(value)


def _mapping(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict) or len(value) > MAX_PATTERNS:
        raise FailedPrecondition(f"{CONFIG_FILE}: {name} must be an object of at most {MAX_PATTERNS} patterns")
    return value


def matches_target(module: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return compile_pattern(targets, "target_modules").fullmatch(module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def load_weights(directory: Path, shapes: dict[str, tuple[int, int]], max_rank: int,
                 dtype: torch.dtype) -> AdapterWeights:
    """Read and validate an adapter against the base's wrapped Linear shapes {name: (in, out)}."""
    spec = read_spec(directory)
    if spec.rank > max_rank or any(int(r) > max_rank for r in spec.rank_pattern.values()):
        raise FailedPrecondition(f"adapter rank {spec.rank} exceeds the server's --max-lora-rank {max_rank}")
    for target in spec.targets_list if isinstance(spec.target_modules, list) else []:
        if not any(matches_target(name, [target]) for name in shapes):
            raise FailedPrecondition(f"target module {target!r} does not exist in this base model")
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise FailedPrecondition("adapter_model.bin (pickle) is refused: save the adapter as safetensors")
        raise FailedPrecondition(f"{WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FailedPrecondition(f"{WEIGHTS_FILE} is corrupt or truncated: {e}") from None
    kind = spec.kind
    head_name = HEAD_MODULE.get(kind)
    backbone = BACKBONE_PREFIX.get(kind)
    head_tensors: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        local = key.removeprefix(PEFT_PREFIX)
        if head_name is not None and local in (f"{head_name}.weight", f"{head_name}.bias"):
            head_tensors[local.rpartition(".")[2]] = tensor
            continue
        m = _KEY_RE.match(key)
        if m is None:
            what = "lora_A / lora_B weights" + (f" and the {head_name} head" if head_name else "")
            raise FailedPrecondition(f"unexpected tensor {key[:120]!r}: only {what} are supported")
        module = m["module"].removeprefix(PEFT_PREFIX)
        if backbone and module.startswith(backbone):
            module = "model." + module.removeprefix(backbone)
        if module not in shapes:
            raise FailedPrecondition(f"tensor {key!r} names module {module!r}, which this base model does not have")
        pairs.setdefault(module, {})[m["ab"]] = tensor
    if not pairs:
        raise FailedPrecondition(f"{WEIGHTS_FILE} holds no LoRA weights")
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise FailedPrecondition(f"module {module!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise FailedPrecondition(
                f"module {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this base "
                f"(expected [r, {fan_in}] / [{fan_out}, r]): the adapter was made for another model"
            )
        if r > max_rank:
            raise FailedPrecondition(f"module {module!r} has rank {r} > the server's --max-lora-rank {max_rank}")
        if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            raise FailedPrecondition(f"module {module!r}: lora_A is {a.dtype}, lora_B {b.dtype}; LoRA weights must be "
                                     "float16, bfloat16, float32 or float64")
        scale = spec.scaling(module)
        a, b = a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous()
        # Checked as they will serve: finite weights in the file can overflow once scaled or cast.
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise FailedPrecondition(f"module {module!r} holds NaN or infinite weights (as scaled by {scale:g} and "
                                     f"cast to {dtype})")
        modules[module] = (a, b)
    head = None
    if head_name is not None:
        weight, bias = head_from_tensors(kind, head_tensors, _hidden_size(shapes))
        if bias is None and HEAD_BIAS[kind]:
            bias = torch.zeros(weight.shape[0])  # a head saved without its bias adds nothing there
        task = (read_metadata(directory) or {}).get("task")
        head = TaskHead(parse_head_spec(task, kind, weight.shape[0]), weight, bias)
    return AdapterWeights(spec=spec, modules=modules, head=head)


def _hidden_size(shapes: dict[str, tuple[int, int]]) -> int:
    """The backbone's hidden size: what the projections reading the residual stream take in."""
    for name, (fan_in, _) in shapes.items():
        if name.endswith(("q_proj", "gate_proj", "up_proj")):
            return fan_in
    raise FailedPrecondition("this base model's layers do not show its hidden size: task heads cannot serve on it")


def read_metadata(directory: Path) -> dict | None:
    """loraserve_metadata.json as an object, None when there is none. Untrusted like every adapter file:
    a regular file (no symlink, no FIFO), at most MAX_METADATA_BYTES, a JSON object; FailedPrecondition
    names what is wrong, never the file's text."""
    try:
        fd = os.open(directory / METADATA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FailedPrecondition(f"{METADATA_FILE} cannot be opened: {e.strerror or type(e).__name__}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{METADATA_FILE} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise FailedPrecondition(f"{METADATA_FILE} cannot be read: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_METADATA_BYTES:
        raise FailedPrecondition(f"{METADATA_FILE} has more than {MAX_METADATA_BYTES} bytes")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        raise FailedPrecondition(f"{METADATA_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise FailedPrecondition(f"{METADATA_FILE} is not a JSON object")
    return meta


def write_adapter(directory: Path, spec: AdapterSpec, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  extra_config: dict | None = None,
                  head: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
    """Write PEFT's format: unscaled A [r, in], B [out, r] under PEFT's key names, and for a task
    adapter its head (weight, bias) as modules_to_save, under the names its Transformers class uses."""
    directory.mkdir(parents=True, exist_ok=True)
    kind = spec.kind
    backbone = BACKBONE_PREFIX.get(kind)
    tensors = {}
    for module, (a, b) in modules.items():
        if backbone and module.startswith("model."):
            module = backbone + module.removeprefix("model.")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    saved = None
    if kind != GENERATION:
        if head is None:
            raise ValueError(f"a {kind} adapter needs its head")
        name = HEAD_MODULE[kind]
        tensors[f"{PEFT_PREFIX}{name}.weight"] = head[0].detach().to("cpu", torch.float32).contiguous()
        if head[1] is not None:
            tensors[f"{PEFT_PREFIX}{name}.bias"] = head[1].detach().to("cpu", torch.float32).contiguous()
        saved = [name] if name == "qa_outputs" else ["classifier", "score"]  # what PEFT itself writes
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": spec.task_type,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.target_modules,
        "bias": "none",
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": saved,
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "base_model_name_or_path": spec.base_model,
        "revision": None,
        **(extra_config or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
