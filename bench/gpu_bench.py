"""The whole GPU comparison in one command: loraserve's in-process Engine against transformers + PEFT.

    python bench/gpu_bench.py                                # 1b and 8b shapes, on cuda, anchors included
    python bench/gpu_bench.py --shapes 1b --skip-anchors     # loraserve only
    python bench/gpu_bench.py --shapes tiny --device cpu --new-tokens 16 --prompt-tokens 16   # CPU smoke test

No model hub: each shape is a Llama built from its config with random weights (normal, std 0.02) in the
compute dtype directly on the device, its decoder Linears quantized in place to bitsandbytes NF4 (double
quant, as core/model/load.py configures it), wrapped in loraserve's BaseModel. A WordLevel tokenizer of
vocab_size words ("w<id>") is built in code, so every id decodes. EOS is disabled everywhere, so every
request generates exactly --new-tokens tokens.

Random rank-16 LoRA adapters on all 7 projections are written in PEFT's format to a temp adapter root.
loraserve serves them through the Engine API (Engine(...).start/submit/stop, GenerationRequest with an
emit callback); the anchors load the same files into PEFT on a separate model instance (same seed, so the
same weights) and run transformers `generate` (greedy, min_new_tokens = max_new_tokens, PEFT
`adapter_names` for mixed batches).

The table printed last has: metric | loraserve | anchor | ratio | bar | pass. Everything, with the
per-request timings summarised, goes to --out as JSON, rewritten after every measurement, so a run that
is cut short still leaves what it measured. Every measurement is in its own try/except: a failure is
recorded in the JSON and shown in the table, and the other rows go on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T0 = time.monotonic()

# Model shapes. rope_theta is Llama 3's; the llama3 rope scaling is left out (it changes no cost) and the
# context window is 8192, which is all a 256-token workload needs.
COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
          "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": 0}
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
}

# What each shape measures. K is the number of distinct adapters: 0 = base model only, 1 = one adapter.
# (name, batch, K); "B" stands for --batch.
FULL_LS = [("b1_adapter", 1, 1), ("b1_base", 1, 0), ("bB_one", "B", 1), ("bB_mixed4", "B", 4),
           ("bB_mixed16", "B", 16), ("bB_mixedB", "B", "B"), ("bB_base", "B", 0)]
FULL_ANCHOR = [("b1_base", 1, 0), ("bB_base", "B", 0), ("b1_adapter", 1, 1), ("bB_one", "B", 1),
               ("bB_mixed4", "B", 4), ("bB_mixed16", "B", 16), ("bB_mixedB", "B", "B")]
PLANS = {
    "tiny": {"loraserve": FULL_LS, "anchors": FULL_ANCHOR, "extras": True},
    "1b": {"loraserve": FULL_LS, "anchors": FULL_ANCHOR, "extras": True},
    "8b": {"loraserve": [("b1_adapter", 1, 1), ("bB_one", "B", 1), ("bB_mixed16", "B", 16)],
           "anchors": [("b1_base", 1, 0), ("bB_base", "B", 0), ("bB_one", "B", 1), ("bB_mixed16", "B", 16)],
           "extras": False},
}
BAR_SHAPES = ("1b", "8b")  # the bars are for the real shapes on a GPU; tiny/CPU runs show no pass/fail


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--skip-anchors", action="store_true", help="no transformers/PEFT anchors")
    p.add_argument("--skip-8b", action="store_true", help="drop 8b from --shapes")
    p.add_argument("--skip-extras", action="store_true", help="no cold-load / latency-under-loads measurements")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="the large batch (requests submitted at once)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per loraserve workload (best kept)")
    p.add_argument("--anchor-seconds", type=float, default=None,
                   help="time budget of one anchor generate; slower anchors run fewer new tokens and are "
                        "extrapolated to --new-tokens from the measured prefill and per-step times "
                        "(default: 10 on cuda, 3 on cpu)")
    p.add_argument("--cold-loads", type=int, default=8, help="cold adapter loads timed (median reported)")
    p.add_argument("--load-interval-ms", type=float, default=50.0, help="one adapter load every N ms")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds to wait for a workload")
    p.add_argument("--engine", default="", help="EngineConfig overrides, e.g. max_seq_len=512,kv_cache_fraction=0.6 "
                   "(default: the engine's defaults, except max_batch_size=--batch and a large queue)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; once spent, the remaining measurements are skipped (recorded as such) and the "
                        "table is printed, so a run under a hard time limit still ends with its table (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results (default: $OUT/gpu_bench.json, else gpu_bench.json)")
    a = p.parse_args(argv)
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    if a.skip_8b:
        a.shapes = [s for s in a.shapes if s != "8b"]
    bad = [s for s in a.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (inter-token times need two tokens)")
    a.engine_overrides = {}
    for item in filter(None, (x.strip() for x in a.engine.split(","))):
        key, _, value = item.partition("=")
        try:
            a.engine_overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            a.engine_overrides[key.strip()] = value
    if a.out is None:
        a.out = str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else "gpu_bench.json"
    return a


def resolve(plan, batch: int) -> list[tuple[str, int, int]]:
    out, seen = [], set()
    for name, b, k in plan:
        b = batch if b == "B" else b
        k = batch if k == "B" else k
        name = name.replace("mixedB", f"mixed{k}").replace("bB", f"b{b}")
        if k > b:
            continue  # more adapters than requests: not this batch size's workload
        if name not in seen:  # e.g. --batch 16 makes mixed16 and mixedB the same workload
            seen.add(name)
            out.append((name, b, k))
    return out


# --- results: kept in one dict, written after every step -----------------------------------------

class OverBudget(Exception):
    pass


class Results:
    def __init__(self, path: str, data: dict, budget: float = 0.0):
        self.path = Path(path)
        self.data = data
        self.budget = budget
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def check_budget(self, what: str) -> None:
        if self.budget and time.monotonic() - T0 > self.budget:
            raise OverBudget(f"skipped: --time-budget {self.budget:.0f} s spent before {what}")

    def save(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def attempt(self, where: dict, key: str, fn, *args, **kwargs):
        """Run one measurement; its result or its error goes to where[key]; never raises."""
        try:
            self.check_budget(key)
            log(f"{key}: start")
            value = fn(*args, **kwargs)
            where[key] = value
            log(f"{key}: {brief(value)}")
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            value = None
            where[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            log(f"{key}: {'SKIPPED' if isinstance(e, OverBudget) else 'FAILED'} {type(e).__name__}: {e}")
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.save()
        return value


def brief(value) -> str:
    if not isinstance(value, dict):
        return str(value)[:200]
    keys = ("tok_per_s", "decode_tok_per_s", "step_ms", "itl_p99_ms", "wall_s", "median_ms", "scaled_from",
            "complete", "gb_per_s")
    parts = []
    for k in keys:
        if k in value and value[k] is not None:
            v = value[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts) or ", ".join(list(value)[:8])


# --- device helpers -------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device) -> dict:
    """A large device-to-device copy; counts read + write bytes."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    a.fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            b.copy_(a)
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    del a, b
    free_memory()
    return {"bytes_copied": n, "seconds_per_copy": best, "gb_per_s": 2 * n / best / 1e9,
            "note": "best of 3 rounds; read + write bytes counted"}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "platform": platform.platform()}
    for mod in ("transformers", "bitsandbytes", "peft", "triton", "accelerate", "safetensors", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    try:
        import loraserve.server.engine.engine as eng

        out["loraserve_engine_file"] = eng.__file__
    except Exception as e:  # noqa: BLE001
        out["loraserve_engine_file"] = f"import failed: {e}"
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10, check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10, check=False).stdout
        out["git_dirty_files"] = len(dirty.splitlines())
    except Exception:  # noqa: BLE001 - the device copy has no .git
        out["git_commit"] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"device": str(device), "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count}
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "name": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# --- the model, tokenizer and adapters -----------------------------------------------------------

