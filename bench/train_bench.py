"""Training on a serving loraserve server: throughput against transformers Trainer + PEFT, and what a
running job costs the inference latency of a steady load.

    python bench/train_bench.py --out train_bench.json                # CPU: embedded SmolLM2-135M, fp32
    python bench/train_bench.py --quantization nf4 --steps 100 --clients 16 --out train_bench.json  # CUDA

What it does, in one run:
1. builds a deterministic data set (reverse the order of some words) and tokenizes it the trainer's way;
2. starts `python -m loraserve.server.cli serve` and runs a Train job of --steps optimizer steps on it alone:
   its tokens/s is the job's own (non-padding tokens trained on / wall time of the run); then, with the
   server idle, trains the same base (loaded by the same loader, same quantization) with transformers
   Trainer + PEFT LoRA on the same tokenized examples, batch size and settings, counting the non-padding
   tokens of every training forward pass. The two take turns for --rounds rounds; the best of each counts;
3. on the same server, a steady inference load (--clients PredictStream calls back to back, greedy,
   --new-tokens each) for --seconds without a job, then with a job training (twice, see below; each
   cancelled after its phase), then without one again; the gaps between streamed tokens give the inter-token latency
   (ITL). The two runs without a job are pooled, so that a slow spell of a shared machine hits both sides;
4. prints a table, ratios last, and writes everything (every round too) to --out.

The job and the engine take turns on the device, and while requests are in flight a job keeps to the
server's --training-share of device time (server/training/pacing.py): most decode steps run while the
job waits, and no gap between two tokens exceeds a decode step plus one training micro-batch (forward +
backward of --batch-size examples). So the job runs twice under load: with micro-batches of
--batch-size examples, and with the same optimizer step taken as --batch-size micro-batches of one
(gradient accumulation), which shortens that worst gap. "job s/micro-batch" is the job's wall time per
micro-batch under the load, its waits for the device included.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients" / "python"))  # the typed client, even without an install
sys.path.insert(0, str(REPO))

READY_RE = re.compile(r"serving .* on port (\d+)")
WORDS = ("apple river stone cloud maple ember harbor violet copper meadow lantern falcon willow quartz "
         "thunder saffron pebble orchid glacier cinder").split()
PROMPTS = ["Write a short poem about the sea.", "Explain what a compiler does.", "List three uses of copper.",
           "Describe a walk in the forest.", "What makes a good cup of tea?", "Tell me about the moon."]


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=["nf4", "bf16", "fp32"], default="nf4" if cuda else "fp32",
                   help="base weights (default: nf4 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of each throughput run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--clients", type=int, default=4, help="concurrent PredictStream calls of the steady load")
    p.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of each load request")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each latency phase")
    p.add_argument("--training-share", type=float, default=None,
                   help="the server's --training-share (default: the server's own)")
    p.add_argument("--rounds", type=int, default=2,
                   help="throughput runs of each side, taking turns; the best of each is kept (on a shared "
                        "machine noise only ever slows a run down)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the full results as JSON here")
    return p.parse_args(argv)


def make_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        out.append({"prompt": "Reverse the order of these words: " + " ".join(words),
                    "completion": " ".join(reversed(words))})
    return out


def settings_of(args, max_steps: int) -> dict:
    # bf16 autocast applies on CUDA only; both sides below follow the same rule.
    return {"rank": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.05, "learning_rate": args.learning_rate,
            "max_steps": max_steps, "batch_size": args.batch_size, "eval_fraction": 0.0, "max_length": 256,
            "warmup_ratio": 0.03, "lr_scheduler": "linear", "seed": args.seed}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    x = (len(s) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def latency_summary(gaps: list[float], tokens: int, seconds: float) -> dict:
    return {"itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p90_ms": 1e3 * percentile(gaps, 90),
            "itl_p99_ms": 1e3 * percentile(gaps, 99), "itl_max_ms": 1e3 * max(gaps), "samples": len(gaps),
            "tokens": tokens, "tokens_per_second": tokens / seconds}


# --- the server under test ----------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without cleaning up."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """`loraserve serve` as a subprocess (its own GIL, as in production); always stopped on exit."""

    def __init__(self, args, adapter_root: Path, log_path: Path):
        self.cmd = [sys.executable, "-m", "loraserve.server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--metrics-port", "-1", "--adapter-root", str(adapter_root), "--quantization", args.quantization,
                    "--max-lora-rank", str(args.rank), "--max-batch-size", str(max(8, args.clients)),
                    "--grace-seconds", "2"]
        self.cmd += ["--model", args.model] if args.model else []
        self.cmd += ["--training-share", str(args.training_share)] if args.training_share else []
        self.cmd += ["--device", args.device] if args.device else []
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "ServerProcess":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=_die_with_parent)
        ready = threading.Event()

        def pump():  # drain stderr into the log so the server never blocks on a full pipe
            with open(self.log_path, "w") as log:
                for line in self.proc.stderr:
                    log.write(line)
                    log.flush()
                    match = READY_RE.search(line)
                    if match and self.port is None:
                        self.port = int(match.group(1))
                        ready.set()
            ready.set()  # the process ended: unblock the wait below

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout=600) or self.port is None:
            self.__exit__()
            raise RuntimeError(f"the server did not start; see {self.log_path}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def train_job(client, adapter_id: str, examples, settings) -> dict:
    from loraserve.training import Completed

    events = list(client.train(adapter_id, examples=examples, settings=settings))
    done = events[-1].kind
    if not isinstance(done, Completed):
        raise RuntimeError(f"the Train job did not complete: {done}")
    return {"tokens": done.metrics.tokens, "seconds": done.metrics.seconds,
            "tokens_per_second": done.metrics.tokens_per_second, "steps": done.metrics.steps,
            "train_loss": done.metrics.train_loss}


def steady_load(client, args, seconds: float) -> dict:
    """--clients streams back to back for `seconds`; the gaps between consecutive streamed tokens."""
    stop = threading.Event()
    gaps: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def worker(i: int):
        n = i
        while not stop.is_set():
            last, mine, count = None, [], 0
            for chunk in client.stream(PROMPTS[n % len(PROMPTS)], max_new_tokens=args.new_tokens, timeout=600):
                if chunk.completion is not None:
                    count = chunk.completion.generated_tokens
                if not chunk.text:
                    continue
                now = time.perf_counter()
                if last is not None:
                    mine.append(now - last)
                last = now
            with lock:
                gaps.extend(mine)
                tokens[0] += count
            n += args.clients

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return latency_summary(gaps, tokens[0], time.perf_counter() - start) | {"gaps": gaps}


def load_with_job(client, args, examples, settings: dict, adapter_id: str) -> dict:
    """The steady load while a job trains (started first, cancelled after); the job's pace meanwhile."""
    from loraserve.training import Progress

    progress: list[tuple[float, int]] = []
    job: list[str] = []
    started = threading.Event()
    stream = client.train(adapter_id, examples=examples, settings={**settings, "max_steps": 10_000_000})

    def follow():
        for event in stream:
            job[:] = [event.job_id]
            if isinstance(event.kind, Progress):
                progress.append((time.perf_counter(), event.kind.step))
                started.set()
        started.set()  # the stream ended early: the job failed; the load below still runs

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    started.wait()  # at the job's first step, so that its start-up is not in the numbers
    out = steady_load(client, args, args.seconds)
    t1 = time.perf_counter()
    state = client.get_training_job(job[0]).state
    client.cancel_training_job(job[0])
    follower.join()
    if state != "running":
        raise RuntimeError(f"the job under load was {state}, not running, at the end of the phase")
    # From the step that ended just before the load began (it released the wait) to the last one within it.
    steps = [(t, s) for t, s in progress if t <= t1]
    per_step = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1]) if len(steps) >= 2 else None
    micro = settings.get("gradient_accumulation_steps", 1)
    return out | {"job_steps": steps[-1][1] - steps[0][1] if steps else 0, "seconds_per_step": per_step,
                  "seconds_per_micro_batch": per_step / micro if per_step else None,
                  "micro_batch": settings["batch_size"], "gradient_accumulation_steps": micro}


