import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from loraserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LrScheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULER_UNSPECIFIED: _ClassVar[LrScheduler]
    LR_SCHEDULER_LINEAR: _ClassVar[LrScheduler]
    LR_SCHEDULER_COSINE: _ClassVar[LrScheduler]
    LR_SCHEDULER_CONSTANT: _ClassVar[LrScheduler]

class PromptTemplate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_TEMPLATE_UNSPECIFIED: _ClassVar[PromptTemplate]
    PROMPT_TEMPLATE_AUTO: _ClassVar[PromptTemplate]
    PROMPT_TEMPLATE_CHAT: _ClassVar[PromptTemplate]
    PROMPT_TEMPLATE_PLAIN: _ClassVar[PromptTemplate]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_GENERATION: _ClassVar[TaskKind]
    TASK_KIND_SEQUENCE_CLASSIFICATION: _ClassVar[TaskKind]
    TASK_KIND_TOKEN_CLASSIFICATION: _ClassVar[TaskKind]
    TASK_KIND_QUESTION_ANSWERING: _ClassVar[TaskKind]

class TrainingJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_STATE_UNSPECIFIED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_QUEUED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_RUNNING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_SUCCEEDED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_FAILED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_CANCELLED: _ClassVar[TrainingJobState]
LR_SCHEDULER_UNSPECIFIED: LrScheduler
LR_SCHEDULER_LINEAR: LrScheduler
LR_SCHEDULER_COSINE: LrScheduler
LR_SCHEDULER_CONSTANT: LrScheduler
PROMPT_TEMPLATE_UNSPECIFIED: PromptTemplate
PROMPT_TEMPLATE_AUTO: PromptTemplate
PROMPT_TEMPLATE_CHAT: PromptTemplate
PROMPT_TEMPLATE_PLAIN: PromptTemplate
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_GENERATION: TaskKind
TASK_KIND_SEQUENCE_CLASSIFICATION: TaskKind
TASK_KIND_TOKEN_CLASSIFICATION: TaskKind
TASK_KIND_QUESTION_ANSWERING: TaskKind
TRAINING_JOB_STATE_UNSPECIFIED: TrainingJobState
TRAINING_JOB_STATE_QUEUED: TrainingJobState
TRAINING_JOB_STATE_RUNNING: TrainingJobState
TRAINING_JOB_STATE_SUCCEEDED: TrainingJobState
TRAINING_JOB_STATE_FAILED: TrainingJobState
TRAINING_JOB_STATE_CANCELLED: TrainingJobState

class TrainingSettings(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "use_rslora", "learning_rate", "epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm", "seed", "eval_fraction", "eval_steps", "early_stopping_patience", "max_length", "template", "gradient_checkpointing", "bf16", "task", "labels", "threshold", "repeat_input", "doc_stride", "max_answer_tokens", "head_learning_rate", "metric_for_best_model")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    BF16_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REPEAT_INPUT_FIELD_NUMBER: _ClassVar[int]
    DOC_STRIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEAD_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FOR_BEST_MODEL_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    use_rslora: bool
    learning_rate: float
    epochs: int
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    lr_scheduler: LrScheduler
    weight_decay: float
    max_grad_norm: float
    seed: int
    eval_fraction: float
    eval_steps: int
    early_stopping_patience: int
    max_length: int
    template: PromptTemplate
    gradient_checkpointing: bool
    bf16: bool
    task: TaskKind
    labels: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    repeat_input: bool
    doc_stride: int
    max_answer_tokens: int
    head_learning_rate: float
    metric_for_best_model: str
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., use_rslora: _Optional[bool] = ..., learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., warmup_ratio: _Optional[float] = ..., lr_scheduler: _Optional[_Union[LrScheduler, str]] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., seed: _Optional[int] = ..., eval_fraction: _Optional[float] = ..., eval_steps: _Optional[int] = ..., early_stopping_patience: _Optional[int] = ..., max_length: _Optional[int] = ..., template: _Optional[_Union[PromptTemplate, str]] = ..., gradient_checkpointing: _Optional[bool] = ..., bf16: _Optional[bool] = ..., task: _Optional[_Union[TaskKind, str]] = ..., labels: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., repeat_input: _Optional[bool] = ..., doc_stride: _Optional[int] = ..., max_answer_tokens: _Optional[int] = ..., head_learning_rate: _Optional[float] = ..., metric_for_best_model: _Optional[str] = ...) -> None: ...