def make_tokenizer(vocab_size: int):
    """A real fast tokenizer with a WordLevel vocabulary: id i <-> "w<i>" (0 <pad>, 1 <unk>), no EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    vocab.update({f"w{i}": i for i in range(2, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    tok.padding_side = "left"
    tok.eos_token = None
    return tok


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, **SHAPES[shape])


def quantize_nf4_inplace(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Every Linear inside the decoder blocks -> bitsandbytes Linear4bit (NF4, double quant), on its device.

    The same module type and quant settings that from_pretrained with BitsAndBytesConfig(load_in_4bit,
    nf4, double quant, compute dtype) gives; done module by module so the bf16 copy of the weights is freed
    as it goes. lm_head and the embeddings stay in the compute dtype, as transformers leaves them.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}" or type(module) is not torch.nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8, device="meta")
        w = module.weight.data
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, **q.weight.__dict__).to(w.device)
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(parent, child, q)
        del module, w
        count += 1
    # What transformers' bnb quantizer marks, so PEFT dispatches its bnb-4bit LoRA layers.
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    return count


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Random Llama of the shape, built in `dtype` on the device, NF4-quantized in place."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    check = {"embed_std": float(emb.float().std()),
             "embed_sum": float(emb.double().sum()),
             "q0_sum": float(model.model.layers[0].self_attn.q_proj.weight.double().sum())}
    sync(device)
    built = time.perf_counter() - t
    quantized = quantize_nf4_inplace(model, dtype)
    sync(device)
    wb = weight_bytes(model, config, dtype)  # before any CPU repacking below
    cpu_kernel = None
    if device.type == "cpu":
        try:  # what load_base does for NF4 on a CPU: fix the bitsandbytes kernel once, at load
            from loraserve.core.model.bnb_cpu import select_cpu_kernel

            cpu_kernel = select_cpu_kernel(model, "auto")
        except ImportError:
            pass
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    model.config.eos_token_id = None
    free_memory()
    info = {"build_s": built, "quantize_s": time.perf_counter() - t - built, "nf4_linears": quantized,
            "weights_check": check, "config": {k: getattr(config, k) for k in SHAPES[shape]},
            "weight_bytes": wb, "cpu_kernel": cpu_kernel}
    return model, config, info


def base_model(model, tokenizer, config, shape: str, device: torch.device, dtype: torch.dtype, path: Path,
               cpu_kernel: str | None = None):
    from loraserve.core.model.load import BaseModel, fingerprint_of

    extra = {}
    if cpu_kernel is not None and "cpu_kernel" in {f.name for f in dataclasses.fields(BaseModel)}:
        extra["cpu_kernel"] = cpu_kernel
    return BaseModel(model=model, tokenizer=tokenizer, name=f"random-llama-{shape}", path=path, device=device,
                     compute_dtype=dtype, quantization="nf4", fingerprint=fingerprint_of(config), **extra)


def lora_targets(model) -> list[tuple[str, int, int]]:
    out = []
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in PROJECTIONS:
            out.append((name, module.in_features, module.out_features))
    return out


def write_adapters(root: Path, targets, ids: list[str], rank: int, dtype: torch.dtype, device: torch.device,
                   seed: int) -> dict:
    """Random rank-`rank` adapters on all 7 projections, in PEFT's format (stock LoraConfig JSON).

    A ~ N(0, 1/in) and B ~ N(0, 0.01^2) with alpha = 2 * rank: B is non-zero, so each adapter changes the
    output (by ~10% of a projection's output), and the logits stay sane.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                        task_type="CAUSAL_LM")
    gen = torch.Generator(device=device)
    t = time.perf_counter()
    size = 0
    for k, adapter_id in enumerate(ids):
        gen.manual_seed(seed * 100003 + k)
        tensors = {}
        for name, fan_in, fan_out in targets:
            a = torch.randn(rank, fan_in, generator=gen, device=device) * fan_in ** -0.5
            b = torch.randn(fan_out, rank, generator=gen, device=device) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).cpu().contiguous()
        out = root / adapter_id
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(out))
        size = (out / "adapter_model.safetensors").stat().st_size
    return {"count": len(ids), "rank": rank, "alpha": 2 * rank, "dtype": str(dtype), "bytes_each": size,
            "write_s": time.perf_counter() - t}


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (count, length), generator=g).tolist()


# --- the weight-read floor --------------------------------------------------------------------------

