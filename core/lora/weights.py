"""PEFT's on-disk LoRA format: read and validate (adapter_config.json + adapter_model.safetensors), write.

Everything is checked here, at load time, so the forward pass never sees a bad adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loraserve.core.errors import FailedPrecondition
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


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

    def rank_alpha(self, module: str) -> tuple[int, float]:
        rank, alpha = self.rank, self.alpha
        for pattern, r in self.rank_pattern.items():
            if re.search(rf"(^|\.){pattern}$", module):
                rank = int(r)
        for pattern, a in self.alpha_pattern.items():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = float(a)
        return rank, alpha

    def scaling(self, module: str) -> float:
        rank, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def targets_list(self) -> list[str]:
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)


@dataclass
class AdapterWeights:
    """One adapter ready for a slot: per module, A [r, in] and B [out, r] with the scaling folded in."""

    spec: AdapterSpec
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def read_spec(directory: Path) -> AdapterSpec:
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPrecondition(f"{CONFIG_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise FailedPrecondition(f"{CONFIG_FILE} must hold a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"peft_type {raw.get('peft_type')!r} is not supported: only LORA adapters serve")
    if raw.get("use_dora"):
        raise FailedPrecondition("DoRA adapters (use_dora) are not supported")
    if raw.get("bias", "none") != "none":
        raise FailedPrecondition(f"bias={raw.get('bias')!r} is not supported: train with bias='none'")
    if raw.get("modules_to_save"):
        raise FailedPrecondition(f"modules_to_save {raw['modules_to_save']} is not supported: only LoRA weights serve")
    if raw.get("layers_to_transform") is not None:
        raise FailedPrecondition("layers_to_transform is not supported")
    try:
        rank = int(raw["r"])
        alpha = float(raw.get("lora_alpha", rank))
        targets = raw["target_modules"]
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"{CONFIG_FILE}: missing or bad field {e}") from None
    if rank < 1:
        raise FailedPrecondition(f"rank r={rank} must be >= 1")
    if not isinstance(targets, (str, list)) or not targets:
        raise FailedPrecondition(f"{CONFIG_FILE}: target_modules must be a non-empty list or a regex string")
    return AdapterSpec(
        rank=rank,
        alpha=alpha,
        target_modules=targets,
        task_type=str(raw.get("task_type") or "CAUSAL_LM"),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model=raw.get("base_model_name_or_path"),
        dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
    )


def matches_target(module: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
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
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise FailedPrecondition(f"unexpected tensor {key!r}: only lora_A / lora_B weights are supported")
        module = m["module"].removeprefix(PEFT_PREFIX)
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
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise FailedPrecondition(f"module {module!r} holds NaN or infinite weights")
        scale = spec.scaling(module)
        modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return AdapterWeights(spec=spec, modules=modules)


def write_adapter(directory: Path, spec: AdapterSpec, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  extra_config: dict | None = None) -> None:
    """Write PEFT's format: unscaled A [r, in], B [out, r] under PEFT's key names."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
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
        "modules_to_save": None,
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "base_model_name_or_path": spec.base_model,
        "revision": None,
        **(extra_config or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
