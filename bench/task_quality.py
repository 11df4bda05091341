"""Held-out quality of task adapters: loraserve's trainer on its default settings against the stock PEFT recipe.

    python bench/task_quality.py                                  # sentiment + entities, 2000 training examples, NF4
    python bench/task_quality.py --tasks sentiment --train 256 --test 100   # a quick check
    python bench/task_quality.py --tasks topics --sides loraserve          # one side only

Data comes from trainer/synthetic.py: train on the train split (seed 1), score on the test split (seed 2:
other names, places, organisations and sentence templates). For each task, in one run:
- loraserve: `loraserve serve` on the embedded model; a Train RPC with only {"task": kind} as settings (every
  other setting its default: rank 8, 3 epochs, batch 4, lr 2e-4, head lr 2e-3, 10% held out for the
  best checkpoint, words read twice for tagging); the new adapter is then scored through Classify / Tag,
  the way a user sees it;
- PEFT: the stock QLoRA recipe of the Transformers / PEFT tutorials, in this process while the server is
  idle: AutoModelFor{Sequence,Token}Classification on the same base and quantization, LoraConfig(task_type,
  r=16, alpha=32, dropout 0.05, the 7 projections; the head in modules_to_save), transformers Trainer for
  1 epoch, batch 16, lr 2e-4 (linear decay, no warmup); tagging tokenizes the words with
  is_split_into_words and labels each word's first sub-token, as the tutorial does; scored on the same
  held-out examples (tagging: the same words the server splits the text into).
Both sides are scored by the same functions (trainer.task_metrics: accuracy and F1 per class, entity
F1 with seqeval's definition). Prints a table last; JSON goes to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import REPO, ServerProcess, machine_info  # noqa: E402

TASKS = {  # name: (generator, task kind, held-out examples by default)
    "sentiment": ("sentiment", "seq_cls", 300),
    "topics": ("topics", "seq_cls", 300),
    "entities": ("entities", "token_cls", 600),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sentiment,entities", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--sides", default="loraserve,peft", help="loraserve, peft or both")
    p.add_argument("--train", type=int, default=2000, help="training examples per task")
    p.add_argument("--test", type=int, default=0, help="held-out examples per task (0: 300, entities 600)")
    p.add_argument("--quantization", choices=["nf4", "fp32"], default="nf4")
    p.add_argument("--peft-rank", type=int, default=16)
    p.add_argument("--peft-epochs", type=float, default=1.0)
    p.add_argument("--peft-batch-size", type=int, default=16)
    p.add_argument("--peft-learning-rate", type=float, default=2e-4)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/task_quality-<utc time>.json)")
    a = p.parse_args(argv)
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    a.sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not a.tasks or any(t not in TASKS for t in a.tasks):
        p.error(f"--tasks: choose from {', '.join(TASKS)}")
    if not a.sides or any(s not in ("loraserve", "peft") for s in a.sides):
        p.error("--sides: loraserve, peft or both")
    return a


def datasets(name: str, args) -> tuple[list[dict], list[dict]]:
    from loraserve.trainer import synthetic

    make = getattr(synthetic, TASKS[name][0])
    n_test = args.test or TASKS[name][2]
    if name == "entities":  # CoNLL-style words to train on; the test as text, the way a client sends it
        return make(args.train, 1, "train"), make(n_test, 2, "test", format="text")
    return make(args.train, 1, "train"), make(n_test, 2, "test")


def gold(name: str, test: list[dict]):
    """What the held-out examples say, in the form score() compares."""
    from loraserve.core.tasks.words import entities_to_word_tags

    if name == "entities":
        return [entities_to_word_tags(t["text"], t["entities"]) for t in test]  # (words, tags) per sentence
    return [t["labels"] if "labels" in t else [t["label"]] for t in test]


def score(name: str, labels: list[str], truth, predicted) -> dict:
    from loraserve.trainer.task_metrics import classification_metrics, entity_metrics, multilabel_metrics

    if name == "entities":
        m = entity_metrics([tags for _, tags in truth], predicted)
        return {"entity_f1": m["f1"], "entity_precision": m["precision"], "entity_recall": m["recall"]}
    if name == "topics":
        m = multilabel_metrics([[int(x in t) for x in labels] for t in truth],
                               [[int(x in p) for x in labels] for p in predicted], labels)
        return {"micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "subset_accuracy": m["subset_accuracy"]}
    m = classification_metrics([labels.index(t[0]) for t in truth], [labels.index(p[0]) for p in predicted], labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def label_names(name: str, train: list[dict]) -> list[str]:
    if name == "entities":
        types = sorted({t[2:] for e in train for t in e["tags"] if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    return sorted({x for e in train for x in (e["labels"] if "labels" in e else [e["label"]])})


# ---------------------------------------------------------------- loraserve

def run_loraserve(client, name: str, train: list[dict], test: list[dict], truth, labels) -> dict:
    from loraserve.core.tasks.words import entities_to_word_tags
    from loraserve.training import Completed, Evaluation

    kind = TASKS[name][1]
    adapter_id = f"quality-{name}"
    start = time.perf_counter()
    events = list(client.train(adapter_id, examples=train, settings={"task": kind}, overwrite=True, timeout=6 * 3600))
    seconds = time.perf_counter() - start
    done = events[-1].kind
    if not isinstance(done, Completed):
        raise RuntimeError(f"{name}: the Train job did not complete: {done}")
    evals = [{"step": e.kind.step, **e.kind.metrics} for e in events if isinstance(e.kind, Evaluation)]
    print(f"{name}: loraserve trained in {seconds:.0f} s; scoring {len(test)} held-out examples", file=sys.stderr)
    with ThreadPoolExecutor(16) as pool:  # one batch of many rows, as a server sees them
        if name == "entities":
            got = list(pool.map(lambda t: client.tag(t["text"], adapter_id=adapter_id, timeout=600), test))
            predicted = [entities_to_word_tags(t["text"], [{"start": e.start, "end": e.end, "label": e.label}
                                                           for e in ents])[1] for t, ents in zip(test, got)]
        else:
            predicted = [c.predicted for c in pool.map(
                lambda t: client.classify(t["text"], adapter_id=adapter_id, timeout=600), test)]
    m = done.metrics
    return {"scores": score(name, labels, truth, predicted), "train_seconds": seconds, "steps": m.steps,
            "trained_tokens": m.tokens, "tokens_per_second": m.tokens_per_second, "evaluations": evals,
            "settings": {"task": kind, "everything else": "TrainSettings defaults"}}


# ---------------------------------------------------------------- stock PEFT

def load_stock(model_dir: Path, name: str, labels: list[str], args, device: torch.device):
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    kind = TASKS[name][1]
    cls = transformers.AutoModelForTokenClassification if kind == "token_cls" \
        else transformers.AutoModelForSequenceClassification
    kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}
    if name == "topics":
        kw["problem_type"] = "multi_label_classification"
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quantization == "nf4":
        kw.update(quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["score"]), device_map={"": device})
    model = cls.from_pretrained(model_dir, dtype=compute, **kw)
    if args.quantization == "nf4":
        # The QLoRA recipe; gradient checkpointing off (it changes speed, not results).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    config = LoraConfig(task_type="TOKEN_CLS" if kind == "token_cls" else "SEQ_CLS", r=args.peft_rank,
                        lora_alpha=2 * args.peft_rank, lora_dropout=0.05, target_modules=TARGETS,
                        modules_to_save=["score"])
    return get_peft_model(model, config)


def stock_encode(name: str, tokenizer, example: dict):
    """The tutorials' preprocessing: a text's ids, or CoNLL words' ids (is_split_into_words)."""
    if name == "entities":
        return tokenizer(example["tokens"], is_split_into_words=True, truncation=True)
    return tokenizer(example["text"], truncation=True)