def weight_bytes(model, config, dtype: torch.dtype) -> dict:
    """Bytes one decode step must read from the quantized base (before loraserve wraps anything)."""
    import bitsandbytes as bnb

    packed = stats = norms = other = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            packed += w.numel() * w.element_size()
            qs = w.quant_state
            stats += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if getattr(qs, "nested", False) and qs.state2 is not None:
                stats += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
                stats += qs.state2.code.numel() * qs.state2.code.element_size()
            if module.bias is not None:
                other += module.bias.numel() * module.bias.element_size()
        elif "RMSNorm" in type(module).__name__:
            norms += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    lm_head = model.get_output_embeddings().weight
    lm_bytes = lm_head.numel() * lm_head.element_size()
    el = torch.finfo(dtype).bits // 8
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * el
    return {"nf4_packed": packed, "nf4_quant_state": stats, "norms": norms, "lm_head": lm_bytes, "bias": other,
            "embedding_row": config.hidden_size * el, "kv_bytes_per_token": kv_per_token,
            "tied_embeddings": bool(config.tie_word_embeddings)}


def lora_bytes_per_adapter(targets, rank: int, dtype: torch.dtype) -> int:
    el = torch.finfo(dtype).bits // 8
    return sum(rank * (i + o) * el for _, i, o in targets)


def floor_for(wb: dict, lora_each: int, batch: int, k: int, bandwidth: float, prompt: int, new: int) -> dict:
    base = wb["nf4_packed"] + wb["nf4_quant_state"] + wb["norms"] + wb["lm_head"] + wb["bias"]
    weights = base + batch * wb["embedding_row"] + k * lora_each
    kv = batch * wb["kv_bytes_per_token"] * (prompt + new / 2)  # the mean context over the decode
    return {"bytes_weights": weights, "bytes_lora": k * lora_each, "bytes_kv_mean": kv,
            "floor_ms": weights / bandwidth * 1e3, "floor_with_kv_ms": (weights + kv) / bandwidth * 1e3}


# --- loraserve through the Engine API ---------------------------------------------------------------

