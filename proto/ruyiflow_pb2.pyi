from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_EDGE: _ClassVar[Tier]
    TIER_CLOUD: _ClassVar[Tier]

class HandoffMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HANDOFF_MODE_UNSPECIFIED: _ClassVar[HandoffMode]
    HANDOFF_MODE_AUTO: _ClassVar[HandoffMode]
    HANDOFF_MODE_HIDDEN: _ClassVar[HandoffMode]
    HANDOFF_MODE_TOKENS: _ClassVar[HandoffMode]

class HandoffReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HANDOFF_REASON_UNSPECIFIED: _ClassVar[HandoffReason]
    HANDOFF_REASON_LOW_CONFIDENCE: _ClassVar[HandoffReason]
    HANDOFF_REASON_FORCED: _ClassVar[HandoffReason]
    HANDOFF_REASON_NODE_FAILURE: _ClassVar[HandoffReason]
    HANDOFF_REASON_DRAIN: _ClassVar[HandoffReason]
    HANDOFF_REASON_GATE: _ClassVar[HandoffReason]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_HANDOFF: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
TIER_UNSPECIFIED: Tier
TIER_EDGE: Tier
TIER_CLOUD: Tier
HANDOFF_MODE_UNSPECIFIED: HandoffMode
HANDOFF_MODE_AUTO: HandoffMode
HANDOFF_MODE_HIDDEN: HandoffMode
HANDOFF_MODE_TOKENS: HandoffMode
HANDOFF_REASON_UNSPECIFIED: HandoffReason
HANDOFF_REASON_LOW_CONFIDENCE: HandoffReason
HANDOFF_REASON_FORCED: HandoffReason
HANDOFF_REASON_NODE_FAILURE: HandoffReason
HANDOFF_REASON_DRAIN: HandoffReason
HANDOFF_REASON_GATE: HandoffReason
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_HANDOFF: FinishReason
FINISH_REASON_CANCELLED: FinishReason
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "stop", "stop_token_ids", "seed", "min_p")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    min_p: float
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., no_repeat_ngram_size: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., min_p: _Optional[float] = ...) -> None: ...

class Overrides(_message.Message):
    __slots__ = ("exit", "tier", "node", "handoff_mode")
    EXIT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_MODE_FIELD_NUMBER: _ClassVar[int]
    exit: int
    tier: Tier
    node: str
    handoff_mode: HandoffMode
    def __init__(self, exit: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., node: _Optional[str] = ..., handoff_mode: _Optional[_Union[HandoffMode, str]] = ...) -> None: ...

class EscalationSettings(_message.Message):
    __slots__ = ("enabled", "window", "threshold", "force_after_tokens", "force_to_exit")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FORCE_AFTER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORCE_TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    window: int
    threshold: float
    force_after_tokens: int
    force_to_exit: int
    def __init__(self, enabled: _Optional[bool] = ..., window: _Optional[int] = ..., threshold: _Optional[float] = ..., force_after_tokens: _Optional[int] = ..., force_to_exit: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "conversation", "text", "token_ids", "sampling", "enable_thinking", "overrides", "escalation", "prefix_token_ids", "prefix_text", "resume")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ENABLE_THINKING_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    conversation: Conversation
    text: str
    token_ids: TokenIds
    sampling: SamplingParams
    enable_thinking: bool
    overrides: Overrides
    escalation: EscalationSettings
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_text: str
    resume: ResumeFrom
    def __init__(self, request_id: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., enable_thinking: _Optional[bool] = ..., overrides: _Optional[_Union[Overrides, _Mapping]] = ..., escalation: _Optional[_Union[EscalationSettings, _Mapping]] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., prefix_text: _Optional[str] = ..., resume: _Optional[_Union[ResumeFrom, _Mapping]] = ...) -> None: ...

