"""LoRA on the shared base: every targeted Linear gets slot-stacked adapter weights.

Serving: each wrapped Linear holds A[slots+1, r_max, in] and B[slots+1, out, r_max] (scaling folded
into B; slot 0 is all zeros and means "no adapter"). A step names one slot per row; the per-row
weights are gathered once per batch composition (rows change far less often than steps) and applied
with two bmm, so the cost is the same for one adapter or sixteen (docs/architecture.md,
"Why slot-stacked LoRA").

Training: a job's trainable adapter is attached to the same wrappers; the frozen base is shared.
The context says which of the two (or neither) a forward pass uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# Names of the projections in Llama-style decoder blocks; any Linear inside the blocks is wrappable.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:  # bitsandbytes Linear4bit subclasses nn.Linear today; keep the check explicit anyway
        import bitsandbytes as bnb

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False


class LoraBatch:
    """Which slot each row of a forward pass uses; gathers per-row weights lazily, once per layer."""

    def __init__(self, row_slots: list[int], ranks: list[int], device: torch.device):
        self.row_slots = row_slots
        self.active = any(s != 0 for s in row_slots)
        # Only the largest rank in the batch is computed: slots are zero-padded beyond their rank.
        self.rank = max([r for s, r in zip(row_slots, ranks) if s != 0], default=0)
        self.index = torch.tensor(row_slots, dtype=torch.long, device=device)  # [B]
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self, layer: "LoraLinear") -> tuple[torch.Tensor, torch.Tensor]:
        got = self._gathered.get(id(layer))
        if got is None:
            a = layer.lora_a.index_select(0, self.index)[:, : self.rank]  # [B, r, in]
            b = layer.lora_b.index_select(0, self.index)[:, :, : self.rank]  # [B, out, r]
            got = (a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous())  # [B,in,r], [B,r,out]
            self._gathered[id(layer)] = got
        return got


@dataclass
class TrainableLora:
    """One job's adapter during training: plain parameters per wrapped module name."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    use_rslora: bool = False
    a: nn.ParameterDict = field(default_factory=nn.ParameterDict)
    b: nn.ParameterDict = field(default_factory=nn.ParameterDict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def parameters(self):
        return list(self.a.values()) + list(self.b.values())

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys may not contain dots


@dataclass
class LoraContext:
    """State shared by all wrapped layers of one model; set per forward pass by its single owner."""

    batch: LoraBatch | None = None
    train: TrainableLora | None = None


class LoraLinear(nn.Module):
    """A base Linear (nn.Linear or bitsandbytes Linear4bit) plus slot-stacked LoRA weights."""

    def __init__(self, base: nn.Module, name: str, ctx: LoraContext, slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Buffers, not parameters: adapters are data the registry writes, never trained in place.
        self.register_buffer("lora_a", torch.zeros(slots + 1, max_rank, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots + 1, self.out_features, max_rank, dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.train is not None:
            return y + self._train_delta(x, ctx.train)
        batch = ctx.batch
        if batch is None or not batch.active:
            return y
        a, b = batch.weights(self)
        h = torch.bmm(x.to(a.dtype), a)  # [B, L, r]
        return y + torch.bmm(h, b).to(y.dtype)  # [B, L, out]

    def _train_delta(self, x: torch.Tensor, lora: TrainableLora) -> torch.Tensor:
        key = TrainableLora.key(self.name)
        if key not in lora.a:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        a, b = lora.a[key], lora.b[key]
        h = nn.functional.dropout(x.to(a.dtype), p=lora.dropout, training=self.training)
        return ((h @ a.t()) @ b.t() * lora.scaling).to(x.dtype)

    def write_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy one adapter's weights (a [r, in], b [out, r] with scaling folded in) into a slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a, non_blocking=True)
            self.lora_b[slot, :, :r].copy_(b, non_blocking=True)


def target_names(model: nn.Module) -> dict[str, nn.Module]:
    """Linear modules inside the decoder blocks, by their full module name (PEFT's naming)."""
    out = {}
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and is_linear(module) and not isinstance(module, LoraLinear):
            out[name] = module
    return out


def wrap_model(model: nn.Module, slots: int, max_rank: int, dtype: torch.dtype,
               device: torch.device) -> tuple[LoraContext, dict[str, LoraLinear]]:
    """Replace every Linear in the decoder blocks by a LoraLinear; returns the shared context."""
    ctx = LoraContext()
    wrapped: dict[str, LoraLinear] = {}
    for name, module in list(target_names(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear(module, name, ctx, slots, max_rank, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    if not wrapped:
        raise ValueError("no Linear layers found inside the model's decoder blocks: LoRA cannot attach")
    return ctx, wrapped


def reference_delta(x: torch.Tensor, row_weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """The plain definition the fast path must equal: row i adds x_i A_i^T B_i^T (B pre-scaled)."""
    rows = []
    for i, w in enumerate(row_weights):
        if w is None:
            rows.append(None)
            continue
        a, b = w
        rows.append((x[i].to(a.dtype) @ a.t()) @ b.t())
    out_features = next((r.shape[-1] for r in rows if r is not None), 0)
    out = torch.zeros(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r.to(x.dtype)
    return out
