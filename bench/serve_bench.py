"""Throughput and latency of a running loraserve server over K adapters, next to PEFT mixed-batch generate.

    python bench/serve_bench.py                       # defaults: embedded SmolLM2-135M, NF4, 16 requests, K = 1 and 16
    python bench/serve_bench.py --adapters 1,4,16 --rounds 3 --out results.json

What it does, in one run:
1. writes K random LoRA adapters (PEFT format, all 7 projections) for the base into a temp adapter root;
2. builds N prompts of exactly --prompt-tokens tokens;
3. starts `python -m loraserve.server.cli serve` on free ports and warms it up with the very workload (so every adapter
   holds a device slot: the numbers are steady-state throughput, not cold adapter loads);
4. loads the anchor beside it: transformers `generate` + PEFT `adapter_names` (one left-padded batch,
   greedy, min_new_tokens = max_new_tokens), same adapters, prompts and quantization;
5. measures: per round and per K, N concurrent Predict calls (request i names adapter i % K; wall time from
   the first send to the last reply), then the same workload on PEFT;
6. stops the server, prints a table and writes everything to --out.

Each measurement is repeated --rounds times and the round with the highest throughput is kept (on a shared
machine noise only ever slows a round down). Server and PEFT, and the K values, take turns within each
round, so a slow spell hits all of them alike. Every round is in the JSON, with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients" / "python"))  # the typed client, even without an install

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
READY_RE = re.compile(r"serving .* on port (\d+)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=["nf4", "bf16", "fp32"], default="nf4")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests N")
    p.add_argument("--adapters", default="1,16", help="comma list of K (distinct adapters) to run, each in turn")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="repeat each measurement; the best round is kept")
    p.add_argument("--port", type=int, default=0, help="server gRPC port (0: a free one)")
    p.add_argument("--skip-anchor", action="store_true", help="do not run the PEFT generate anchor")
    p.add_argument("--engine", choices=["static", "generic"], default="static", help="the server's --engine")
    p.add_argument("--compare-engine", choices=["generic", "static", "none"], default="generic",
                   help="also run a second server with this --engine in the same rounds (none: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.json")
    a = p.parse_args(argv)
    a.adapters = sorted({int(k) for k in a.adapters.split(",") if k.strip()})
    if not a.adapters or min(a.adapters) < 1:
        p.error("--adapters needs positive integers, e.g. 1,16")
    return a


# --- inputs: adapters and prompts ---------------------------------------------------------------

def make_adapters(model_dir: Path, root: Path, count: int, rank: int, seed: int) -> list[str]:
    """`count` random rank-`rank` adapters on all 7 projections, saved by stock PEFT.

    The base is built on the meta device: only module shapes matter here, so this costs nothing even for
    an 8B base. Every adapter reuses the same PeftModel with freshly drawn LoRA weights.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations that PEFT triggers
        base = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS))
    lora = [(n, p.shape) for n, p in peft_model.named_parameters() if "lora_" in n]
    ids = []
    for k in range(count):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        for name, shape in lora:
            # PEFT's init_lora_weights=False bounds (kaiming-uniform, a=sqrt(5)): B is non-zero, so every
            # adapter changes the output; fan_in is `in` for A [r, in] and r for B [out, r].
            value = (torch.rand(shape, generator=gen) * 2 - 1) * shape[1] ** -0.5
            # A meta parameter cannot take real data in place: put a real one in its stead.
            module, attr = name.rsplit(".", 1)
            setattr(peft_model.get_submodule(module), attr, torch.nn.Parameter(value, requires_grad=False))
        adapter_id = f"bench-r{rank}-{k}"
        peft_model.save_pretrained(root / adapter_id)
        ids.append(adapter_id)
    return ids


def make_prompts(tokenizer, count: int, length: int, rng: random.Random) -> list[str]:
    """Texts that the server's tokenizer (add_special_tokens=True) turns into exactly `length` ids.

    Built from ids of whole lower-case words with a leading space, so decode -> encode round-trips.
    """
    special = len(tokenizer("a", add_special_tokens=True)["input_ids"]) - len(
        tokenizer("a", add_special_tokens=False)["input_ids"])
    # Sorted by id: get_vocab()'s order changes from process to process (a Rust HashMap), and the same seed
    # must give the same texts in every run.
    words = sorted(i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"[Ġ▁][a-z]{3,8}", t))
    prompts = []
    while len(prompts) < count:
        text = tokenizer.decode([rng.choice(words) for _ in range(length - special)])
        if len(tokenizer(text, add_special_tokens=True)["input_ids"]) == length:
            prompts.append(text)
    return prompts