def stock_features(name: str, tokenizer, examples: list[dict], labels: list[str]) -> list[dict]:
    """Training features: each word's first sub-token carries its tag and the rest -100 (tagging); a
    label index (one label) or a 0/1 vector (multi-label)."""
    out = []
    for e in examples:
        enc = stock_encode(name, tokenizer, e)
        if name == "entities":
            target, prev = [], None
            for w in enc.word_ids():
                target.append(-100 if w is None or w == prev else labels.index(e["tags"][w]))
                prev = w
        elif name == "topics":
            target = [float(x in e["labels"]) for x in labels]
        else:
            target = labels.index(e["label"])
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": target})
    return out


def stock_predict(name: str, model, tokenizer, collator, inputs: list[dict], labels: list[str],
                  device: torch.device) -> list[list[str]]:
    """Labels per text (argmax, or sigmoid >= 0.5 for multi-label), or a tag per word (its first sub-token's)."""
    predicted = []
    with torch.inference_mode():
        for i in range(0, len(inputs), 32):
            encs = [stock_encode(name, tokenizer, x) for x in inputs[i:i + 32]]
            batch = collator([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encs])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            for row, enc, x in zip(logits, encs, inputs[i:i + 32]):
                if name == "entities":
                    tags, prev = [], None
                    for pos, w in enumerate(enc.word_ids()):
                        if w is not None and w != prev:
                            tags.append(labels[int(row[pos].argmax())])
                        prev = w
                    predicted.append(tags + ["O"] * (len(x["tokens"]) - len(tags)))  # words cut by truncation
                elif name == "topics":
                    predicted.append([x for x, p in zip(labels, row.sigmoid()) if p >= 0.5])
                else:
                    predicted.append([labels[int(row.argmax())]])
    return predicted


