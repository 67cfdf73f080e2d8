from alignedserve.common.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "max_model_len", "vocab_size", "eos_token_ids", "kv_layout", "num_device_blocks", "device", "weight_bytes", "decode_kernel_cost", "prefill_device", "num_prefill_blocks", "num_prefill_decode_blocks", "ridge_flops_per_byte", "loading", "load_seconds", "warm_up_seconds", "kernel_cache_entries")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_KERNEL_COST_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RIDGE_FLOPS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WARM_UP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    kv_layout: _common_pb2.KVLayout
    num_device_blocks: int
    device: str
    weight_bytes: int
    decode_kernel_cost: str
    prefill_device: str
    num_prefill_blocks: int
    num_prefill_decode_blocks: int
    ridge_flops_per_byte: int
    loading: bool
    load_seconds: float
    warm_up_seconds: float
    kernel_cache_entries: int
    def __init__(self, model_name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., num_device_blocks: _Optional[int] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., decode_kernel_cost: _Optional[str] = ..., prefill_device: _Optional[str] = ..., num_prefill_blocks: _Optional[int] = ..., num_prefill_decode_blocks: _Optional[int] = ..., ridge_flops_per_byte: _Optional[int] = ..., loading: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., warm_up_seconds: _Optional[float] = ..., kernel_cache_entries: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("pool_name", "num_pool_blocks", "kv_layout", "mirror_only")
    POOL_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MIRROR_ONLY_FIELD_NUMBER: _ClassVar[int]
    pool_name: str
    num_pool_blocks: int
    kv_layout: _common_pb2.KVLayout
    mirror_only: bool
    def __init__(self, pool_name: _Optional[str] = ..., num_pool_blocks: _Optional[int] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., mirror_only: _Optional[bool] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadEntry(_message.Message):
    __slots__ = ("request_id", "pool_blocks", "num_kv_tokens", "on_prefill_device")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ON_PREFILL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pool_blocks: _containers.RepeatedScalarFieldContainer[int]
    num_kv_tokens: int
    on_prefill_device: bool
    def __init__(self, request_id: _Optional[str] = ..., pool_blocks: _Optional[_Iterable[int]] = ..., num_kv_tokens: _Optional[int] = ..., on_prefill_device: _Optional[bool] = ...) -> None: ...

class PrefillChunk(_message.Message):
    __slots__ = ("request_id", "token_ids", "num_cached_tokens", "pool_blocks", "params", "sample", "keep_resident", "on_prefill_device")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    ON_PREFILL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    pool_blocks: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    sample: bool
    keep_resident: bool
    on_prefill_device: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., pool_blocks: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., sample: _Optional[bool] = ..., keep_resident: _Optional[bool] = ..., on_prefill_device: _Optional[bool] = ...) -> None: ...

class DecodeEntry(_message.Message):
    __slots__ = ("request_id", "token_id", "num_kv_tokens", "params", "last_sampled", "on_prefill_device")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LAST_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    ON_PREFILL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    num_kv_tokens: int
    params: _common_pb2.SamplingParams
    last_sampled: bool
    on_prefill_device: bool
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., num_kv_tokens: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., last_sampled: _Optional[bool] = ..., on_prefill_device: _Optional[bool] = ...) -> None: ...

class EvictEntry(_message.Message):
    __slots__ = ("request_id", "pool_blocks", "on_prefill_device")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ON_PREFILL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pool_blocks: _containers.RepeatedScalarFieldContainer[int]
    on_prefill_device: bool
    def __init__(self, request_id: _Optional[str] = ..., pool_blocks: _Optional[_Iterable[int]] = ..., on_prefill_device: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step", "release", "load", "prefill", "decode", "evict", "wait_prefill")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    WAIT_PREFILL_FIELD_NUMBER: _ClassVar[int]
    step: int
    release: _containers.RepeatedScalarFieldContainer[str]
    load: _containers.RepeatedCompositeFieldContainer[LoadEntry]
    prefill: _containers.RepeatedCompositeFieldContainer[PrefillChunk]
    decode: _containers.RepeatedCompositeFieldContainer[DecodeEntry]
    evict: _containers.RepeatedCompositeFieldContainer[EvictEntry]
    wait_prefill: bool
    def __init__(self, step: _Optional[int] = ..., release: _Optional[_Iterable[str]] = ..., load: _Optional[_Iterable[_Union[LoadEntry, _Mapping]]] = ..., prefill: _Optional[_Iterable[_Union[PrefillChunk, _Mapping]]] = ..., decode: _Optional[_Iterable[_Union[DecodeEntry, _Mapping]]] = ..., evict: _Optional[_Iterable[_Union[EvictEntry, _Mapping]]] = ..., wait_prefill: _Optional[bool] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("request_id", "token_id", "logprob")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    logprob: float
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step", "tokens", "compute_s", "second_compute_s", "load_s", "copying", "prefilled", "prefill_s", "launch_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    SECOND_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    COPYING_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    compute_s: float
    second_compute_s: float
    load_s: float
    copying: _containers.RepeatedScalarFieldContainer[str]
    prefilled: _containers.RepeatedScalarFieldContainer[str]
    prefill_s: float
    launch_s: float
    def __init__(self, step: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., compute_s: _Optional[float] = ..., second_compute_s: _Optional[float] = ..., load_s: _Optional[float] = ..., copying: _Optional[_Iterable[str]] = ..., prefilled: _Optional[_Iterable[str]] = ..., prefill_s: _Optional[float] = ..., launch_s: _Optional[float] = ...) -> None: ...