# --- the server under test ----------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without cleaning up (SIGKILL, a crash)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerProcess:
    """`loraserve serve` as a subprocess; always killed on exit, exceptions included."""

    def __init__(self, args, adapter_root: Path, slots: int, log_path: Path, engine: str):
        self.cmd = [sys.executable, "-m", "loraserve.server.cli", "serve", "--engine", engine, "--host", "127.0.0.1",
                    "--port", str(args.port), "--metrics-port", "0", "--adapter-root", str(adapter_root),
                    "--quantization", args.quantization, "--max-gpu-adapters", str(slots),
                    "--max-cpu-adapters", str(max(slots, 64)), "--max-lora-rank", str(args.rank),
                    "--max-batch-size", str(args.requests), "--max-queue", str(max(256, args.requests)),
                    "--max-new-tokens", str(max(1024, args.new_tokens)), "--grace-seconds", "2"]
        if args.model:
            self.cmd += ["--model", args.model]
        if args.device:
            self.cmd += ["--device", args.device]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "ServerProcess":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=_die_with_parent)
        ready = threading.Event()
        log = open(self.log_path, "w")

        def pump():  # keep draining stderr into the log so the server never blocks on a full pipe
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                m = READY_RE.search(line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            log.close()
            ready.set()  # the process ended: unblock the wait below

        threading.Thread(target=pump, daemon=True).start()
        try:
            if not ready.wait(timeout=600) or self.port is None:
                raise RuntimeError(f"the server did not start; see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise
        print(f"server pid {self.proc.pid} on port {self.port} (log: {self.log_path})", file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: the server drains (2 s grace) and exits
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fire(client, prompts: list[str], adapter_ids: list[str], new_tokens: int) -> dict:
    """All requests at once (a barrier releases them together); wall = first send to last reply."""
    n = len(prompts)
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        start = time.perf_counter()
        c = client.predict(prompts[i], adapter_id=adapter_ids[i], max_new_tokens=new_tokens, temperature=0.0,
                           timeout=1800)
        return start, time.perf_counter(), c

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = max(r[1] for r in results) - min(r[0] for r in results)
    generated = sum(r[2].generated_tokens for r in results)
    latency = [r[1] - r[0] for r in results]
    return {
        "wall_seconds": wall,
        "generated_tokens": generated,
        "tokens_per_second": generated / wall,
        "latency_seconds": summary(latency),
        "ttft_seconds": summary([r[2].first_token_seconds for r in results]),
        "queue_seconds": summary([r[2].queue_seconds for r in results]),
        "prompt_tokens": [r[2].prompt_tokens for r in results],
        "generated_per_request": [r[2].generated_tokens for r in results],
        "texts": [r[2].text for r in results],
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    x = (len(s) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def summary(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values)}


def warm_up(args, client, prompts: list[str], adapter_ids: list[str], tokenizer, rng) -> None:
    """Run the workload once per K, so every adapter holds a device slot before anything is timed.

    A greedy random-adapter model can end on EOS before --new-tokens and the server has no way to ignore
    EOS, so prompts whose request stops short are redrawn (a few tries): measured requests run full length.
    """
    for attempt in range(5):
        short = set()
        for k in args.adapters:
            r = fire(client, prompts, [adapter_ids[i % k] for i in range(args.requests)], args.new_tokens)
            bad_len = [n for n in r["prompt_tokens"] if n != args.prompt_tokens]
            if bad_len:
                raise RuntimeError(f"the server counted prompts of {bad_len} tokens, not {args.prompt_tokens}")
            short |= {i for i, g in enumerate(r["generated_per_request"]) if g < args.new_tokens}
        if not short:
            return
        print(f"warm-up {attempt}: {len(short)} request(s) ended early (EOS); redrawing their prompts",
              file=sys.stderr)
        for i, text in zip(sorted(short), make_prompts(tokenizer, len(short), args.prompt_tokens, rng)):
            prompts[i] = text


# --- the anchor: transformers generate + PEFT mixed batch ---------------------------------------

def load_anchor(model_dir: Path, quantization: str, device: torch.device, adapter_root: Path, adapter_ids,
                model_class: str = "AutoModelForCausalLM", head: str | None = None, **model_kwargs):
    """The base loaded the way the server loads it (same quantization and compute dtype), plus PEFT with
    every adapter. model_class names the transformers class (a task kind's); `head` keeps that module
    out of bitsandbytes' 4-bit layers (it would turn a new head into a Linear4bit whose weight is never
    quantized), full precision as the server keeps its heads."""
    import transformers
    from peft import PeftModel

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantization == "nf4":
        skip = {"llm_int8_skip_modules": [head]} if head else {}
        kwargs = {"quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True, **skip), "dtype": compute, "device_map": {"": device}}
    else:
        kwargs = {"dtype": torch.bfloat16 if quantization == "bf16" else torch.float32}
    model = getattr(transformers, model_class).from_pretrained(model_dir, **kwargs, **model_kwargs)
    if quantization != "nf4":
        model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations that PEFT triggers
        model = PeftModel.from_pretrained(model, adapter_root / adapter_ids[0], adapter_name=adapter_ids[0])
    for adapter_id in adapter_ids[1:]:
        model.load_adapter(adapter_root / adapter_id, adapter_name=adapter_id)
    return model.eval()


def make_anchor(args, model_dir: Path, device: torch.device, adapter_root: Path, adapter_ids, prompts,
                tokenizer) -> Callable[[int], dict]:
    """Loads PEFT and returns run(K): one timed, greedy, left-padded generate of all N prompts."""
    model = load_anchor(model_dir, args.quantization, device, adapter_root, adapter_ids)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    width = batch["input_ids"].shape[1]

    def generate(k: int, new_tokens: int) -> tuple[float, torch.Tensor]:
        names = [adapter_ids[i % k] for i in range(args.requests)]  # PEFT's per-row adapters
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, adapter_names=names, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out[:, width:]

    for k in args.adapters:
        generate(k, 2)  # warm-up: first-call allocations and kernel selection

    def run(k: int) -> dict:
        seconds, new = generate(k, args.new_tokens)
        return {"tokens_per_second": new.numel() / seconds, "wall_seconds": seconds,
                "generated_tokens": new.numel(), "texts": tokenizer.batch_decode(new, skip_special_tokens=True)}

    return run


def measure(args, client, anchor, prompts: list[str], adapter_ids: list[str], other=None) -> tuple[dict, dict, dict]:
    """--rounds rounds; in each, every K runs on the server, the comparison server, then PEFT, back to back.

    Interleaving keeps the ratios fair on a shared machine, where a slow spell would otherwise land on one
    side only. The idle server uses no CPU while PEFT runs (its engine thread waits on a condition).
    """
    server = {k: [] for k in args.adapters}
    peft = {k: [] for k in args.adapters}
    second = {k: [] for k in args.adapters}
    for _ in range(args.rounds):
        for k in args.adapters:
            server[k].append(fire(client, prompts, [adapter_ids[i % k] for i in range(args.requests)],
                                  args.new_tokens))
            if other is not None:
                second[k].append(fire(other, prompts, [adapter_ids[i % k] for i in range(args.requests)],
                                      args.new_tokens))
                print(f"K={k}: --engine {args.compare_engine} {second[k][-1]['tokens_per_second']:.1f} tokens/s",
                      file=sys.stderr)
            if anchor is not None:
                peft[k].append(anchor(k))
            print(f"K={k}: loraserve {server[k][-1]['tokens_per_second']:.1f} tokens/s"
                  + (f", PEFT {peft[k][-1]['tokens_per_second']:.1f}" if anchor is not None else ""),
                  file=sys.stderr)
    return server, peft, second


def best_rounds(args, server_rounds: dict, peft_rounds: dict, second_rounds: dict) -> tuple[dict, dict, dict]:
    server, peft, second = {}, {}, {}
    for k in args.adapters:
        best = max(server_rounds[k], key=lambda r: r["tokens_per_second"])
        full = sum(g == args.new_tokens for g in best["generated_per_request"])
        if full < args.requests:
            print(f"K={k}: {args.requests - full} request(s) ended before {args.new_tokens} tokens; "
                  "tokens/s counts the tokens actually generated", file=sys.stderr)
        server[k] = {"best": best, "rounds_tokens_per_second": [r["tokens_per_second"] for r in server_rounds[k]]}
        if second_rounds[k]:
            second[k] = {"best": max(second_rounds[k], key=lambda r: r["tokens_per_second"]),
                         "rounds_tokens_per_second": [r["tokens_per_second"] for r in second_rounds[k]]}
        if peft_rounds[k]:
            peft[k] = {**max(peft_rounds[k], key=lambda r: r["tokens_per_second"]),
                       "rounds_tokens_per_second": [r["tokens_per_second"] for r in peft_rounds[k]]}
    return server, peft, second


# --- report ---------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    import peft
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = set()
    try:
        flags = set(next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    # The flags that decide which kernels torch and bitsandbytes pick on this CPU.
    relevant = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    info = {"cpu": cpu, "cpu_flags": relevant, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def print_table(args, server: dict, anchor: dict, second: dict) -> None:
    k1 = server.get(1, {}).get("best", {}).get("tokens_per_second")
    print(f"\n{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new tokens), "
          f"rank {args.rank}, {args.quantization}, --engine {args.engine}, best of {args.rounds} round(s)")
    head = (f"{'K':>4} {'loraserve tok/s':>16} {'PEFT tok/s':>11} {'vs PEFT':>8} {'vs K=1':>7} "
            f"{'p50 lat s':>10} {'p99 lat s':>10} {'TTFT p50 s':>11} {'same text':>10} "
            f"{'vs ' + args.compare_engine:>11}")
    print(head)
    print("-" * len(head))
    for k in args.adapters:
        b = server[k]["best"]
        tps = b["tokens_per_second"]
        a = anchor.get(k)
        same = f"{sum(x == y for x, y in zip(b['texts'], a['texts']))}/{args.requests}" if a else "-"
        print(f"{k:>4} {tps:>16.1f} {a['tokens_per_second'] if a else float('nan'):>11.1f} "
              f"{tps / a['tokens_per_second'] if a else float('nan'):>7.2f}x "
              f"{tps / k1 if k1 else float('nan'):>6.2f}x {b['latency_seconds']['p50']:>10.2f} "
              f"{b['latency_seconds']['p99']:>10.2f} {b['ttft_seconds']['p50']:>11.2f} {same:>10} "
              + (f"{tps / second[k]['best']['tokens_per_second']:>10.2f}x" if k in second else f"{'-':>11}"))


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (a timeout, a job runner) unwinds like Ctrl-C, so the server is stopped and temp files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from loraserve.client import Client
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_before[0]:.1f} before the run: other processes use the CPU, "
              "so numbers will be low and noisy", file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        adapter_root = tmp / "adapters"
        adapter_ids = make_adapters(model_dir, adapter_root, max(args.adapters), args.rank, args.seed)
        prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, rng)
        server_log = Path(args.out).with_suffix(".server.log")
        with contextlib.ExitStack() as stack:
            proc = stack.enter_context(ServerProcess(args, adapter_root, max(args.adapters), server_log, args.engine))
            client = stack.enter_context(Client(f"127.0.0.1:{proc.port}"))
            warm_up(args, client, prompts, adapter_ids, tokenizer, rng)
            other = None
            if args.compare_engine != "none":
                other_log = Path(args.out).with_suffix(f".{args.compare_engine}.server.log")
                other_proc = stack.enter_context(ServerProcess(args, adapter_root, max(args.adapters), other_log,
                                                               args.compare_engine))
                other = stack.enter_context(Client(f"127.0.0.1:{other_proc.port}"))
                warm_up(args, other, prompts, adapter_ids, tokenizer, rng)
            run_peft = None if args.skip_anchor else make_anchor(args, model_dir, device, adapter_root,
                                                                 adapter_ids, prompts, tokenizer)
            server, anchor, second = best_rounds(args, *measure(args, client, run_peft, prompts, adapter_ids, other))
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": {**machine_info(device), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {**vars(args), "model": str(model_dir), "kept_round": "best"},
        "prompts": prompts,
        "loraserve": {str(k): v for k, v in server.items()},
        "peft": {str(k): v for k, v in anchor.items()},
        f"engine_{args.compare_engine}": {str(k): v for k, v in second.items()},
        "ratios": {str(k): {"loraserve_vs_peft": (server[k]["best"]["tokens_per_second"]
                                                  / anchor[k]["tokens_per_second"]) if k in anchor else None,
                            "loraserve_vs_k1": (server[k]["best"]["tokens_per_second"]
                                                / server[1]["best"]["tokens_per_second"]) if 1 in server else None}
                   for k in args.adapters},
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores; {' '.join(m['cpu_flags'])}), torch {m['torch']}, "
          f"transformers {m['transformers']}, peft {m['peft']}, bitsandbytes {m.get('bitsandbytes', '-')}")
    print_table(args, server, anchor, second)
    print(f"\nfull results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
