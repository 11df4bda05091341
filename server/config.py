"""Typed configuration, one dataclass per concern.

The environment is read in exactly one place, server/cli.py at start-up (LORASERVE_* variables);
nothing here reads os.environ. The base model's settings (ModelConfig) live in loraserve.core, which
the offline trainer shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.core.model.config import ModelConfig


@dataclass(frozen=True)
class LoraCacheConfig:
    adapter_root: str = "./adapters"
    """Directory holding one sub-directory per adapter id (PEFT format)."""
    max_gpu_adapters: int = 16
    """Adapter slots in the stacked LoRA weights on the device; bounds distinct adapters per step."""
    max_cpu_adapters: int = 64
    """Adapters kept in host memory (beyond the device slots); the rest stay on disk."""
    max_lora_rank: int = 64
    """Largest rank accepted; the stacked weights are sized for it."""
    max_upload_bytes: int = 512 * 1024 * 1024
    """Largest adapter accepted through LoadAdapter's inline files."""

    def __post_init__(self):
        if self.max_gpu_adapters < 1:
            raise ValueError("--max-gpu-adapters must be >= 1")
        if self.max_cpu_adapters < 0:
            raise ValueError("--max-cpu-adapters must be >= 0")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError("--max-lora-rank must be in [1, 1024]")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    """Rows decoded together in one forward pass."""
    max_queue: int = 256
    """Requests waiting for a row; beyond it Predict answers RESOURCE_EXHAUSTED."""
    max_new_tokens: int = 1024
    """Cap on a request's max_new_tokens."""
    default_max_new_tokens: int = 128
    """Used when a request leaves max_new_tokens at 0."""
    max_prompt_tokens: int | None = None
    """Cap on prompt length; None: the model's context window minus one."""
    max_stop_sequences: int = 8
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled in one step (in chunks), so a long prompt delays decoding rows by at most
    one chunk."""
    max_seq_len: int = 4096
    """Longest sequence (prompt + new tokens) a row may reach; the model's context window caps it. The
    static engine preallocates this many KV positions per row."""
    kv_cache_fraction: float = 0.5
    """On CUDA, the share of free device memory (after the model loads) the KV cache may take; the
    batch size is capped to the rows that fit."""
    static_engine: bool = True
    """Use the static-shape engine for Llama-family models (false: the generic engine for all)."""

    def __post_init__(self):
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("--kv-cache-fraction must be in (0, 1]")
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "default_max_new_tokens", "max_seq_len",
                     "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    data_root: str = "./data"
    """Dataset files named by Train requests resolve under this directory."""
    jobs_dir: str | None = None
    """Where job records persist; None: <adapter_root>/.jobs."""
    max_concurrent_jobs: int = 1
    """Jobs training at once; the others queue."""
    max_queued_jobs: int = 64
    """Jobs waiting to start; beyond it Train answers RESOURCE_EXHAUSTED."""
    max_jobs_per_key: int = 4
    """Jobs one API key may have queued or running at once (only with API keys on)."""
    max_examples: int = 100_000
    """Examples accepted in one Train request (--max-train-examples)."""
    max_steps_per_job: int = 100_000
    """Optimizer steps one job may plan (max_steps, or epochs x steps per epoch)."""
    max_tokens_per_job: int = 1_000_000_000
    """Tokens one job may plan to train on (steps x examples per step x their mean length)."""
    training_share: float = 0.5
    """While requests are being served, the share of device time training jobs take (split evenly
    between concurrent jobs); 1 lets them alternate with decode steps freely."""
    checkpoint_every_steps: int = 50
    """A running job checkpoints every this many optimizer steps, to resume from after a crash; 0
    checkpoints only when the server stops (SIGTERM). A checkpoint holds the LoRA weights and twice
    their size of optimizer state."""

    def __post_init__(self):
        if self.checkpoint_every_steps < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        for name, flag in (("max_concurrent_jobs", "max-concurrent-jobs"), ("max_queued_jobs", "max-queued-jobs"),
                           ("max_jobs_per_key", "max-jobs-per-key"), ("max_examples", "max-train-examples"),
                           ("max_steps_per_job", "max-train-steps"), ("max_tokens_per_job", "max-train-tokens")):
            if getattr(self, name) < 1:
                raise ValueError(f"--{flag} must be >= 1")
        if not 0 < self.training_share <= 1:
            raise ValueError("--training-share must be in (0, 1]")


class StartupError(Exception):
    """A setting that cannot take effect at start (a file missing or malformed); the message names the
    flag and the file, for the operator."""


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: str | None = None
    """PEM certificate chain of the server; with tls_key, gRPC is served over TLS only."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle; set, every client must present a certificate it signed (mutual TLS)."""
    api_keys_file: str | None = None
    """Hashed API keys, one per line (server/api_keys.py has the format); set, every RPC but health
    and reflection needs a key holding the method's scope."""
    api_key: str | None = field(default=None, repr=False)
    """One plain key with every scope (LORASERVE_API_KEY), e.g. from a container secret."""
    reflection: bool = True
    """Serve grpc.reflection (lists the services and their messages, without a key)."""

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("LORASERVE_API_KEY is set but empty")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def auth(self) -> bool:
        return bool(self.api_keys_file) or self.api_key is not None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = 9400
    """HTTP port for Prometheus /metrics; 0 picks a free one, -1 disables."""
    metrics_host: str = "127.0.0.1"
    """Address /metrics binds: loopback unless told otherwise, since it is plain HTTP without auth."""
    http_port: int = -1
    """Port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on
    `host`; -1 (default) serves none, 0 picks a free one."""
    grace_seconds: float = 30.0
    """On SIGTERM, how long in-flight requests may run before the process exits."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest response, and largest Train request (inline examples)."""
    max_inference_request_bytes: int = 4 * 1024 * 1024
    """Largest Predict/PredictStream request; other methods have their own limits (service/limits.py)."""
    max_concurrent_streams: int = 256
    """Concurrent RPCs (streams) one client connection may have open."""
    per_adapter_metrics: bool = False
    """Label request metrics with the adapter id (bounded by max_adapter_labels)."""
    max_adapter_labels: int = 100
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraCacheConfig = field(default_factory=LoraCacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
