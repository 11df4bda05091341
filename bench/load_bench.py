"""Reliability under load: a real `loraserve serve` process on the embedded model, many client threads, mixed
adapters, cancels and deadlines; counts what did not end well and watches the server's memory.

    python bench/load_bench.py                              # 10,000 requests from 64 threads (tens of minutes on a CPU)
    python bench/load_bench.py --requests 300 --clients 16  # a short run

What it does:
1. writes --adapters random rank---rank LoRA adapters (PEFT format, all 7 projections) into a temp root;
2. starts `python -m loraserve.server.cli serve` (embedded SmolLM2-135M, NF4 unless told otherwise) and warms
   it up (every adapter once, then one full wave of --clients requests), then reads the server's RSS;
3. sends --requests PredictStream calls from --clients threads over --channels connections. Each names a
   random adapter (or the base), asks for 1..--new-tokens tokens and carries a deadline: --deadline-fraction
   of them a short random one (uniform in --short-deadline), the rest --bound seconds. --cancel-fraction are
   cancelled by the client after their first chunk;
4. records per call: the status code, whether an OK stream carried its final message, the latency and the
   time to first token (first chunk, on the client); samples the server's RSS every second;
5. stops the server (SIGTERM: it must drain and exit 0), prints a table and writes JSON to --out.

Reported: lost (a call with no final status, or an OK stream without its final message), hung (a call
that took longer than --bound + 10 s), counts by status, INTERNAL/UNKNOWN count, p50/p99 latency and TTFT
(OK calls), RSS after warm-up and at the end, and the growth in percent (target: under 5%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc
from loraserve.v1 import inference_pb2, inference_pb2_grpc
from serve_bench import (
    REPO,
    ServerProcess,
    machine_info,
    make_adapters,
    make_prompts,
    summary,
)

BAD = {"INTERNAL", "UNKNOWN"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=["nf4", "bf16", "fp32"], default="nf4")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=64, help="client threads")
    p.add_argument("--channels", type=int, default=8, help="gRPC connections the threads share")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=12, help="each request asks for 1..this many tokens")
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--deadline-fraction", type=float, default=0.1, help="share of calls with a short deadline")
    p.add_argument("--short-deadline", default="0.05,3", help="range of the short deadlines, seconds")
    p.add_argument("--bound", type=float, default=300.0, help="deadline of the other calls; hung = over this + 10 s")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "load_bench.json"))
    a = p.parse_args(argv)
    a.short_deadline = tuple(float(x) for x in a.short_deadline.split(","))
    a.port = 0
    return a


class LoadServer(ServerProcess):
    """serve_bench's server process with this bench's settings."""

    def __init__(self, args, adapter_root: Path, log_path: Path):
        super().__init__(args, adapter_root, args.adapters, log_path, "static")
        self.cmd = [sys.executable, "-m", "loraserve.server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--metrics-port", "-1", "--adapter-root", str(adapter_root), "--quantization", args.quantization,
                    "--max-gpu-adapters", str(args.adapters), "--max-lora-rank", str(args.rank),
                    "--max-batch-size", str(args.max_batch_size), "--max-new-tokens", str(args.new_tokens),
                    "--grace-seconds", "10"]
        if args.model:
            self.cmd += ["--model", args.model]
        if args.device:
            self.cmd += ["--device", args.device]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Plan:
    adapter_id: str
    prompt: str
    new_tokens: int
    deadline: float
    cancel: bool
    short_deadline: bool


@dataclass
class Result:
    code: str
    final: bool
    seconds: float
    ttft: float | None
    cancel: bool
    short_deadline: bool


def make_plans(args, adapter_ids: list[str], prompts: list[str], rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(args.requests):
        short = rng.random() < args.deadline_fraction
        plans.append(Plan(rng.choice(["", *adapter_ids]), rng.choice(prompts), rng.randint(1, args.new_tokens),
                          rng.uniform(*args.short_deadline) if short else args.bound,
                          rng.random() < args.cancel_fraction, short))
    return plans


def run_one(stub, plan: Plan) -> Result:
    request = inference_pb2.PredictStreamRequest(prompt=plan.prompt, adapter_id=plan.adapter_id,
                                                 sampling=inference_pb2.SamplingParams(max_new_tokens=plan.new_tokens))
    start = time.perf_counter()
    ttft, final = None, False
    call = stub.PredictStream(request, timeout=plan.deadline)
    try:
        for reply in call:
            if ttft is None:
                ttft = time.perf_counter() - start
            final = final or bool(reply.finish_reason)
            if plan.cancel:
                call.cancel()
                break
    except grpc.RpcError:
        pass
    code = call.code()  # waits for the call's status: a call that never gets one shows up as hung here
    return Result(code.name, final, time.perf_counter() - start, ttft, plan.cancel, plan.short_deadline)


def fire(args, channels, plans: list[Plan], progress: bool) -> list[Result]:
    stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
    done = Counter()
    lock = threading.Lock()
    start = time.monotonic()

    def one(i: int) -> Result:
        r = run_one(stubs[i % len(stubs)], plans[i])
        with lock:
            done["n"] += 1
            n = done["n"]
        if progress and n % 500 == 0:
            print(f"{n}/{len(plans)} calls, {time.monotonic() - start:.0f} s", file=sys.stderr)
        return r

    with ThreadPoolExecutor(args.clients) as pool:
        return list(pool.map(one, range(len(plans))))


class RssSampler:
    """The server's RSS once a second, on a thread, until stopped."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        while not self._stop.wait(1.0):
            self.samples.append((round(time.monotonic() - start, 1), rss_bytes(self.pid)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def report(args, results: list[Result], wall: float, rss_start: int, rss_end: int, rss_max: int,
           exit_code: int | None) -> dict:
    codes = Counter(r.code for r in results)
    ok = [r for r in results if r.code == "OK"]
    lost = sum(1 for r in ok if not r.final and not r.cancel)
    hung = sum(1 for r in results if r.seconds > args.bound + 10)
    return {
        "calls": len(results), "wall_seconds": wall, "calls_per_second": len(results) / wall,
        "status_counts": dict(codes.most_common()), "internal_or_unknown": sum(codes[c] for c in BAD),
        "lost": lost, "hung": hung,
        "latency_seconds_ok": summary([r.seconds for r in ok]) if ok else None,
        "ttft_seconds_ok": summary([r.ttft for r in ok if r.ttft is not None]) if ok else None,
        "cancelled_by_client": sum(r.cancel for r in results),
        "cancelled_but_ok": sum(1 for r in results if r.cancel and r.code == "OK"),
        "short_deadline": sum(r.short_deadline for r in results),
        "deadline_exceeded_without_short_deadline": sum(1 for r in results if r.code == "DEADLINE_EXCEEDED"
                                                        and not r.short_deadline),
        "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_max_bytes": rss_max,
        "rss_growth_percent": 100.0 * (rss_end - rss_start) / rss_start,
        "server_exit_code": exit_code,
    }


def print_table(args, s: dict) -> None:
    mib = 1 << 20
    lat, ttft = s["latency_seconds_ok"] or {}, s["ttft_seconds_ok"] or {}
    rows = [
        ("calls / clients", f"{s['calls']} / {args.clients} threads, {args.channels} connections"),
        ("wall / rate", f"{s['wall_seconds']:.0f} s / {s['calls_per_second']:.1f} calls/s"),
        ("status counts", ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())),
        ("INTERNAL + UNKNOWN", s["internal_or_unknown"]),
        ("lost / hung", f"{s['lost']} / {s['hung']}"),
        ("latency p50 / p99 (OK)", f"{lat.get('p50', float('nan')):.2f} / {lat.get('p99', float('nan')):.2f} s"),
        ("TTFT p50 / p99 (OK)", f"{ttft.get('p50', float('nan')):.2f} / {ttft.get('p99', float('nan')):.2f} s"),
        ("RSS after warm-up / end", f"{s['rss_start_bytes'] / mib:.0f} / {s['rss_end_bytes'] / mib:.0f} MiB "
                                    f"(max {s['rss_max_bytes'] / mib:.0f})"),
        ("RSS growth", f"{s['rss_growth_percent']:+.1f}% (target < 5%)"),
        ("server exit code (SIGTERM)", s["server_exit_code"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer

    load_before = os.getloadavg()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        root = Path(tmp) / "adapters"
        adapter_ids = make_adapters(model_dir, root, args.adapters, args.rank, args.seed)
        prompts = make_prompts(tokenizer, 32, args.prompt_tokens, rng)
        plans = make_plans(args, adapter_ids, prompts, rng)
        with LoadServer(args, root, out.with_suffix(".server.log")) as server:
            channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(args.channels)]
            warm = [Plan(a, prompts[0], args.new_tokens, args.bound, False, False) for a in ["", *adapter_ids]]
            warm += [Plan(rng.choice(["", *adapter_ids]), rng.choice(prompts), args.new_tokens, args.bound, False,
                          False) for _ in range(args.clients)]
            fire(args, channels, warm[: len(adapter_ids) + 1], progress=False)  # every adapter into its slot
            fire(args, channels, warm[len(adapter_ids) + 1:], progress=False)  # one full wave: peak allocations
            time.sleep(2)
            rss_start = rss_bytes(server.proc.pid)
            print(f"warm; server RSS {rss_start >> 20} MiB; {len(plans)} calls from {args.clients} threads",
                  file=sys.stderr)
            with RssSampler(server.proc.pid) as sampler:
                start = time.monotonic()
                results = fire(args, channels, plans, progress=True)
                wall = time.monotonic() - start
                time.sleep(3)  # let cancelled rows and freed buffers settle before the last reading
            rss_end = rss_bytes(server.proc.pid)
            for c in channels:
                c.close()
            server.proc.terminate()  # SIGTERM: drains (nothing in flight) and must exit 0
            try:
                exit_code = server.proc.wait(timeout=60)
            except Exception:
                exit_code = None
    rss_max = max([rss_end, rss_start, *(b for _, b in sampler.samples)])
    summary_ = report(args, results, wall, rss_start, rss_end, rss_max, exit_code)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": {**machine_info(device), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "grpcio": grpc.__version__},
        "settings": {**vars(args), "model": str(model_dir)},
        "summary": summary_,
        "rss_samples": sampler.samples,
        "calls": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(doc, indent=1))
    m = doc["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, transformers {m['transformers']}, "
          f"bitsandbytes {m.get('bitsandbytes', '-')}, grpcio {m['grpcio']}; {args.quantization}; full results: {out}")
    print_table(args, summary_)
    bad = summary_["lost"] or summary_["hung"] or summary_["internal_or_unknown"] or exit_code != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
