"""Mixed generation / classification / tagging requests over task adapters: a loraserve server next to stock PEFT.

    python bench/task_bench.py                          # 96 requests, 16 adapters (6 gen, 5 seq_cls, 5 token_cls), NF4
    python bench/task_bench.py --requests 24 --rounds 1 # a quick check

One run: writes random adapters with stock PEFT (rank --rank on the 7 projections, non-zero B, random heads), builds a
seeded workload (a third each: Predict on ~32-token prompts with 32 greedy new tokens, Classify on ~32-token texts,
Tag on ~24-word texts), starts `loraserve serve` on the embedded model and warms it with the workload (every adapter
holds a slot: steady state), then per round:
- loraserve: the mixed workload from --concurrency threads at once (continuous batching), then each kind alone;
- PEFT: one model per kind (CausalLM / SequenceClassification / TokenClassification), all its adapters in one
  PeftModel via load_adapter, set_adapter per request, requests one at a time in arrival order (what per-request
  adapter switching gives), fed the same token ids the server builds (core.tasks.inputs).
The best round per side is kept (noise on a shared machine only slows a round). Correctness: loraserve's labels,
entities and greedy texts against PEFT's, per request. JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # noqa: E402
    REPO,
    ServerProcess,
    load_anchor,
    machine_info,
    make_adapters,
    make_prompts,
    summary,
)

sys.path.insert(0, str(REPO / "tests"))  # the stock-PEFT task adapter maker the tests use
from tiny_models import TAGS, make_peft_task_adapter  # noqa: E402

GEN, CLS, TAG = "generation", "seq_cls", "token_cls"
KINDS = (GEN, CLS, TAG)
CLS_LABELS = 4
LIMIT = 1 << 16  # max_tokens for the input builders: far above any text here, so nothing is cut on either side


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=96, help="requests per workload, a third of each kind")
    p.add_argument("--adapters", type=int, default=16, help="kinds in turn (16: 6 gen, 5 seq_cls, 5 token_cls)")
    p.add_argument("--quantization", choices=["nf4", "fp32"], default="nf4")
    p.add_argument("--concurrency", type=int, default=32, help="client threads (and the server's --max-batch-size)")
    p.add_argument("--rounds", type=int, default=2, help="repeat each measurement; the best round is kept")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32, help="generation prompts and classification texts")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tag-words", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/task_bench-<utc time>.json)")
    a = p.parse_args(argv)
    if a.adapters < 3 or a.requests < 3:
        p.error("--adapters and --requests need at least 3 (one of each kind)")
    return a


def make_all_adapters(model_dir: Path, root: Path, args) -> dict[str, list[str]]:
    kinds = [KINDS[k % 3] for k in range(args.adapters)]
    ids = {GEN: make_adapters(model_dir, root, kinds.count(GEN), args.rank, args.seed), CLS: [], TAG: []}
    for k, kind in enumerate(kinds):
        if kind == GEN:
            continue
        adapter_id = f"bench-{kind}-{len(ids[kind])}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations that PEFT triggers
            make_peft_task_adapter(model_dir, root / adapter_id, kind, seed=args.seed * 1000 + k,
                                   num_labels=CLS_LABELS if kind == CLS else len(TAGS), rank=args.rank)
        if kind == TAG:  # stock PEFT keeps no label names; a tagger's must be BIO tags (as tests/conftest.py does)
            (root / adapter_id / "loraserve_metadata.json").write_text(json.dumps({"task": {"labels": TAGS}}))
        ids[kind].append(adapter_id)
    return ids


def make_workload(tokenizer, adapters: dict, args, rng: random.Random) -> list[dict]:
    """Kinds shuffled with the seed (arrival order); each kind's adapters in turn, so every adapter is used."""
    kinds = [KINDS[i % 3] for i in range(args.requests)]
    rng.shuffle(kinds)
    texts = {GEN: make_prompts(tokenizer, kinds.count(GEN), args.prompt_tokens, rng),
             CLS: make_prompts(tokenizer, kinds.count(CLS), args.prompt_tokens, rng),
             TAG: make_prompts(tokenizer, kinds.count(TAG), args.tag_words, rng)}
    nth = [kinds[:i].count(kind) for i, kind in enumerate(kinds)]  # the request's index within its kind
    return [{"kind": k, "adapter": adapters[k][j % len(adapters[k])], "text": texts[k][j]} for k, j in zip(kinds, nth)]


# --- loraserve: everything in flight at once ------------------------------------------------------