class EntitySpan(_message.Message):
    __slots__ = ("start", "end", "label", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    label: str
    text: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., label: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class AnswerAnnotations(_message.Message):
    __slots__ = ("text", "answer_start")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_START_FIELD_NUMBER: _ClassVar[int]
    text: _containers.RepeatedScalarFieldContainer[str]
    answer_start: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[_Iterable[str]] = ..., answer_start: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainingExample(_message.Message):
    __slots__ = ("prompt", "completion", "messages", "text", "label", "labels", "multi_label", "tokens", "tags", "entities", "context", "question", "answers")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    messages: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ChatMessage]
    text: str
    label: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    multi_label: bool
    tokens: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    entities: _containers.RepeatedCompositeFieldContainer[EntitySpan]
    context: str
    question: str
    answers: AnswerAnnotations
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_inference_pb2.ChatMessage, _Mapping]]] = ..., text: _Optional[str] = ..., label: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., multi_label: _Optional[bool] = ..., tokens: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., entities: _Optional[_Iterable[_Union[EntitySpan, _Mapping]]] = ..., context: _Optional[str] = ..., question: _Optional[str] = ..., answers: _Optional[_Union[AnswerAnnotations, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("adapter_id", "examples", "dataset_path", "settings", "overwrite", "truncate")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_PATH_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    examples: _containers.RepeatedCompositeFieldContainer[TrainingExample]
    dataset_path: str
    settings: TrainingSettings
    overwrite: bool
    truncate: bool
    def __init__(self, adapter_id: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[TrainingExample, _Mapping]]] = ..., dataset_path: _Optional[str] = ..., settings: _Optional[_Union[TrainingSettings, _Mapping]] = ..., overwrite: _Optional[bool] = ..., truncate: _Optional[bool] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: TrainingEvent
    def __init__(self, event: _Optional[_Union[TrainingEvent, _Mapping]] = ...) -> None: ...

class TrainingEvent(_message.Message):
    __slots__ = ("job_id", "time", "queued", "started", "progress", "evaluation", "completed", "failed", "cancelled")
    class Queued(_message.Message):
        __slots__ = ("position",)
        POSITION_FIELD_NUMBER: _ClassVar[int]
        position: int
        def __init__(self, position: _Optional[int] = ...) -> None: ...
    class Started(_message.Message):
        __slots__ = ("total_steps", "train_examples", "eval_examples", "truncated_examples")
        TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
        TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
        EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
        TRUNCATED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
        total_steps: int
        train_examples: int
        eval_examples: int
        truncated_examples: int
        def __init__(self, total_steps: _Optional[int] = ..., train_examples: _Optional[int] = ..., eval_examples: _Optional[int] = ..., truncated_examples: _Optional[int] = ...) -> None: ...
    class Cancelled(_message.Message):
        __slots__ = ("reason",)
        REASON_FIELD_NUMBER: _ClassVar[int]
        reason: str
        def __init__(self, reason: _Optional[str] = ...) -> None: ...
    class Failed(_message.Message):
        __slots__ = ("reason",)
        REASON_FIELD_NUMBER: _ClassVar[int]
        reason: str
        def __init__(self, reason: _Optional[str] = ...) -> None: ...
    class Completed(_message.Message):
        __slots__ = ("adapter_id", "metrics")
        ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
        METRICS_FIELD_NUMBER: _ClassVar[int]
        adapter_id: str
        metrics: TrainingMetrics
        def __init__(self, adapter_id: _Optional[str] = ..., metrics: _Optional[_Union[TrainingMetrics, _Mapping]] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    time: _timestamp_pb2.Timestamp
    queued: TrainingEvent.Queued
    started: TrainingEvent.Started
    progress: TrainingProgress
    evaluation: TrainingEvaluation
    completed: TrainingEvent.Completed
    failed: TrainingEvent.Failed
    cancelled: TrainingEvent.Cancelled
    def __init__(self, job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued: _Optional[_Union[TrainingEvent.Queued, _Mapping]] = ..., started: _Optional[_Union[TrainingEvent.Started, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., evaluation: _Optional[_Union[TrainingEvaluation, _Mapping]] = ..., completed: _Optional[_Union[TrainingEvent.Completed, _Mapping]] = ..., failed: _Optional[_Union[TrainingEvent.Failed, _Mapping]] = ..., cancelled: _Optional[_Union[TrainingEvent.Cancelled, _Mapping]] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "eta_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class TrainingEvaluation(_message.Message):
    __slots__ = ("step", "eval_loss", "perplexity", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    eval_loss: float
    perplexity: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., eval_loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainingMetrics(_message.Message):
    __slots__ = ("train_loss", "eval_loss", "perplexity", "steps", "tokens", "seconds", "tokens_per_second", "stopped_early", "eval_metrics")
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    eval_loss: float
    perplexity: float
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    stopped_early: bool
    eval_metrics: _containers.ScalarMap[str, float]
    def __init__(self, train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., stopped_early: _Optional[bool] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("job_id", "adapter_id", "state", "queue_position", "create_time", "start_time", "end_time", "settings", "dataset_path", "examples", "data_sha256", "progress", "metrics", "error", "overwrite", "checkpoint_step", "checkpoint_failures", "resumed_from_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DATASET_PATH_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    adapter_id: str
    state: TrainingJobState
    queue_position: int
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    settings: TrainingSettings
    dataset_path: str
    examples: int
    data_sha256: str
    progress: TrainingProgress
    metrics: TrainingMetrics
    error: str
    overwrite: bool
    checkpoint_step: int
    checkpoint_failures: int
    resumed_from_step: int
    def __init__(self, job_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., state: _Optional[_Union[TrainingJobState, str]] = ..., queue_position: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settings: _Optional[_Union[TrainingSettings, _Mapping]] = ..., dataset_path: _Optional[str] = ..., examples: _Optional[int] = ..., data_sha256: _Optional[str] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., metrics: _Optional[_Union[TrainingMetrics, _Mapping]] = ..., error: _Optional[str] = ..., overwrite: _Optional[bool] = ..., checkpoint_step: _Optional[int] = ..., checkpoint_failures: _Optional[int] = ..., resumed_from_step: _Optional[int] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: TrainingJobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[TrainingJobState, str]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchTrainingJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: TrainingEvent
    def __init__(self, event: _Optional[_Union[TrainingEvent, _Mapping]] = ...) -> None: ...