class Serving:
    """The engine assembled as server/app.py's LoraServer does it, without the gRPC edge."""

    def __init__(self, base, adapter_root: Path, slots: int, max_cpu: int, rank: int, batch: int,
                 new_tokens: int, overrides: dict):
        from loraserve.core.lora.layer import wrap_model
        from loraserve.core.model.turns import DeviceTurns
        from loraserve.server.config import EngineConfig
        from loraserve.server.engine.engine import Engine
        from loraserve.server.lora.registry import AdapterRegistry

        self.base = base
        self.ctx, self.wrapped = wrap_model(base.model, slots, rank, base.compute_dtype, base.device)
        self.turns = DeviceTurns()
        self.registry = AdapterRegistry(adapter_root, self.wrapped, slots, max_cpu, rank, base.compute_dtype, None)
        self.config = EngineConfig(**{"max_batch_size": batch, "max_queue": max(4096, 4 * batch),
                                      "max_new_tokens": max(1024, new_tokens), **overrides})
        self.engine = Engine(base, self.ctx, self.registry, self.config, self.turns, None)
        self.registry.on_loaded = self.engine.wake
        self.engine.start()

    def close(self) -> None:
        try:
            self.engine.stop()
        finally:
            self.registry.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    x = (len(s) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def run_engine(serving: Serving, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
               timeout: float, during=None, stall: float = 30.0) -> dict:
    """Submit every request at once; wall time from the first submit to the last Finished.

    Inter-token times come from the TextDelta arrival times of each request (divided by the tokens a
    delta carries, should an engine emit several at once); the median of all of them is the decode step.
    """
    from loraserve.server.engine.types import (
        Failed,
        Finished,
        GenerationRequest,
        SamplingParams,
        TextDelta,
    )

    n = len(prompts)
    last_event = [time.perf_counter()]
    stamps: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    ends: list[tuple[float, object] | None] = [None] * n
    left = [n]
    lock = threading.Lock()
    done = threading.Event()

    def emitter(i: int):
        def emit(event) -> None:
            now = time.perf_counter()
            last_event[0] = now
            if isinstance(event, TextDelta):
                stamps[i].append((now, event.token_count))
                return
            if isinstance(event, (Finished, Failed)):
                ends[i] = (now, event)
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return emit

    tag = uuid.uuid4().hex[:8]
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    requests = [GenerationRequest(f"bench-{tag}-{i}", adapters[i], list(prompts[i]), sampling, emitter(i))
                for i in range(n)]
    stop_during = threading.Event()
    helper = None
    if during is not None:
        helper = threading.Thread(target=during, args=(stop_during,), daemon=True)
        helper.start()
    t0 = time.perf_counter()
    for r in requests:
        serving.engine.submit(r)
    problem = None
    while not done.wait(0.5):
        now = time.perf_counter()
        if now - t0 > timeout:
            problem = f"not finished after {timeout:.0f} s"
        elif now - last_event[0] > stall:
            problem = f"engine stalled: no event for {stall:.0f} s"
        if problem:
            break
    stop_during.set()
    extra = None
    if helper is not None:
        helper.join(timeout=60)
        extra = getattr(during, "report", None)
    if problem:
        unfinished = sum(e is None for e in ends)
        started = sum(1 for rows in stamps if rows)
        try:
            in_flight = serving.engine.in_flight
        except Exception:  # noqa: BLE001
            in_flight = "?"
        for r in requests:
            serving.engine.cancel(r.request_id)
        done.wait(10)
        raise TimeoutError(f"{problem}: {unfinished} of {n} requests unfinished ({started} had a first token; "
                           f"engine in_flight={in_flight})")
    failed = [repr(e[1].error) for e in ends if isinstance(e[1], Failed)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} requests failed: {failed[0]}")
    t_end = max(e[0] for e in ends)
    wall = t_end - t0
    generated = [e[1].generated_tokens for e in ends]
    reasons = sorted({e[1].reason for e in ends})
    itl = []
    for rows in stamps:
        for (ta, ca), (tb, cb) in itertools.pairwise(rows):
            if cb > ca:
                itl.extend([(tb - ta) / (cb - ca)] * (cb - ca))
    ttft = [rows[0][0] - t0 for rows in stamps if rows]
    step = statistics.median(itl) if itl else None
    return {
        "requests": n, "adapters": len({a for a in adapters if a}), "new_tokens": new_tokens,
        "wall_s": wall, "generated": sum(generated), "tok_per_s": sum(generated) / wall,
        "complete": all(g == new_tokens for g in generated) and reasons == ["length"],
        "finish_reasons": reasons, "generated_min": min(generated), "generated_max": max(generated),
        "step_ms": step * 1e3 if step else None,
        "decode_tok_per_s": n / step if step else None,
        "itl_p50_ms": step * 1e3 if step else None,
        "itl_p90_ms": (percentile(itl, 90) or 0) * 1e3, "itl_p99_ms": (percentile(itl, 99) or 0) * 1e3,
        "itl_max_ms": max(itl) * 1e3 if itl else None,
        "ttft_p50_ms": (percentile(ttft, 50) or 0) * 1e3, "ttft_max_ms": max(ttft) * 1e3 if ttft else None,
        "during": extra,
    }


def measure_engine(serving, prompts, adapters, new_tokens, timeout, repeats) -> dict:
    warm = run_engine(serving, prompts, adapters, new_tokens, timeout)  # slots filled, graphs captured
    runs = [run_engine(serving, prompts, adapters, new_tokens, timeout) for _ in range(max(1, repeats))]
    best = max(runs, key=lambda r: r["tok_per_s"])
    best = dict(best)
    best["warmup_tok_per_s"] = warm["tok_per_s"]
    best["runs_tok_per_s"] = [r["tok_per_s"] for r in runs]
    return best


def adapters_for(ids: list[str], batch: int, k: int) -> list[str | None]:
    return [None] * batch if k == 0 else [ids[i % k] for i in range(batch)]


def acquire_slot_waiting(reg, adapter_id: str, timeout: float = 60.0) -> int:
    """registry.acquire_slot until it gives a slot: it copies the adapter in at once (older registry) or
    starts an upload on a worker and gives the slot on a later call, once the upload is done."""
    deadline = time.perf_counter() + timeout
    while True:
        slot = reg.acquire_slot(adapter_id)
        if slot is not None:
            return slot
        if time.perf_counter() > deadline:
            raise TimeoutError(f"adapter {adapter_id} got no device slot within {timeout:.0f} s")
        time.sleep(0.0002)


def cold_load(serving: Serving, cold_ids: list[str], count: int, warm_id: str, timeout: float) -> dict:
    """LoadAdapter's work (registry.load: disk -> validated CPU copy) plus the copy into a device slot
    (registry.acquire_slot, polled until it returns the slot, then a device sync): disk to usable.

    The engine is idle meanwhile. Each id is invalidated first, so it is read from disk again (the OS
    page cache is warm after the first read; a truly cold disk is slower). Also: time to the first token of
    a 1-token request on a just-invalidated adapter (the engine loads it) vs on a warm one.
    """
    reg, device = serving.registry, serving.base.device
    loads, slots, totals = [], [], []
    for i in range(count):
        cid = cold_ids[i % len(cold_ids)]
        reg.invalidate(cid, forget_error=True)
        sync(device)
        t0 = time.perf_counter()
        reg.load(cid)
        t1 = time.perf_counter()
        slot = acquire_slot_waiting(reg, cid)
        sync(device)
        t2 = time.perf_counter()
        reg.release_slot(cid, slot)
        loads.append(t1 - t0)
        slots.append(t2 - t1)
        totals.append(t2 - t0)
    prompt = make_prompts(1, 8, 1000, 7)
    cold_req, warm_req = [], []
    for i in range(min(count, 4)):
        cid = cold_ids[i % len(cold_ids)]
        reg.invalidate(cid, forget_error=True)
        cold_req.append(run_engine(serving, prompt, [cid], 2, timeout)["ttft_p50_ms"])
        warm_req.append(run_engine(serving, prompt, [warm_id], 2, timeout)["ttft_p50_ms"])
    return {
        "loads": count, "median_ms": statistics.median(totals) * 1e3,
        "load_median_ms": statistics.median(loads) * 1e3, "slot_median_ms": statistics.median(slots) * 1e3,
        "total_ms": [t * 1e3 for t in totals],
        "first_token_cold_adapter_ms": statistics.median(cold_req),
        "first_token_warm_adapter_ms": statistics.median(warm_req),
        "note": "median_ms = registry.load (disk->CPU, validated) + acquire_slot until usable (CPU->device), synced",
    }


def latency_under_loads(serving: Serving, prompts, ids: list[str], cold_ids: list[str], new_tokens: int,
                        interval_s: float, timeout: float) -> dict:
    """p99 inter-token latency of 32 running requests (fewer if --batch is smaller) (over 16 warm adapters), without and with adapter
    loads (registry.load, LoadAdapter's work, from disk) started every `interval_s` on 4 handler threads."""
    n = min(32, len(prompts), serving.config.max_batch_size)  # all running at once: none waits for a row
    reqs = prompts[:n]
    adapters = [ids[i % min(16, len(ids))] for i in range(n)]
    reg = serving.registry
    run_engine(serving, reqs, adapters, new_tokens, timeout)  # warm-up
    quiet = run_engine(serving, reqs, adapters, new_tokens, timeout)

    def loader(stop: threading.Event) -> None:
        started, done, errors = 0, [], []
        with ThreadPoolExecutor(4, thread_name_prefix="bench-load") as pool:
            futures = []
            while not stop.is_set():
                cid = cold_ids[started % len(cold_ids)]
                started += 1

                def one(cid=cid):
                    t = time.perf_counter()
                    reg.load(cid)  # invalidates first: a fresh read from disk
                    return time.perf_counter() - t

                futures.append(pool.submit(one))
                stop.wait(interval_s)
            for f in futures:
                try:
                    done.append(f.result(timeout=120))
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
        loader.report = {"loads_started": started, "loads_done": len(done),
                         "load_median_ms": statistics.median(done) * 1e3 if done else None,
                         "errors": errors[:3]}

    loaded = run_engine(serving, reqs, adapters, new_tokens, timeout, during=loader)
    return {"requests": n, "interval_ms": interval_s * 1e3,
            "itl_p99_ms": loaded["itl_p99_ms"], "itl_p99_quiet_ms": quiet["itl_p99_ms"],
            "itl_p50_ms": loaded["itl_p50_ms"], "itl_p50_quiet_ms": quiet["itl_p50_ms"],
            "ratio_p99": loaded["itl_p99_ms"] / quiet["itl_p99_ms"] if quiet["itl_p99_ms"] else None,
            "loads": loaded["during"], "with_loads": loaded, "quiet": quiet}


# --- the anchors: transformers generate + PEFT ------------------------------------------------------

def hf_generate(model, input_ids, new_tokens: int, adapter_names=None) -> float:
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "max_new_tokens": new_tokens,
              "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    sync(input_ids.device)
    t = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**kwargs)
    sync(input_ids.device)
    seconds = time.perf_counter() - t
    got = out.shape[1] - input_ids.shape[1]
    if got != new_tokens:
        raise RuntimeError(f"generate made {got} new tokens, not {new_tokens}")
    return seconds