def server_one(client, req: dict, new_tokens: int) -> dict:
    if req["kind"] == GEN:
        c = client.predict(req["text"], adapter_id=req["adapter"], max_new_tokens=new_tokens, temperature=0.0,
                           timeout=1800)
        return {"text": c.text, "generated": c.generated_tokens, "prompt_tokens": c.prompt_tokens}
    if req["kind"] == CLS:
        c = client.classify(req["text"], adapter_id=req["adapter"], timeout=1800)
        return {"label": c.predicted[0], "probability": c.labels[0][1]}
    return {"entities": [[e.label, e.start, e.end] for e in client.tag(req["text"], adapter_id=req["adapter"],
                                                                        timeout=1800)]}


def fire(client, reqs: list[dict], args) -> dict:
    """All requests submitted at once to --concurrency threads; wall = first send to last reply."""
    def one(req):
        start = time.perf_counter()
        out = server_one(client, req, args.new_tokens)
        return {**out, "start": start, "end": time.perf_counter()}

    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, reqs))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"wall_seconds": wall, "requests_per_second": len(reqs) / wall,
            "latency_seconds": summary([r["end"] - r["start"] for r in results]), "results": results}


# --- stock transformers + PEFT: one model per kind, set_adapter per request -----------------------

def load_peft(model_dir: Path, kind: str, quantization: str, adapter_root: Path, ids: list[str]):
    """One stock model of the kind's class with all its adapters, loaded as serve_bench loads its anchor."""
    cls = {GEN: "AutoModelForCausalLM", CLS: "AutoModelForSequenceClassification",
           TAG: "AutoModelForTokenClassification"}[kind]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = {} if kind == GEN else {"num_labels": CLS_LABELS if kind == CLS else len(TAGS)}
    return load_anchor(model_dir, quantization, device, adapter_root, ids, cls, None if kind == GEN else "score",
                       **labels)


def peft_one(models: dict, tokenizer, req: dict, new_tokens: int) -> dict:
    """One request the way a stock PEFT server would serve it, inputs built as loraserve builds them."""
    from loraserve.core.tasks.inputs import classification_ids, tagging_input
    from loraserve.core.tasks.words import split_words, word_spans_to_entities

    model = models[req["kind"]]
    model.set_adapter(req["adapter"])  # switches the LoRA layers and the modules_to_save head
    dev = model.device
    with torch.inference_mode():
        if req["kind"] == GEN:
            enc = tokenizer(req["text"], return_tensors="pt", add_special_tokens=True).to(dev)
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:]
            return {"text": tokenizer.decode(out, skip_special_tokens=True), "generated": len(out)}
        if req["kind"] == CLS:
            ids, _ = classification_ids(tokenizer, req["text"], LIMIT)
            probs = model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().softmax(-1)
            return {"label": model.config.id2label[int(probs.argmax())], "probability": float(probs.max())}
        # A stock PEFT tagger has no "repeat" option, so the server reads the words once: the same input here.
        words = split_words(req["text"])
        inp = tagging_input(tokenizer, [w for w, _, _ in words], False, LIMIT)
        logits = model(input_ids=torch.tensor([inp.input_ids], device=dev)).logits[0]
        best, index = logits[inp.word_tokens].float().softmax(-1).max(-1)
        ents = word_spans_to_entities(words, [TAGS[i] for i in index.tolist()], best.tolist(), req["text"])
        return {"entities": [[e.label, e.start, e.end] for e in ents]}


def run_peft(models, tokenizer, reqs: list[dict], args) -> dict:
    results = []
    start = time.perf_counter()
    for req in reqs:  # one at a time, in arrival order
        t0 = time.perf_counter()
        results.append({**peft_one(models, tokenizer, req, args.new_tokens), "seconds": time.perf_counter() - t0})
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "requests_per_second": len(reqs) / wall, "results": results,
            "latency_seconds": summary([r["seconds"] for r in results])}  # service time, no queueing


# --- report ---------------------------------------------------------------------------------------

