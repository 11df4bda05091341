"""`loraserve finetune`: train an adapter on a running server through the Train RPC, with a progress bar.

    loraserve finetune --adapter-id my-task --data train.jsonl --epochs 2   # start a job and follow it
    loraserve finetune --job JOB_ID                                          # re-attach to a job
    loraserve finetune --cancel JOB_ID

The examples of --data are read and checked here (errors name the line) and sent inline;
--dataset-path names a file under the server's data root instead. Leaving (Ctrl-C, --detach) does
not stop the job. Exit codes: 0 the adapter is registered, 1 the job failed or was cancelled,
2 the request was refused (bad input, unknown job, server unreachable), 130 detached by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Iterator, TextIO

import grpc
from loraserve import training as api
from loraserve.channel import add_channel_arguments, channel_settings
from loraserve.client import Client
from loraserve.core.errors import LoraserveError
from loraserve.core.tasks.heads import GENERATION
from loraserve.trainer import events
from loraserve.trainer.cli import add_setting_arguments
from loraserve.trainer.data import read_jsonl
from loraserve.trainer.progress import ProgressBar
from loraserve.trainer.settings import TrainSettings


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("server and job")
    job.add_argument("--server", default="localhost:50051", metavar="HOST:PORT",
                     help="the loraserve server (default %(default)s)")
    job.add_argument("--adapter-id", metavar="ID", help="id the trained adapter is registered under")
    source = job.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="FILE.jsonl", help="local JSONL examples, sent with the request")
    source.add_argument("--dataset-path", metavar="PATH", help="a JSONL file under the server's data root")
    job.add_argument("--overwrite", action="store_true", help="replace an existing adapter with this id")
    job.add_argument("--truncate", action="store_true", help="cut examples longer than --max-length (else refused)")
    job.add_argument("--detach", action="store_true", help="print the job id once queued and leave it running")
    job.add_argument("--job", metavar="JOB_ID", help="re-attach to a job: show its progress until it ends")
    job.add_argument("--cancel", metavar="JOB_ID", help="cancel a queued or running job")
    add_setting_arguments(parser.add_argument_group("training settings (unset: the server's defaults)"),
                          show_defaults=False)
    add_channel_arguments(parser)


def run_finetune(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        client = Client(args.server, **channel_settings(args))
    except (OSError, ValueError) as e:  # a certificate file or the API key of the connection flags
        return _fail(err, str(e), 2)
    try:
        with client:
            if args.cancel:
                job = client.cancel_training_job(args.cancel)
                print(f"job {job.job_id}: {job.state}{f' ({job.error})' if job.error else ''}", file=out)
                return 0
            if args.job:
                return follow(client.watch_training_job(args.job), args, out, err)
            return follow(client.train(**_train_arguments(args)), args, out, err)
    except grpc.RpcError as e:
        return _fail(err, f"{e.details()} ({e.code().name})", 2)
    except LoraserveError as e:  # the local data file or a setting flag
        return _fail(err, str(e), 2)


def follow(stream: Iterator[api.TrainingEvent], args, out: TextIO, err: TextIO) -> int:
    """Draw the job's events; returns the exit code."""
    bar = ProgressBar(err)
    job_id = None
    try:
        for event in stream:
            kind = event.kind
            if job_id is None:
                job_id = event.job_id
                print(f"job {job_id} (re-attach: loraserve finetune --server {args.server} --job {job_id})",
                      file=err, flush=True)
            if isinstance(kind, api.Queued):
                if args.detach:
                    print(job_id, file=out)
                    return 0
                print(f"queued: position {kind.position}", file=err, flush=True)
            elif isinstance(kind, api.Started):
                bar(events.Started(kind.total_steps, kind.train_examples, kind.eval_examples, kind.truncated_examples))
            elif isinstance(kind, api.Progress):
                bar(events.Progress(kind.step, kind.total_steps, kind.epoch, kind.loss, kind.learning_rate,
                                    kind.tokens_per_second, kind.eta_seconds))
            elif isinstance(kind, api.Evaluation):
                bar(events.Evaluation(kind.step, kind.eval_loss, kind.perplexity, kind.metrics))
            elif isinstance(kind, api.Completed):
                bar(events.Completed(_metrics(kind.metrics)))
                _summary(kind, out)
                return 0
            else:
                _end_bar_line(bar)
                what = "failed" if isinstance(kind, api.Failed) else "cancelled"
                return _fail(err, f"job {job_id} {what}: {kind.reason}", 1)
    except KeyboardInterrupt:
        _end_bar_line(bar)
        where = f"job {job_id} keeps training; re-attach with --job {job_id}" if job_id else "the job keeps training"
        return _fail(err, f"detached: {where}", 130)
    return _fail(err, f"the stream of job {job_id} ended without an outcome", 2)


def _train_arguments(args) -> dict:
    if not args.adapter_id:
        raise _BadInput("--adapter-id is required to start a job (or give --job / --cancel)")
    if not (args.data or args.dataset_path):
        raise _BadInput("give the examples: --data FILE.jsonl (local) or --dataset-path PATH (on the server)")
    settings = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name) is not None}
    for name in ("target_modules", "labels"):  # comma-separated on the command line
        if name in settings:
            settings[name] = [t.strip() for t in settings[name].split(",") if t.strip()]
    # Checked here in the task's own format, so a bad line is named before anything is sent.
    examples = ([e.canonical() for e in read_jsonl(args.data, kind=settings.get("task", GENERATION))]
                if args.data else None)
    return dict(adapter_id=args.adapter_id, examples=examples, dataset_path=args.dataset_path, settings=settings,
                overwrite=args.overwrite, truncate=args.truncate)


def _metrics(m: api.Metrics) -> events.TrainMetrics:
    return events.TrainMetrics(m.train_loss, m.eval_loss, m.perplexity, m.steps, m.tokens, m.seconds,
                               m.tokens_per_second, m.stopped_early, m.eval_metrics)


def _summary(done: api.Completed, out: TextIO) -> None:
    m = done.metrics
    lines = [f"train_loss: {m.train_loss:.4f}"]
    if m.eval_loss is not None:
        lines += [f"eval_loss: {m.eval_loss:.4f}", f"perplexity: {m.perplexity:.3f}"]
    lines += [f"steps: {m.steps}{' (stopped early)' if m.stopped_early else ''}", f"tokens: {m.tokens}",
              f"seconds: {m.seconds:.1f}", f"tokens_per_second: {m.tokens_per_second:.1f}",
              f"adapter: {done.adapter_id}"]
    print("\n".join(lines), file=out)


def _end_bar_line(bar: ProgressBar) -> None:
    # A bar redrawn in place leaves the cursor on its line: end it before the message.
    if bar.open_line:
        bar.stream.write("\n")
        bar.open_line = False


class _BadInput(LoraserveError):
    pass


def _fail(err: TextIO, message: str, code: int) -> int:
    print(f"loraserve finetune: error: {message}", file=err)
    return code