def bench_server(args, examples, adapter_root: Path, hf_dir: Path, log_path: Path) -> dict:
    from loraserve.client import Client

    variants = {  # the same optimizer step, taken whole or in micro-batches of one example
        f"micro-batch {args.batch_size}": settings_of(args, 0),
        f"micro-batch 1 x {args.batch_size} accumulation": {**settings_of(args, 0), "batch_size": 1,
                                                             "gradient_accumulation_steps": args.batch_size},
    }
    with ServerProcess(args, adapter_root, log_path) as server, Client(f"127.0.0.1:{server.port}") as client:
        steady_load(client, args, 2.0)  # warm-up: first compilations and allocations
        rounds = []
        for r in range(args.rounds):
            rounds.append({"loraserve": train_job(client, f"bench-alone-{r}", examples, settings_of(args, args.steps)),
                           "transformers_trainer_peft": bench_hf_trainer(args, examples, hf_dir / str(r))})
        before = steady_load(client, args, args.seconds)
        during = {name: load_with_job(client, args, examples, settings, f"bench-load-{i}")
                  for i, (name, settings) in enumerate(variants.items())}
        after = steady_load(client, args, args.seconds)

    without = latency_summary(before["gaps"] + after["gaps"], before["tokens"] + after["tokens"], 2 * args.seconds)
    for phase in (before, after, *during.values()):
        del phase["gaps"]
    best = {side: max((r[side] for r in rounds), key=lambda run: run["tokens_per_second"]) for side in rounds[0]}
    return {"train_alone": best["loraserve"], "transformers_trainer_peft": best["transformers_trainer_peft"],
            "throughput_rounds": rounds, "serving_without_job": without, "serving_with_job": during,
            "phases_without_job": {"before": before, "after": after}}


