from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExitReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXIT_REASON_UNSPECIFIED: _ClassVar[ExitReason]
    EXIT_REASON_DONE: _ClassVar[ExitReason]
    EXIT_REASON_MMIO: _ClassVar[ExitReason]
    EXIT_REASON_MEMORY_FAULT: _ClassVar[ExitReason]
    EXIT_REASON_INTERNAL_ERROR: _ClassVar[ExitReason]
    EXIT_REASON_DIRTY_RING_FULL: _ClassVar[ExitReason]
    EXIT_REASON_HLT: _ClassVar[ExitReason]
EXIT_REASON_UNSPECIFIED: ExitReason
EXIT_REASON_DONE: ExitReason
EXIT_REASON_MMIO: ExitReason
EXIT_REASON_MEMORY_FAULT: ExitReason
EXIT_REASON_INTERNAL_ERROR: ExitReason
EXIT_REASON_DIRTY_RING_FULL: ExitReason
EXIT_REASON_HLT: ExitReason

class AccessBatch(_message.Message):
    __slots__ = ("gpas", "ops", "write_data")
    GPAS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    WRITE_DATA_FIELD_NUMBER: _ClassVar[int]
    gpas: bytes
    ops: bytes
    write_data: bytes
    def __init__(self, gpas: _Optional[bytes] = ..., ops: _Optional[bytes] = ..., write_data: _Optional[bytes] = ...) -> None: ...

class MmioCompletion(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Exit(_message.Message):
    __slots__ = ("reason", "gpa", "length", "is_write", "data", "errno", "message", "suberror", "flags")
    REASON_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    IS_WRITE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBERROR_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    reason: ExitReason
    gpa: int
    length: int
    is_write: bool
    data: bytes
    errno: int
    message: str
    suberror: int
    flags: int
    def __init__(self, reason: _Optional[_Union[ExitReason, str]] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ..., is_write: _Optional[bool] = ..., data: _Optional[bytes] = ..., errno: _Optional[int] = ..., message: _Optional[str] = ..., suberror: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("completed", "exit", "read_data", "start_ns", "end_ns")
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    READ_DATA_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    completed: int
    exit: Exit
    read_data: bytes
    start_ns: int
    end_ns: int
    def __init__(self, completed: _Optional[int] = ..., exit: _Optional[_Union[Exit, _Mapping]] = ..., read_data: _Optional[bytes] = ..., start_ns: _Optional[int] = ..., end_ns: _Optional[int] = ...) -> None: ...

class VcpuInfo(_message.Message):
    __slots__ = ("id", "running", "mmio_pending")
    ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MMIO_PENDING_FIELD_NUMBER: _ClassVar[int]
    id: int
    running: bool
    mmio_pending: bool
    def __init__(self, id: _Optional[int] = ..., running: _Optional[bool] = ..., mmio_pending: _Optional[bool] = ...) -> None: ...

class CreateVcpuRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ...) -> None: ...

class CreateVcpuResponse(_message.Message):
    __slots__ = ("vcpu",)
    VCPU_FIELD_NUMBER: _ClassVar[int]
    vcpu: VcpuInfo
    def __init__(self, vcpu: _Optional[_Union[VcpuInfo, _Mapping]] = ...) -> None: ...

class GetVcpuRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ...) -> None: ...

class GetVcpuResponse(_message.Message):
    __slots__ = ("vcpu",)
    VCPU_FIELD_NUMBER: _ClassVar[int]
    vcpu: VcpuInfo
    def __init__(self, vcpu: _Optional[_Union[VcpuInfo, _Mapping]] = ...) -> None: ...

class GetVcpuStatsRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ...) -> None: ...

class GetVcpuStatsResponse(_message.Message):
    __slots__ = ("stats",)
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.ScalarMap[str, int]
    def __init__(self, stats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id", "batch", "mmio_completion", "resume", "start_ns")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MMIO_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    batch: AccessBatch
    mmio_completion: MmioCompletion
    resume: Resume
    start_ns: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ..., batch: _Optional[_Union[AccessBatch, _Mapping]] = ..., mmio_completion: _Optional[_Union[MmioCompletion, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., start_ns: _Optional[int] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: RunResult
    error: StepError
    def __init__(self, result: _Optional[_Union[RunResult, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class RunBatchRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id", "batch", "mmio_completion", "resume", "start_ns")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MMIO_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    batch: AccessBatch
    mmio_completion: MmioCompletion
    resume: Resume
    start_ns: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ..., batch: _Optional[_Union[AccessBatch, _Mapping]] = ..., mmio_completion: _Optional[_Union[MmioCompletion, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., start_ns: _Optional[int] = ...) -> None: ...

class RunBatchResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: RunResult
    def __init__(self, result: _Optional[_Union[RunResult, _Mapping]] = ...) -> None: ...