def anchor_measure(model, input_ids, new_tokens: int, budget: float, adapter_names=None) -> dict:
    """One anchor workload, timed end to end (prefill + decode), like loraserve's rows.

    If all --new-tokens would take longer than `budget` seconds, it runs n < new tokens and extrapolates
    the rest: time(new) = time(n) + (new - n) * step, where step = (time(n) - time(probe)) / (n - probe)
    from two measured runs (probe = 9 new tokens). The JSON says so (scaled_from = n)."""
    batch = input_ids.shape[0]
    hf_generate(model, input_ids, 2, adapter_names)  # warm-up
    prefill = hf_generate(model, input_ids, 1, adapter_names)
    probe_n = min(9, new_tokens)
    probe = hf_generate(model, input_ids, probe_n, adapter_names)
    step = max((probe - prefill) / max(probe_n - 1, 1), 1e-6)
    if probe + (new_tokens - probe_n) * step <= budget:
        n = new_tokens
    else:
        n = max(probe_n, min(new_tokens, probe_n + int((budget - probe) / step)))
    t = probe if n == probe_n else hf_generate(model, input_ids, n, adapter_names)
    if n == new_tokens:
        full = t
        step = max((t - prefill) / (n - 1), 1e-9)
    else:
        if n > probe_n:
            step = max((t - probe) / (n - probe_n), 1e-9)
        full = t + (new_tokens - n) * step
    return {"batch": batch, "adapters": len(set(adapter_names)) if adapter_names else None,
            "new_tokens": new_tokens, "measured_new_tokens": n, "scaled_from": n if n < new_tokens else None,
            "wall_s": full, "measured_wall_s": t, "prefill_s": prefill, "tok_per_s": batch * new_tokens / full,
            "step_ms": step * 1e3, "decode_tok_per_s": batch / step}


def peft_lora_layers(peft_model) -> list:
    """(key, module, child name, parent) of every PEFT LoRA layer, as PEFT's inject_adapter finds them."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    out = []
    for key, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, child = key.rpartition(".")
            out.append((key, module, child, inner.get_submodule(parent_name)))
    return out


def peft_fast_add(peft_model, layers, name: str, path: Path) -> None:
    """What load_adapter does, without its scan of every module per adapter (which grows with the adapters
    already loaded: about 1 s per adapter at 1B). Same steps: config, per-layer update (PEFT's own
    _create_and_replace), PEFT's dtype autocast, set_peft_model_state_dict. Checked against the stock
    load_adapter in run_anchors before it is trusted."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = True
    peft_model.peft_config[name] = config
    tuner = peft_model.base_model
    for key, target, child, parent in layers:
        tuner._create_and_replace(config, name, target, child, parent, current_key=key)
    cast_adapter_dtype(tuner.model, adapter_name=name, autocast_adapter_dtype=True)
    weights = load_peft_weights(str(path), device=str(next(iter(layers))[1].get_base_layer().weight.device))
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if missing:
        raise RuntimeError(f"fast PEFT load of {name}: {len(missing)} missing keys, e.g. {missing[0]}")
    for p_name, param in peft_model.named_parameters():
        if f".{name}." in p_name:
            param.requires_grad_(False)


def load_peft(model, adapter_root: Path, ids: list[str], where: dict):
    """PEFT with the adapters ids: the first two by stock PeftModel.from_pretrained / load_adapter, the rest
    by peft_fast_add once a fast-loaded copy of ids[1] gives bit-identical logits to its stock load."""
    from peft import PeftModel

    t = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, str(adapter_root / ids[0]), adapter_name=ids[0])
    peft_model.eval()
    rest = ids[1:]
    how = "stock"
    if len(ids) > 2:
        peft_model.load_adapter(str(adapter_root / ids[1]), adapter_name=ids[1])
        rest = ids[2:]
        try:
            layers = peft_lora_layers(peft_model)
            peft_fast_add(peft_model, layers, "verify-fast", adapter_root / ids[1])
            x = torch.arange(2, 18, device=next(model.parameters()).device)[None]
            with torch.inference_mode():
                peft_model.set_adapter(ids[1])
                want = peft_model(input_ids=x).logits
                peft_model.set_adapter("verify-fast")
                got = peft_model(input_ids=x).logits
            peft_model.set_adapter(ids[0])
            peft_model.delete_adapter("verify-fast")
            if not torch.equal(want, got):
                raise RuntimeError(f"fast-loaded adapter differs from stock load_adapter by "
                                   f"{(want - got).abs().max().item():.3g}")
            for i, adapter_id in enumerate(rest):
                peft_fast_add(peft_model, layers, adapter_id, adapter_root / adapter_id)
            rest, how = [], "fast (verified bit-identical to stock load_adapter)"
        except Exception as e:  # noqa: BLE001 - fall back to the stock way for whatever is not loaded yet
            where["peft_fast_load_error"] = f"{type(e).__name__}: {e}"
            log(f"fast PEFT loading failed ({e}); loading the rest with stock load_adapter")
            for adapter_id in list(peft_model.peft_config):
                if adapter_id not in ids[:2]:
                    with contextlib.suppress(Exception):
                        peft_model.delete_adapter(adapter_id)
            how = "stock"
    for adapter_id in rest:
        peft_model.load_adapter(str(adapter_root / adapter_id), adapter_name=adapter_id)
    peft_model.set_adapter(ids[0])
    where["peft_load_s"] = time.perf_counter() - t
    where["peft_load"] = how
    where["peft_lora_dtype"] = str(next(p.dtype for n, p in peft_model.named_parameters() if "lora_A" in n))
    return peft_model