def run_peft(model_dir: Path, name: str, train: list[dict], test: list[dict], truth, labels, args) -> dict:
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = load_stock(model_dir, name, labels, args, device)
    model.config.pad_token_id = tokenizer.pad_token_id  # how a decoder's classifier finds the last real token
    collator = (transformers.DataCollatorForTokenClassification(tokenizer) if name == "entities"
                else transformers.DataCollatorWithPadding(tokenizer))
    features = stock_features(name, tokenizer, train, labels)
    with tempfile.TemporaryDirectory(prefix="task-quality-") as tmp:
        targs = transformers.TrainingArguments(
            output_dir=tmp, num_train_epochs=args.peft_epochs, per_device_train_batch_size=args.peft_batch_size,
            learning_rate=args.peft_learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            logging_steps=25, save_strategy="no", report_to=[], seed=42, use_cpu=device.type == "cpu",
            bf16=device.type == "cuda", disable_tqdm=True, remove_unused_columns=False)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=features, data_collator=collator)
        start = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(len(f["input_ids"]) for f in features) * args.peft_epochs
    print(f"{name}: PEFT trained in {seconds:.0f} s; scoring", file=sys.stderr)
    model.eval()
    # Tagging reads the same words the server split each held-out text into.
    inputs = [{"tokens": [w for w, _, _ in words]} for words, _ in truth] if name == "entities" else test
    predicted = stock_predict(name, model, tokenizer, collator, inputs, labels, device)
    return {"scores": score(name, labels, truth, predicted), "train_seconds": seconds,
            "steps": out.global_step, "trained_tokens": tokens, "tokens_per_second": tokens / seconds,
            "train_loss": out.training_loss,
            "settings": {"rank": args.peft_rank, "alpha": 2 * args.peft_rank, "dropout": 0.05, "targets": TARGETS,
                         "epochs": args.peft_epochs, "batch_size": args.peft_batch_size,
                         "learning_rate": args.peft_learning_rate, "modules_to_save": ["score"]}}


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    from loraserve.client import Client
    from loraserve.core.model.load import ensure_embedded_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized score.weight": the recipe trains a new head
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or REPO / "bench" / "results" / f"task_quality-{stamp:%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_embedded_model()
    results = {"date": stamp.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
               "machine": {**machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                           "loadavg_before": os.getloadavg()},
               "settings": {**vars(args), "model": str(model_dir)}, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="task-quality-") as tmp, contextlib.ExitStack() as stack:
        client = None
        if "loraserve" in args.sides:
            opts = Namespace(port=0, quantization=args.quantization, rank=16, requests=32, new_tokens=16,
                             model=None, device=None)
            proc = stack.enter_context(ServerProcess(opts, Path(tmp) / "adapters", 4,
                                                     out.with_suffix(".server.log"), "static"))
            client = stack.enter_context(Client(f"127.0.0.1:{proc.port}"))
        for name in args.tasks:
            train, test = datasets(name, args)
            truth, labels = gold(name, test), label_names(name, train)
            row = {"train_examples": len(train), "test_examples": len(test), "labels": labels}
            if client is not None:
                row["loraserve"] = run_loraserve(client, name, train, test, truth, labels)
            if "peft" in args.sides:
                row["peft"] = run_peft(model_dir, name, train, test, truth, labels, args)
            results["tasks"][name] = row
            out.write_text(json.dumps(results, indent=2))  # after every task: a long run keeps what it has
    results["machine"]["loadavg_after"] = os.getloadavg()
    out.write_text(json.dumps(results, indent=2))
    m = results["machine"]
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, transformers {m['transformers']}, "
          f"peft {m['peft']}, bitsandbytes {m.get('bitsandbytes', '-')}; {args.quantization}; full results: {out}")
    head = f"{'task':<10} {'train':>6} {'test':>5} {'metric':<16} {'loraserve':>10} {'PEFT':>8} {'ls min':>7} {'PEFT min':>9}"
    print(head + "\n" + "-" * len(head))
    for name, row in results["tasks"].items():
        ls, pe = row.get("loraserve"), row.get("peft")
        for metric in (ls or pe)["scores"]:
            print(f"{name:<10} {row['train_examples']:>6} {row['test_examples']:>5} {metric:<16} "
                  f"{ls['scores'][metric] if ls else float('nan'):>10.3f} {pe['scores'][metric] if pe else float('nan'):>8.3f} "
                  f"{ls['train_seconds'] / 60 if ls else float('nan'):>7.1f} {pe['train_seconds'] / 60 if pe else float('nan'):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
