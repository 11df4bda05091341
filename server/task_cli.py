"""`loraserve classify`, `loraserve tag`, `loraserve answer`: one call of a task adapter on a running server.

    loraserve classify --adapter sentiment "The service was quick and friendly" [--top-k 2]
    loraserve tag --adapter ner "John Smith flew to Paris."
    loraserve answer --adapter qa --question "Who founded Acme?" --context - < doc.txt

A TEXT (or the --question / --context value) of "-" is read from stdin, trailing newlines dropped.
The result is one JSON object on stdout. Exit codes: 0 answered, 2 refused (the gRPC status as
`error: CODE: details` on stderr, or a bad connection flag). They take the connection flags of
loraserve.channel (TLS, API key) and, like `finetune`, --server; they do not import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Callable

from loraserve.channel import add_channel_arguments, channel_settings

CLASSIFY_HELP = "classify one text with a seq_cls adapter on a running server (Classify RPC); prints JSON"
TAG_HELP = "tag the entities of one text with a token_cls adapter on a running server (Tag RPC); prints JSON"
ANSWER_HELP = "answer a question about a context with a qa adapter on a running server (Answer RPC); prints JSON"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                   help="the loraserve server (default %(default)s)")
    p.add_argument("--adapter", required=True, metavar="ID", help="id of the task adapter")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the answer (default %(default)s)")
    add_channel_arguments(p)


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", metavar="TEXT", help='the text to classify ("-": read it from stdin)')
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="only the K most likely labels (default: all)")
    _add_common(p)


def add_tag_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", metavar="TEXT", help='the text to tag ("-": read it from stdin)')
    _add_common(p)


def add_answer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", required=True, metavar="Q", help='the question ("-": read it from stdin)')
    p.add_argument("--context", required=True, metavar="C",
                   help='the text that holds the answer ("-": read it from stdin)')
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="answers to return, best first "
                   "(default %(default)s)")
    p.add_argument("--max-answer-tokens", type=int, default=0, metavar="N",
                   help="longest answer in tokens (default: the adapter's setting)")
    _add_common(p)


def _text(value: str, stdin_used: list[bool]) -> str:
    if value != "-":
        return value
    if stdin_used[0]:
        raise ValueError('only one of the inputs can be "-" (stdin)')
    stdin_used[0] = True
    return sys.stdin.read().rstrip("\r\n")


def _classify(client, a, read) -> dict:
    r = client.classify(read(a.text), adapter_id=a.adapter, top_k=a.top_k)
    return {"labels": [{"label": label, "probability": p} for label, p in r.labels], "predicted": r.predicted,
            "multi_label": r.multi_label, "prompt_tokens": r.prompt_tokens}


def _tag(client, a, read) -> dict:
    return {"entities": [asdict(e) for e in client.tag(read(a.text), adapter_id=a.adapter)]}


def _answer(client, a, read) -> dict:
    question, context = read(a.question), read(a.context)
    answers = client.answer(question, context, adapter_id=a.adapter, top_k=a.top_k,
                            max_answer_tokens=a.max_answer_tokens)
    return {"answers": [asdict(x) for x in answers]}


def _runner(command: str, call: Callable) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        import grpc
        from loraserve.client import Client

        stdin_used = [False]
        try:
            if getattr(a, "top_k", 0) < 0 or getattr(a, "max_answer_tokens", 0) < 0:
                raise ValueError("--top-k and --max-answer-tokens must not be negative")
            with Client(a.server, timeout=a.timeout, **channel_settings(a)) as client:
                result = call(client, a, lambda value: _text(value, stdin_used))
        except grpc.RpcError as e:
            print(f"loraserve {command}: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as e:  # a certificate file or the API key of the connection flags, stdin
            print(f"loraserve {command}: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result, ensure_ascii=False))
        return 0

    return run


# name -> (help, add_arguments, run), the shape of server.cli's LIGHT_COMMANDS.
TASK_COMMANDS = {
    "classify": (CLASSIFY_HELP, add_classify_arguments, _runner("classify", _classify)),
    "tag": (TAG_HELP, add_tag_arguments, _runner("tag", _tag)),
    "answer": (ANSWER_HELP, add_answer_arguments, _runner("answer", _answer)),
}