def run_anchors(shape: str, args, device, dtype, tokenizer, adapter_root: Path, ids: list[str],
                prompts, res: Results, where: dict, weights_check: dict) -> None:
    plan = resolve(PLANS[shape]["anchors"], args.batch)
    budget = args.anchor_seconds if args.anchor_seconds is not None else (10.0 if device.type == "cuda" else 3.0)
    res.check_budget(f"the {shape} anchors")
    log(f"{shape}: building the anchor model (a separate instance, same seed)")
    model, _, info = build_model(shape, device, dtype, args.seed)
    info["same_weights_as_loraserve"] = info["weights_check"] == weights_check
    where["model"] = info
    where["budget_s_per_run"] = budget
    res.save()
    input_all = torch.tensor(prompts[: args.batch], dtype=torch.long, device=device)
    for name, batch, k in plan:
        if k == 0:
            res.attempt(where, name, anchor_measure, model, input_all[:batch], args.new_tokens, budget)
    need = max([k for _, _, k in plan] + [0])
    if need:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = load_peft(model, adapter_root, ids[:need], where)
        log(f"{shape}: PEFT loaded {need} adapters in {where['peft_load_s']:.1f} s ({where['peft_load']}; "
            f"LoRA weights in {where['peft_lora_dtype']})")
        for name, batch, k in plan:
            if k == 1:
                peft_model.set_adapter(ids[0])
                res.attempt(where, name, anchor_measure, peft_model, input_all[:batch], args.new_tokens, budget)
            elif k > 1:
                names = [ids[i % k] for i in range(batch)]
                res.attempt(where, name, anchor_measure, peft_model, input_all[:batch], args.new_tokens, budget,
                            names)
        del peft_model
    del model, input_all
    free_memory()


# --- one shape ----------------------------------------------------------------------------------------

def run_shape(shape: str, args, device: torch.device, dtype: torch.dtype, res: Results, tmp: Path) -> None:
    plan = PLANS[shape]
    ls_plan = resolve(plan["loraserve"], args.batch)
    an_plan = resolve(plan["anchors"], args.batch)
    out = res.data["shapes"].setdefault(shape, {"loraserve": {}, "anchors": {}, "extras": {}})
    tokenizer = make_tokenizer(SHAPES[shape]["vocab_size"])
    n_adapters = max([k for _, _, k in ls_plan + an_plan] + [1])
    ids = [f"ad{i:03d}" for i in range(n_adapters)]
    cold_ids = [f"cold{i:02d}" for i in range(8)] if plan["extras"] and not args.skip_extras else []
    prompts = make_prompts(max(args.batch, 32), args.prompt_tokens, SHAPES[shape]["vocab_size"], args.seed + 1)
    adapter_root = tmp / shape / "adapters"

    res.check_budget(f"the {shape} model")
    log(f"{shape}: building the model on {device} ({dtype}), NF4")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, config, info = build_model(shape, device, dtype, args.seed)
    out["model"] = info
    log(f"{shape}: built in {info['build_s']:.1f} s, quantized {info['nf4_linears']} Linears in "
        f"{info['quantize_s']:.1f} s")
    targets = lora_targets(model)
    out["adapters"] = write_adapters(adapter_root, targets, ids + cold_ids, args.rank, dtype, device, args.seed)
    log(f"{shape}: wrote {len(ids) + len(cold_ids)} adapters "
        f"({out['adapters']['bytes_each'] / 2**20:.1f} MiB each) in {out['adapters']['write_s']:.1f} s")
    wb = info["weight_bytes"]
    lora_each = lora_bytes_per_adapter(targets, args.rank, dtype)
    out["weight_bytes"] = {**wb, "lora_per_adapter": lora_each}
    res.save()

    serving = None
    try:
        base = base_model(model, tokenizer, config, shape, device, dtype, tmp / shape, info["cpu_kernel"])
        serving = Serving(base, adapter_root, slots=max(64, n_adapters), max_cpu=max(128, 2 * n_adapters),
                          rank=args.rank, batch=args.batch, new_tokens=args.new_tokens,
                          overrides=args.engine_overrides)
        out["engine_config"] = dataclasses.asdict(serving.config)
        out["engine_max_rows"] = getattr(serving.engine.batch, "max_rows", None)
        log(f"{shape}: engine up: {out['engine_config']}, max_rows {out['engine_max_rows']}")
        if isinstance(out["engine_max_rows"], int) and out["engine_max_rows"] < args.batch:
            log(f"{shape}: WARNING the engine runs at most {out['engine_max_rows']} rows, fewer than --batch "
                f"{args.batch}: the large-batch rows measure that many at a time")
        ls = out["loraserve"]
        for name, batch, k in ls_plan:
            res.attempt(ls, name, measure_engine, serving, prompts[:batch], adapters_for(ids, batch, k),
                        args.new_tokens, args.request_timeout, args.repeats)
        bw = res.data["bandwidth"].get("gb_per_s")
        if bw:
            out["floors"] = {name: floor_for(wb, lora_each, batch, k, bw * 1e9, args.prompt_tokens, args.new_tokens)
                             for name, batch, k in ls_plan}
        if cold_ids:
            ex = out["extras"]
            res.attempt(ex, "cold_load", cold_load, serving, cold_ids, args.cold_loads, ids[0], args.request_timeout)
            res.attempt(ex, "latency_under_loads", latency_under_loads, serving, prompts, ids, cold_ids,
                        args.new_tokens, args.load_interval_ms / 1e3, args.request_timeout)
        if device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:  # noqa: BLE001 - assembling the engine failed: record it, go on to the anchors
        out["loraserve_error"] = f"{type(e).__name__}: {e}"
        out["loraserve_traceback"] = traceback.format_exc(limit=10)
        log(f"{shape}: loraserve FAILED {type(e).__name__}: {e}")
    finally:
        if serving is not None:
            try:
                serving.close()
            except Exception as e:  # noqa: BLE001
                log(f"{shape}: engine stop failed: {e}")
        serving = base = None
        del model
        free_memory()
        res.save()

    if not args.skip_anchors:
        try:
            run_anchors(shape, args, device, dtype, tokenizer, adapter_root, ids, prompts, res, out["anchors"],
                        info["weights_check"])
        except Exception as e:  # noqa: BLE001
            out["anchors"]["error"] = f"{type(e).__name__}: {e}"
            out["anchors"]["traceback"] = traceback.format_exc(limit=10)
            log(f"{shape}: anchors FAILED {type(e).__name__}: {e}")
            free_memory()
        res.save()