def compare(reqs, server: dict, peft: dict) -> dict:
    """Per kind: requests whose answers agree (greedy text, top label, entity spans and labels)."""
    key = {GEN: "text", CLS: "label", TAG: "entities"}
    out = {k: {"same": 0, "of": 0} for k in KINDS}
    out[CLS]["max_probability_diff"] = 0.0
    for req, s, p in zip(reqs, server["results"], peft["results"]):
        c = out[req["kind"]]
        c["of"] += 1
        c["same"] += s[key[req["kind"]]] == p[key[req["kind"]]]
        if req["kind"] == CLS:
            c["max_probability_diff"] = max(c["max_probability_diff"], abs(s["probability"] - p["probability"]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the server is stopped, temp files removed
    from loraserve.client import Client
    from loraserve.core.model.load import ensure_embedded_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized score.weight": the adapters bring their own heads
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or REPO / "bench" / "results" / f"task_bench-{stamp:%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="task-bench-") as tmp:
        root = Path(tmp) / "adapters"
        adapters = make_all_adapters(model_dir, root, args)
        reqs = make_workload(tokenizer, adapters, args, rng)
        by_kind = {k: [r for r in reqs if r["kind"] == k] for k in KINDS}
        # serve_bench's server process; its --max-batch-size is `requests`, here the concurrency.
        opts = Namespace(port=0, quantization=args.quantization, rank=args.rank, requests=args.concurrency,
                         new_tokens=args.new_tokens, model=None, device=None)
        with contextlib.ExitStack() as stack:
            proc = stack.enter_context(ServerProcess(opts, root, args.adapters, out.with_suffix(".server.log"),
                                                     "static"))
            client = stack.enter_context(Client(f"127.0.0.1:{proc.port}"))
            fire(client, reqs, args)  # warm-up: every adapter loaded into a device slot
            print("server warm; loading PEFT", file=sys.stderr)
            models = {k: load_peft(model_dir, k, args.quantization, root, adapters[k]) for k in KINDS}
            for k in KINDS:  # warm-up: first-call allocations, one request per kind
                peft_one(models, tokenizer, by_kind[k][0], args.new_tokens)
            rounds = []
            for r in range(args.rounds):  # loraserve then PEFT in each round: a slow spell hits both
                s = fire(client, reqs, args)
                alone = {k: fire(client, by_kind[k], args) for k in KINDS}
                p = run_peft(models, tokenizer, reqs, args)
                rounds.append({"loraserve": s, "loraserve_alone": alone, "peft": p})
                print(f"round {r}: loraserve {s['requests_per_second']:.2f} req/s, PEFT "
                      f"{p['requests_per_second']:.2f} req/s", file=sys.stderr)
    best_s = max((x["loraserve"] for x in rounds), key=lambda x: x["requests_per_second"])
    best_p = max((x["peft"] for x in rounds), key=lambda x: x["requests_per_second"])
    per_kind = {}
    for k in KINDS:
        s_rps = max(x["loraserve_alone"][k]["requests_per_second"] for x in rounds)
        # PEFT serves one at a time, so a kind alone takes the sum of its requests' service times.
        p_rps = max(len(by_kind[k]) / sum(res["seconds"] for req, res in zip(reqs, x["peft"]["results"])
                                          if req["kind"] == k) for x in rounds)
        per_kind[k] = {"requests": len(by_kind[k]), "loraserve_rps": s_rps, "peft_rps": p_rps, "ratio": s_rps / p_rps}
    match = compare(reqs, best_s, best_p)
    gen = [(req, res) for req, res in zip(reqs, best_s["results"]) if req["kind"] == GEN]
    bad_prompts = sum(res["prompt_tokens"] != args.prompt_tokens for _, res in gen)
    tokens = {"loraserve": sum(res["generated"] for _, res in gen),
              "peft": sum(res["generated"] for req, res in zip(reqs, best_p["results"]) if req["kind"] == GEN)}
    results = {
        "date": stamp.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
        "machine": {**machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {**vars(args), "model": str(model_dir), "kept_round": "best", "adapters_by_kind": adapters},
        "workload": reqs, "rounds": rounds, "per_kind": per_kind, "match": match, "generated_tokens": tokens,
        "server_prompt_token_mismatches": bad_prompts,
        "ratio": best_s["requests_per_second"] / best_p["requests_per_second"],
    }
    out.write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}, bitsandbytes {m.get('bitsandbytes', '-')}; load {load_before[0]:.1f} before")
    if bad_prompts:
        print(f"warning: the server counted {bad_prompts} generation prompt(s) not of {args.prompt_tokens} tokens")
    print(f"generated tokens: loraserve {tokens['loraserve']}, PEFT {tokens['peft']} (both stop on EOS)")
    print(f"full results: {out}")
    mix = ", ".join(f"{len(v)} {k}" for k, v in adapters.items())
    print(f"\n{args.requests} requests over {args.adapters} adapters ({mix}), {args.quantization}, rank {args.rank}, "
          f"{args.concurrency} threads, best of {args.rounds} round(s)")
    print(f"ratio loraserve / PEFT: mixed {results['ratio']:.2f}x; "
          + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in per_kind.items()))
    head = f"{'workload':<11} {'n':>4} {'loraserve req/s':>16} {'PEFT req/s':>11} {'ratio':>7} {'same answer':>12}"
    print(head + "\n" + "-" * len(head))
    print(f"{'mixed':<11} {args.requests:>4} {best_s['requests_per_second']:>16.2f} "
          f"{best_p['requests_per_second']:>11.2f} {results['ratio']:>6.2f}x "
          f"{sum(c['same'] for c in match.values()):>8}/{args.requests}")
    for k, v in per_kind.items():
        print(f"{k:<11} {v['requests']:>4} {v['loraserve_rps']:>16.2f} {v['peft_rps']:>11.2f} {v['ratio']:>6.2f}x "
              f"{match[k]['same']:>8}/{match[k]['of']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