# --- the anchor: transformers Trainer + PEFT ----------------------------------------------------

def bench_hf_trainer(args, examples, out_dir: Path) -> dict:
    from loraserve.core.lora.layer import DEFAULT_TARGETS
    from loraserve.trainer.data import collate, parse_records, prepare
    from loraserve.trainer.settings import TrainSettings
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = load_base(args)
    settings = TrainSettings.from_dict(settings_of(args, args.steps))
    data = prepare(parse_records(examples), base.tokenizer, settings, base.eos_token_ids)
    model = get_peft_model(base.model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                  lora_dropout=settings.dropout, target_modules=list(DEFAULT_TARGETS),
                                                  task_type="CAUSAL_LM"))
    tokens = [0]

    def count(module, a, kwargs):
        if module.training:
            tokens[0] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    cuda = base.device.type == "cuda"
    training_args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=settings.batch_size, max_steps=settings.max_steps,
        learning_rate=settings.learning_rate, lr_scheduler_type="linear",
        warmup_steps=math.ceil(settings.warmup_ratio * settings.max_steps),  # the trainer's rounding
        weight_decay=0.0, max_grad_norm=settings.max_grad_norm, optim="adamw_torch", seed=settings.seed,
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, bf16=cuda and settings.bf16, use_cpu=not cuda)
    trainer = Trainer(model=model, args=training_args, train_dataset=data.train,
                      data_collator=lambda batch: collate(batch, pad))
    metrics = trainer.train().metrics
    seconds = metrics["train_runtime"]
    del trainer, model, base  # the server beside it keeps running: give the memory back now
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"tokens": tokens[0], "seconds": seconds, "tokens_per_second": tokens[0] / seconds,
            "steps": settings.max_steps, "train_loss": metrics.get("train_loss")}


def load_base(args):
    from loraserve.core.model.config import ModelConfig
    from loraserve.core.model.load import load_base as load

    return load(ModelConfig(path=args.model, quantization=args.quantization, device=args.device))


# --- report -------------------------------------------------------------------------------------

def table(results: dict) -> str:
    s, hf, cfg = results["loraserve"], results["transformers_trainer_peft"], results["config"]
    without = s["serving_without_job"]
    rows = [
        f"{cfg['model']} {cfg['quantization']} on {cfg['device']}: {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"rank {cfg['rank']}; load: {cfg['clients']} streams x {cfg['new_tokens']} tokens, {cfg['seconds']:.0f} s",
        "",
        f"{'training throughput':48}{'tokens/s':>12}",
        f"{'  loraserve Train job (server, no load)':48}{s['train_alone']['tokens_per_second']:12.1f}",
        f"{'  transformers Trainer + PEFT':48}{hf['tokens_per_second']:12.1f}",
        "",
        f"{'serving (steady PredictStream load)':48}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'tokens/s':>10}"
        f"{'job s/micro-batch':>19}",
        f"{'  no training job':48}{without['itl_p50_ms']:12.1f}{without['itl_p99_ms']:12.1f}"
        f"{without['tokens_per_second']:10.1f}",
    ]
    for name, phase in s["serving_with_job"].items():
        micro = phase["seconds_per_micro_batch"]
        rows.append(f"{'  a job training, ' + name:48}{phase['itl_p50_ms']:12.1f}{phase['itl_p99_ms']:12.1f}"
                    f"{phase['tokens_per_second']:10.1f}{micro if micro is not None else float('nan'):19.3f}")
    rows += ["", "ratios"]
    rows += [f"  {name}: {value:.2f}" for name, value in results["ratios"].items()]
    return "\n".join(rows)


def ratios(server: dict, hf: dict) -> dict:
    without = server["serving_without_job"]
    out = {"training tokens/s, loraserve job / Trainer+PEFT":
           server["train_alone"]["tokens_per_second"] / hf["tokens_per_second"]}
    for name, phase in server["serving_with_job"].items():
        out[f"ITL p50, job ({name}) / no job"] = phase["itl_p50_ms"] / without["itl_p50_ms"]
        out[f"ITL p99, job ({name}) / no job"] = phase["itl_p99_ms"] / without["itl_p99_ms"]
        out[f"served tokens/s, job ({name}) / no job"] = phase["tokens_per_second"] / without["tokens_per_second"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the server is stopped, temp files go
    from loraserve.core.model.load import EMBEDDED_NAME

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_before = os.getloadavg()
    examples = make_examples(args.examples, args.seed)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        log_path = Path(args.out).with_suffix(".server.log") if args.out else tmp / "server.log"
        server = bench_server(args, examples, tmp / "adapters", tmp / "hf", log_path)
        hf = server.pop("transformers_trainer_peft")
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "config": {**vars(args), "model": args.model or EMBEDDED_NAME, "device": str(device)},
        "loraserve": server,
        "transformers_trainer_peft": hf,
        "ratios": ratios(server, hf),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