# --- the table --------------------------------------------------------------------------------------

def _get(d: dict, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _err(d: dict, *path) -> str | None:
    v = _get(d, *path)
    if isinstance(v, dict) and "error" in v:
        return v["error"]
    return None


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return s + unit


def build_table(data: dict, args) -> list[dict]:
    rows: list[dict] = []
    batch = args.batch

    def add(metric, ls=None, anchor=None, ratio=None, bar=None, op=">=", value_for_bar=None, note="",
            error=None):
        row = {"metric": metric, "loraserve": ls, "anchor": anchor, "ratio": ratio, "bar": bar, "note": note,
               "error": error, "pass": None}
        v = value_for_bar
        if bar is not None and v is not None and error is None:
            row["pass"] = bool(v >= bar) if op == ">=" else bool(v <= bar)
        rows.append(row)

    def ratio(a, b):
        return a / b if (a is not None and b) else None

    for shape in args.shapes:
        s = data["shapes"].get(shape)
        if s is None:
            continue
        barred = shape in BAR_SHAPES and data["device"]["device"].startswith("cuda")
        B = (lambda x: x) if barred else (lambda x: None)
        ls, an = s.get("loraserve", {}), s.get("anchors", {})
        fatal = s.get("loraserve_error")

        def L(name, key="tok_per_s", ls=ls):
            return _get(ls, name, key)

        def A(name, key="tok_per_s", an=an):
            return _get(an, name, key)

        def E(name, anchor=None, ls=ls, an=an, fatal=fatal):
            return fatal or _err(ls, name) or (_err(an, anchor) if anchor else None)

        def star(name, an=an):
            n = _get(an, name, "scaled_from")
            return f"anchor extrapolated from {n} new tokens" if n else ""

        one, mix_max = f"b{batch}_one", f"b{batch}_mixed{batch}"
        p = f"[{shape}] "
        if shape != "8b":
            add(p + "b1 one adapter, tok/s", L("b1_adapter"), A("b1_adapter"), ratio(L("b1_adapter"), A("b1_adapter")),
                B(500), value_for_bar=L("b1_adapter"), note=star("b1_adapter"), error=E("b1_adapter"))
            add(p + "b1 base, tok/s", L("b1_base"), A("b1_base"), ratio(L("b1_base"), A("b1_base")),
                note=star("b1_base"), error=E("b1_base"))
            r = ratio(L("b1_adapter"), L("b1_base"))
            add(p + "b1 one adapter / base", r, ratio(A("b1_adapter"), A("b1_base")), None, B(0.9),
                value_for_bar=r, error=E("b1_adapter") or E("b1_base"))
            add(p + f"b{batch} base, tok/s", L(f"b{batch}_base"), A(f"b{batch}_base"),
                ratio(L(f"b{batch}_base"), A(f"b{batch}_base")), note=star(f"b{batch}_base"),
                error=E(f"b{batch}_base"))
            add(p + f"b{batch} one adapter, tok/s", L(one), A(one), ratio(L(one), A(one)), note=star(one),
                error=E(one))
            r = ratio(L(one), L(f"b{batch}_base"))
            add(p + f"b{batch} one adapter / base", r, ratio(A(one), A(f"b{batch}_base")), None, B(0.9),
                value_for_bar=r, error=E(one) or E(f"b{batch}_base"))
            for k in sorted(k for k in {4, 16, batch} if k <= batch):
                name = f"b{batch}_mixed{k}"
                rr = ratio(L(name), A(name))
                add(p + f"b{batch} over {k} adapters, tok/s", L(name), A(name), rr,
                    B(20) if k == batch else None, value_for_bar=rr, note=star(name) + (
                        " (bar on the ratio vs PEFT)" if k == batch and barred else ""), error=E(name))
                r = ratio(L(name), L(one))
                add(p + f"b{batch} {k} adapters / one adapter", r, ratio(A(name), A(one)), None, B(0.9),
                    value_for_bar=r, error=E(name) or E(one))
            for name, label in ((mix_max, f"over {batch} adapters"), (one, "one adapter")):
                v = L(name, "decode_tok_per_s")
                add(p + f"b{batch} decode tok/s, {label}", v, A(name, "decode_tok_per_s"),
                    ratio(v, A(name, "decode_tok_per_s")), B(10000), value_for_bar=v,
                    note="decode = rows / median inter-token time", error=E(name))
            steps = [("b1_adapter", "b1 one adapter"), (one, f"b{batch} one adapter"),
                     (mix_max, f"b{batch} over {batch} adapters")]
        else:
            add(p + "b1 one adapter, tok/s (anchor col: HF base b1)", L("b1_adapter"), A("b1_base"),
                ratio(L("b1_adapter"), A("b1_base")),
                B(150), value_for_bar=L("b1_adapter"), note="anchor: HF base b1 " + star("b1_base"),
                error=E("b1_adapter"))
            add(p + f"b{batch} base, tok/s", None, A(f"b{batch}_base"), None, note="anchor only " + star(
                f"b{batch}_base"), error=_err(an, f"b{batch}_base"))
            add(p + f"b{batch} one adapter, tok/s", L(one), A(one), ratio(L(one), A(one)), note=star(one),
                error=E(one))
            name = f"b{batch}_mixed16"
            add(p + f"b{batch} over 16 adapters, tok/s", L(name), A(name), ratio(L(name), A(name)),
                note=star(name), error=E(name))
            r = ratio(L(name), L(one))
            add(p + f"b{batch} 16 adapters / one adapter", r, ratio(A(name), A(one)), None, B(0.9),
                value_for_bar=r, error=E(name) or E(one))
            for nm, label in ((name, "over 16 adapters"), (one, "one adapter")):
                v = L(nm, "decode_tok_per_s")
                add(p + f"b{batch} decode tok/s, {label}", v, A(nm, "decode_tok_per_s"),
                    ratio(v, A(nm, "decode_tok_per_s")), note="decode = rows / median inter-token time",
                    error=E(nm))
            steps = [("b1_adapter", "b1 one adapter"), (one, f"b{batch} one adapter"),
                     (name, f"b{batch} over 16 adapters")]
        for nm, label in steps:
            step = L(nm, "step_ms")
            fl = _get(s, "floors", nm, "floor_ms")
            fk = _get(s, "floors", nm, "floor_with_kv_ms")
            add(p + f"decode step ms, {label} (anchor col: weight-read floor)", step, fl, ratio(fl, step),
                note=f"ratio = floor / step; floor incl. KV reads {fmt(fk)} ms" if fk else "", error=E(nm))
        if shape != "8b" and not args.skip_extras:
            cl = _get(s, "extras", "cold_load")
            add(p + "cold adapter load ms (disk -> slot, median)", _get(cl, "median_ms"), None, None,
                note=(f"load {fmt(_get(cl, 'load_median_ms'))} + slot {fmt(_get(cl, 'slot_median_ms'))} ms; first "
                      f"token cold {fmt(_get(cl, 'first_token_cold_adapter_ms'))} vs warm "
                      f"{fmt(_get(cl, 'first_token_warm_adapter_ms'))} ms") if cl and "error" not in cl else "",
                error=fatal or _err(s, "extras", "cold_load"))
            lu = _get(s, "extras", "latency_under_loads")
            add(p + f"p99 inter-token ms, {_get(lu, 'requests') or 32} req, loads every "
                f"{args.load_interval_ms:.0f} ms (anchor col: no loads)", _get(lu, "itl_p99_ms"),
                _get(lu, "itl_p99_quiet_ms"), _get(lu, "ratio_p99"),
                note=(f"{_get(lu, 'loads', 'loads_done')} loads done" if lu and "error" not in lu else ""),
                error=fatal or _err(s, "extras", "latency_under_loads"))
        if not args.skip_anchors and _get(an, "error"):
            add(p + "anchors", None, None, None, error=_get(an, "error"))
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| metric | loraserve | anchor | ratio | bar | pass |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["error"]:
            ls = "ERROR: " + r["error"].replace("|", "/").replace("\n", " ")[:90]
        else:
            ls = fmt(r["loraserve"])
        anchor = fmt(r["anchor"]) + ("*" if r["note"] and "extrapolated" in r["note"] else "")
        bar = "-" if r["bar"] is None else (f">= {r['bar']}x" if "ratio vs PEFT" in r["note"] else f">= {r['bar']}")
        ok = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        if r["error"] and r["bar"] is not None:
            ok = "ERROR"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"| {r['metric']} | {ls} | {anchor} | {ratio} | {bar} | {ok} |")


