"""The `loraserve` command: serve, train, finetune, health, keys, classify, tag, answer.

Every `serve` flag can also come from a LORASERVE_<FLAG> environment variable (read here, once), and
LORASERVE_API_KEY adds one API key with every scope. The commands that talk to a server take the
connection flags of loraserve.channel (TLS, API key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from loraserve.channel import add_channel_arguments, channel_settings, open_channel
from loraserve.core.model.config import CPU_KERNELS
from loraserve.server.config import (
    EngineConfig,
    LoraCacheConfig,
    ModelConfig,
    SecurityConfig,
    ServerConfig,
    StartupError,
    TrainingConfig,
)
from loraserve.server.task_cli import TASK_COMMANDS

ENV_PREFIX = "LORASERVE_"


def _env(name: str, default, cast=str):
    raw = os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if cast is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return cast(raw)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d, lc, ec = ServerConfig(), LoraCacheConfig(), EngineConfig()
    p.add_argument("--host", default=_env("host", d.host), help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=_env("port", d.port, int), help="gRPC port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=_env("metrics-port", d.metrics_port, int),
                   help="Prometheus /metrics HTTP port; -1 disables (default %(default)s)")
    p.add_argument("--metrics-host", default=_env("metrics-host", d.metrics_host),
                   help="address /metrics binds: plain HTTP without auth, so loopback unless a scraper elsewhere "
                        "needs it, e.g. 0.0.0.0 in a container (default %(default)s)")
    p.add_argument("--http-port", type=int, default=_env("http-port", d.http_port, int),
                   help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on --host, "
                        "with the gRPC port's keys and TLS; -1 disables (default %(default)s)")
    p.add_argument("--max-inference-request-bytes", type=int,
                   default=_env("max-inference-request-bytes", d.max_inference_request_bytes, int),
                   help="largest Predict/PredictStream request or HTTP body (default %(default)s)")
    p.add_argument("--max-upload-bytes", type=int, default=_env("max-upload-bytes", lc.max_upload_bytes, int),
                   help="largest adapter upload through LoadAdapter (default %(default)s)")
    p.add_argument("--model", default=_env("model", None),
                   help="local Hugging Face causal-LM directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=["nf4", "bf16", "fp32"], default=_env("quantization", "nf4"),
                   help="base weights: NF4 4-bit (bitsandbytes), bf16 or fp32 (default %(default)s)")
    p.add_argument("--device", default=_env("device", None), help="torch device (default: cuda if available)")
    p.add_argument("--cpu-kernel", choices=CPU_KERNELS, default=_env("cpu-kernel", "auto"),
                   help="NF4 on the CPU: bitsandbytes' packed AVX512-BF16 kernel or the generic one; auto picks "
                        "packed where the CPU has it (default %(default)s)")
    p.add_argument("--adapter-root", default=_env("adapter-root", lc.adapter_root),
                   help="directory of adapters, one sub-directory per id (default %(default)s)")
    p.add_argument("--max-gpu-adapters", type=int, default=_env("max-gpu-adapters", lc.max_gpu_adapters, int),
                   help="adapter slots on the device (default %(default)s)")
    p.add_argument("--max-cpu-adapters", type=int, default=_env("max-cpu-adapters", lc.max_cpu_adapters, int),
                   help="adapters cached in host memory (default %(default)s)")
    p.add_argument("--max-lora-rank", type=int, default=_env("max-lora-rank", lc.max_lora_rank, int),
                   help="largest adapter rank accepted (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=_env("max-batch-size", ec.max_batch_size, int),
                   help="rows decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=_env("max-queue", ec.max_queue, int),
                   help="requests waiting for a row before RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=_env("max-new-tokens", ec.max_new_tokens, int),
                   help="cap on a request's max_new_tokens (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=_env("max-seq-len", ec.max_seq_len, int),
                   help="longest prompt + new tokens per request, capped by the model's context window; the "
                        "static engine preallocates this many KV positions per row (default %(default)s)")
    p.add_argument("--kv-cache-fraction", type=float, default=_env("kv-cache-fraction", ec.kv_cache_fraction, float),
                   help="CUDA: share of free device memory the KV cache may take (default %(default)s)")
    p.add_argument("--max-prefill-tokens", type=int,
                   default=_env("max-prefill-tokens", ec.max_prefill_tokens, int),
                   help="prompt tokens prefilled per step (chunked prefill) (default %(default)s)")
    p.add_argument("--engine", choices=["static", "generic"], default=_env("engine", "static"),
                   help="static: preallocated cache, CUDA graphs, Llama-family models (others fall back to "
                        "generic); generic: the model's own forward (default %(default)s)")
    p.add_argument("--grace-seconds", type=float, default=_env("grace-seconds", d.grace_seconds, float),
                   help="on SIGTERM, time for in-flight requests to finish (default %(default)s)")
    p.add_argument("--data-root", default=_env("data-root", TrainingConfig().data_root),
                   help="directory that Train requests' dataset files resolve under (default %(default)s)")
    p.add_argument("--max-concurrent-jobs", type=int,
                   default=_env("max-concurrent-jobs", TrainingConfig().max_concurrent_jobs, int),
                   help="training jobs running at once; the others queue (default %(default)s)")
    p.add_argument("--max-queued-jobs", type=int,
                   default=_env("max-queued-jobs", TrainingConfig().max_queued_jobs, int),
                   help="training jobs waiting to start before Train answers RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-jobs-per-key", type=int,
                   default=_env("max-jobs-per-key", TrainingConfig().max_jobs_per_key, int),
                   help="training jobs one API key may have queued or running (default %(default)s)")
    p.add_argument("--max-train-examples", type=int,
                   default=_env("max-train-examples", TrainingConfig().max_examples, int),
                   help="examples one Train request may give, inline or in its dataset file (default %(default)s)")
    p.add_argument("--max-train-steps", type=int,
                   default=_env("max-train-steps", TrainingConfig().max_steps_per_job, int),
                   help="optimizer steps one training job may plan (default %(default)s)")
    p.add_argument("--max-train-tokens", type=int,
                   default=_env("max-train-tokens", TrainingConfig().max_tokens_per_job, int),
                   help="tokens one training job may plan to train on (default %(default)s)")
    p.add_argument("--max-concurrent-streams", type=int,
                   default=_env("max-concurrent-streams", ServerConfig().max_concurrent_streams, int),
                   help="concurrent RPCs one client connection may have open (default %(default)s)")
    p.add_argument("--training-share", type=float,
                   default=_env("training-share", TrainingConfig().training_share, float),
                   help="share of device time training takes while requests are served (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int,
                   default=_env("checkpoint-every", TrainingConfig().checkpoint_every_steps, int),
                   help="a training job checkpoints every N optimizer steps and resumes from its last "
                        "checkpoint after a restart; 0: only on SIGTERM (default %(default)s)")
    p.add_argument("--per-adapter-metrics", action="store_true", default=_env("per-adapter-metrics", False, bool),
                   help="label request metrics by adapter id (first 100 ids)")
    p.add_argument("--log-level", default=_env("log-level", "INFO"))
    add_security_arguments(p)


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("security (README.md, Security)")
    s.add_argument("--tls-cert", metavar="PEM", default=_env("tls-cert", None),
                   help="server certificate chain: serve gRPC over TLS only (with --tls-key); re-read when it changes")
    s.add_argument("--tls-key", metavar="PEM", default=_env("tls-key", None), help="private key of --tls-cert")
    s.add_argument("--tls-client-ca", metavar="PEM", default=_env("tls-client-ca", None),
                   help="mutual TLS: require a client certificate signed by these CAs")
    s.add_argument("--api-keys-file", metavar="FILE", default=_env("api-keys-file", None),
                   help="hashed API keys with scopes, one per line (`loraserve keys new` makes them); every RPC but "
                        "health and reflection then needs a key; re-read when it changes")
    s.add_argument("--reflection", choices=["on", "off"], default=_env("reflection", "on"),
                   help="serve gRPC reflection, open to callers without a key (default %(default)s)")


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        grace_seconds=a.grace_seconds,
        per_adapter_metrics=a.per_adapter_metrics,
        model=ModelConfig(path=a.model, quantization=a.quantization, device=a.device, cpu_kernel=a.cpu_kernel),
        lora=LoraCacheConfig(adapter_root=a.adapter_root, max_gpu_adapters=a.max_gpu_adapters,
                             max_cpu_adapters=a.max_cpu_adapters, max_lora_rank=a.max_lora_rank,
                             max_upload_bytes=a.max_upload_bytes),
        engine=EngineConfig(max_batch_size=a.max_batch_size, max_queue=a.max_queue, max_new_tokens=a.max_new_tokens,
                            default_max_new_tokens=min(EngineConfig.default_max_new_tokens, a.max_new_tokens),
                            max_seq_len=a.max_seq_len, kv_cache_fraction=a.kv_cache_fraction,
                            max_prefill_tokens=a.max_prefill_tokens, static_engine=a.engine == "static"),
        training=TrainingConfig(data_root=a.data_root, max_concurrent_jobs=a.max_concurrent_jobs,
                                max_queued_jobs=a.max_queued_jobs, max_jobs_per_key=a.max_jobs_per_key,
                                max_examples=a.max_train_examples,
                                training_share=a.training_share, max_steps_per_job=a.max_train_steps,
                                max_tokens_per_job=a.max_train_tokens, checkpoint_every_steps=a.checkpoint_every),
        max_concurrent_streams=a.max_concurrent_streams,
        metrics_host=a.metrics_host,
        http_port=a.http_port,
        max_inference_request_bytes=a.max_inference_request_bytes,
        # An empty variable (LORASERVE_TLS_CERT= in a compose file) means unset.
        security=SecurityConfig(tls_cert=a.tls_cert or None, tls_key=a.tls_key or None,
                                tls_client_ca=a.tls_client_ca or None, api_keys_file=a.api_keys_file or None,
                                api_key=os.environ.get(ENV_PREFIX + "API_KEY") or None,
                                reflection=a.reflection == "on"),
    )


HEALTH_HELP = "check a running server through grpc.health.v1: exit 0 if SERVING, 1 otherwise"


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    port = _env("port", ServerConfig().port, int)
    p.add_argument("--address", default=f"127.0.0.1:{port}",
                   help="HOST:PORT of the server (default %(default)s, the port from LORASERVE_PORT if set)")
    p.add_argument("--service", default="",
                   help="service to check, e.g. loraserve.v1.InferenceService (default: the server as a whole)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default %(default)s)")
    add_channel_arguments(p)


def run_health(a: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with open_channel(a.address, **channel_settings(a)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout)
    except (OSError, ValueError) as e:  # a certificate file of the flags
        print(f"loraserve health: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"{a.address} {a.service or '(server)'}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{a.address} {a.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


KEYS_HELP = "make API keys for --api-keys-file"


def add_keys_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="print a fresh key (shown once) and the line to append to the keys file")
    new.add_argument("--name", required=True, help="who holds the key; errors and per-key limits name it")
    new.add_argument("--scopes", required=True,
                     help="comma-separated: inference, adapters:read, adapters:write, training, or * for all")


def run_keys(a: argparse.Namespace) -> int:
    from loraserve.server.api_keys import check_name, key_line, new_key, parse_scopes

    try:
        scopes = parse_scopes(a.scopes)
        check_name(a.name)
    except ValueError as e:
        print(f"loraserve keys new: error: {e}", file=sys.stderr)
        return 2
    key = new_key()
    print(key)
    print(key_line(key, a.name, scopes))
    print("The first line is the key: hand it to its holder now, it is stored nowhere. Append the second line "
          "to the --api-keys-file; the server picks it up without a restart.", file=sys.stderr)
    return 0


# Commands answered before the trainer's parsers below import torch: a probe runs every few seconds.
LIGHT_COMMANDS = {"health": (HEALTH_HELP, add_health_arguments, run_health),
                  "keys": (KEYS_HELP, add_keys_arguments, run_keys), **TASK_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in LIGHT_COMMANDS:
        description, add_arguments, run = LIGHT_COMMANDS[argv[0]]
        light_parser = argparse.ArgumentParser(prog=f"loraserve {argv[0]}", description=description)
        add_arguments(light_parser)
        return run(light_parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run the gRPC server"))
    for name, (description, add_arguments, _) in LIGHT_COMMANDS.items():
        add_arguments(sub.add_parser(name, help=description))
    from loraserve.trainer.cli import add_train_arguments, run_train
    from loraserve.trainer.finetune import add_finetune_arguments, run_finetune

    add_train_arguments(sub.add_parser("train", help="train a LoRA adapter offline from a JSONL file"))
    add_finetune_arguments(sub.add_parser("finetune", help="train an adapter on a running server (Train RPC)"))
    args = parser.parse_args(argv)
    if args.command in LIGHT_COMMANDS:
        return LIGHT_COMMANDS[args.command][2](args)
    if args.command == "train":
        return run_train(args)
    if args.command == "finetune":
        return run_finetune(args)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    from loraserve.server.app import serve_forever

    try:
        asyncio.run(serve_forever(config))
    except StartupError as e:  # a key file or certificate that does not load: the operator's to fix
        print(f"loraserve serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