class ResumeFrom(_message.Message):
    __slots__ = ("token_ids", "text", "resume_token")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    resume_token: bytes
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class TokenConfidence(_message.Message):
    __slots__ = ("max_prob", "margin", "entropy")
    MAX_PROB_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    max_prob: float
    margin: float
    entropy: float
    def __init__(self, max_prob: _Optional[float] = ..., margin: _Optional[float] = ..., entropy: _Optional[float] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("node", "tier", "exit")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    node: str
    tier: Tier
    exit: int
    def __init__(self, node: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., exit: _Optional[int] = ...) -> None: ...

class HandoffNeeded(_message.Message):
    __slots__ = ("from_exit", "suggested_to_exit", "reason", "state_handle", "state_bytes", "num_tokens", "model_fingerprint")
    FROM_EXIT_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    from_exit: int
    suggested_to_exit: int
    reason: HandoffReason
    state_handle: str
    state_bytes: int
    num_tokens: int
    model_fingerprint: str
    def __init__(self, from_exit: _Optional[int] = ..., suggested_to_exit: _Optional[int] = ..., reason: _Optional[_Union[HandoffReason, str]] = ..., state_handle: _Optional[str] = ..., state_bytes: _Optional[int] = ..., num_tokens: _Optional[int] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class RouteSpan(_message.Message):
    __slots__ = ("node", "tier", "exit", "num_tokens")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node: str
    tier: Tier
    exit: int
    num_tokens: int
    def __init__(self, node: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., exit: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class HandoffRecord(_message.Message):
    __slots__ = ("from_node", "to_node", "from_exit", "to_exit", "mode", "num_bytes", "duration_ms", "reason", "pushed")
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_FIELD_NUMBER: _ClassVar[int]
    FROM_EXIT_FIELD_NUMBER: _ClassVar[int]
    TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    from_node: str
    to_node: str
    from_exit: int
    to_exit: int
    mode: HandoffMode
    num_bytes: int
    duration_ms: float
    reason: HandoffReason
    pushed: bool
    def __init__(self, from_node: _Optional[str] = ..., to_node: _Optional[str] = ..., from_exit: _Optional[int] = ..., to_exit: _Optional[int] = ..., mode: _Optional[_Union[HandoffMode, str]] = ..., num_bytes: _Optional[int] = ..., duration_ms: _Optional[float] = ..., reason: _Optional[_Union[HandoffReason, str]] = ..., pushed: _Optional[bool] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "ttft_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    ttft_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GateCheck(_message.Message):
    __slots__ = ("node", "exit", "measure", "value", "threshold", "passed", "to_exit", "confidence", "skipped")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    node: str
    exit: int
    measure: str
    value: float
    threshold: float
    passed: bool
    to_exit: int
    confidence: TokenConfidence
    skipped: bool
    def __init__(self, node: _Optional[str] = ..., exit: _Optional[int] = ..., measure: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., passed: _Optional[bool] = ..., to_exit: _Optional[int] = ..., confidence: _Optional[_Union[TokenConfidence, _Mapping]] = ..., skipped: _Optional[bool] = ...) -> None: ...

class RouteTrace(_message.Message):
    __slots__ = ("spans", "handoffs", "difficulty", "timing", "num_retries", "gate", "deeper_for_load_from")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NUM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    DEEPER_FOR_LOAD_FROM_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[RouteSpan]
    handoffs: _containers.RepeatedCompositeFieldContainer[HandoffRecord]
    difficulty: float
    timing: Timing
    num_retries: int
    gate: _containers.RepeatedCompositeFieldContainer[GateCheck]
    deeper_for_load_from: int
    def __init__(self, spans: _Optional[_Iterable[_Union[RouteSpan, _Mapping]]] = ..., handoffs: _Optional[_Iterable[_Union[HandoffRecord, _Mapping]]] = ..., difficulty: _Optional[float] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., num_retries: _Optional[int] = ..., gate: _Optional[_Iterable[_Union[GateCheck, _Mapping]]] = ..., deeper_for_load_from: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "confidence", "source", "token_offset", "finish_reason", "handoff", "trace", "num_prompt_tokens", "gate", "resume_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    confidence: _containers.RepeatedCompositeFieldContainer[TokenConfidence]
    source: Source
    token_offset: int
    finish_reason: FinishReason
    handoff: HandoffNeeded
    trace: RouteTrace
    num_prompt_tokens: int
    gate: _containers.RepeatedCompositeFieldContainer[GateCheck]
    resume_token: bytes
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., confidence: _Optional[_Iterable[_Union[TokenConfidence, _Mapping]]] = ..., source: _Optional[_Union[Source, _Mapping]] = ..., token_offset: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., handoff: _Optional[_Union[HandoffNeeded, _Mapping]] = ..., trace: _Optional[_Union[RouteTrace, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., gate: _Optional[_Iterable[_Union[GateCheck, _Mapping]]] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "num_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    num_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class HandoffHeader(_message.Message):
    __slots__ = ("request_id", "mode", "model_fingerprint", "from_exit", "to_exit", "prompt_token_ids", "generated_token_ids", "tensors", "total_bytes", "request", "transfer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FROM_EXIT_FIELD_NUMBER: _ClassVar[int]
    TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: HandoffMode
    model_fingerprint: str
    from_exit: int
    to_exit: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    request: GenerateRequest
    transfer_id: str
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[_Union[HandoffMode, str]] = ..., model_fingerprint: _Optional[str] = ..., from_exit: _Optional[int] = ..., to_exit: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class StateBytes(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StateEnd(_message.Message):
    __slots__ = ("total_bytes", "crc32")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    crc32: int
    def __init__(self, total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: HandoffHeader
    data: StateBytes
    end: StateEnd
    def __init__(self, header: _Optional[_Union[HandoffHeader, _Mapping]] = ..., data: _Optional[_Union[StateBytes, _Mapping]] = ..., end: _Optional[_Union[StateEnd, _Mapping]] = ...) -> None: ...

class StateRef(_message.Message):
    __slots__ = ("state_handle", "mode", "to_exit")
    STATE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TO_EXIT_FIELD_NUMBER: _ClassVar[int]
    state_handle: str
    mode: HandoffMode
    to_exit: int
    def __init__(self, state_handle: _Optional[str] = ..., mode: _Optional[_Union[HandoffMode, str]] = ..., to_exit: _Optional[int] = ...) -> None: ...

class PushStateRequest(_message.Message):
    __slots__ = ("state", "destination", "transfer_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    state: StateRef
    destination: str
    transfer_id: str
    def __init__(self, state: _Optional[_Union[StateRef, _Mapping]] = ..., destination: _Optional[str] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class PushStateReply(_message.Message):
    __slots__ = ("num_bytes", "duration_ms")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    duration_ms: float
    def __init__(self, num_bytes: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class AcceptStateReply(_message.Message):
    __slots__ = ("transfer_id", "num_bytes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    num_bytes: int
    def __init__(self, transfer_id: _Optional[str] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_batch", "max_context")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_context: int
    def __init__(self, max_batch: _Optional[int] = ..., max_context: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running", "queued", "outstanding_tokens")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    outstanding_tokens: int
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., outstanding_tokens: _Optional[int] = ...) -> None: ...

class ModelShape(_message.Message):
    __slots__ = ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "dtype_bytes")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    def __init__(self, num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype_bytes: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "tier", "model", "model_fingerprint", "family", "exits", "capacity", "load", "shape", "prefill_tokens_per_s", "backend", "draining", "confidence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: Tier
    model: str
    model_fingerprint: str
    family: str
    exits: _containers.RepeatedScalarFieldContainer[int]
    capacity: Capacity
    load: Load
    shape: ModelShape
    prefill_tokens_per_s: float
    backend: str
    draining: bool
    confidence: str
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., family: _Optional[str] = ..., exits: _Optional[_Iterable[int]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., shape: _Optional[_Union[ModelShape, _Mapping]] = ..., prefill_tokens_per_s: _Optional[float] = ..., backend: _Optional[str] = ..., draining: _Optional[bool] = ..., confidence: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_seconds", "undo")
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: float
    undo: bool
    def __init__(self, grace_seconds: _Optional[float] = ..., undo: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("num_in_flight",)
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    num_in_flight: int
    def __init__(self, num_in_flight: _Optional[int] = ...) -> None: ...

class RouteReply(_message.Message):
    __slots__ = ("difficulty", "tier", "exit", "node", "node_address")
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    difficulty: float
    tier: Tier
    exit: int
    node: str
    node_address: str
    def __init__(self, difficulty: _Optional[float] = ..., tier: _Optional[_Union[Tier, str]] = ..., exit: _Optional[int] = ..., node: _Optional[str] = ..., node_address: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "address", "healthy", "info", "last_seen_ms_ago")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    healthy: bool
    info: NodeInfo
    last_seen_ms_ago: float
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., info: _Optional[_Union[NodeInfo, _Mapping]] = ..., last_seen_ms_ago: _Optional[float] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...