# --- main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # a shared machine: stay small
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    vers = versions()
    dev = device_info(device)
    log(f"device {dev['name']} | " + " ".join(f"{k} {vers[k]}" for k in
                                               ("torch", "transformers", "bitsandbytes", "peft", "triton")))
    log(f"loraserve engine from {vers['loraserve_engine_file']}")
    data = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args), "device": dev, "versions": vers, "dtype": str(dtype),
        "workload": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
                     "rank": args.rank, "greedy": True, "eos": "disabled"},
        "bandwidth": {}, "shapes": {},
    }
    res = Results(args.out, data, args.time_budget)
    res.save()

    def on_term(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    log(f"results -> {res.path}")
    res.attempt(data, "bandwidth", copy_bandwidth, device)
    if not isinstance(data["bandwidth"], dict) or "gb_per_s" not in data["bandwidth"]:
        data["bandwidth"] = {**(data["bandwidth"] or {}), "gb_per_s": None}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
            for shape in args.shapes:
                try:
                    run_shape(shape, args, device, dtype, res, Path(tmp))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory building the model
                    data["shapes"].setdefault(shape, {})["error"] = f"{type(e).__name__}: {e}"
                    data["shapes"][shape]["traceback"] = traceback.format_exc(limit=10)
                    log(f"{shape}: {'SKIPPED' if isinstance(e, OverBudget) else 'FAILED'} {type(e).__name__}: {e}")
                    free_memory()
                shutil_rm(Path(tmp) / shape)
    except (KeyboardInterrupt, SystemExit) as e:  # SIGTERM (a time limit) or Ctrl-C: still print the table
        data["interrupted"] = f"{type(e).__name__}: {e}"
        log(f"interrupted ({e}); printing what was measured")
    rows = build_table(data, args)
    data["table"] = rows
    data["elapsed_s"] = time.monotonic() - T0
    res.save()
    log(f"done in {data['elapsed_s']:.0f} s; full results in {res.path}")
    print(f"\ndevice: {dev['name']} ({dev['device']}) | copy bandwidth "
          f"{fmt(data['bandwidth'].get('gb_per_s'))} GB/s | " + ", ".join(
              f"{k} {vers[k]}" for k in ("torch", "transformers", "bitsandbytes", "peft", "triton")))
    print(f"workload: {args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy, EOS off, NF4 base, "
          f"LoRA rank {args.rank} on all 7 projections; tok/s = generated tokens / (first submit .. last finish); "
          f"* = anchor extrapolated from fewer new tokens (see JSON)")
    for shape in args.shapes:
        err = _get(data, "shapes", shape, "error")
        if err:
            print(f"[{shape}] FAILED: {err}")
    print_table(rows)
    return 143 if data.get("interrupted") else 0


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
