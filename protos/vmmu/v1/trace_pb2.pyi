from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TraceRequest(_message.Message):
    __slots__ = ("vm_ids", "events", "capacity")
    VM_IDS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    vm_ids: _containers.RepeatedScalarFieldContainer[int]
    events: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    def __init__(self, vm_ids: _Optional[_Iterable[int]] = ..., events: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ...) -> None: ...

class TraceValue(_message.Message):
    __slots__ = ("uint_value", "int_value", "string_value", "bool_value")
    UINT_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    uint_value: int
    int_value: int
    string_value: str
    bool_value: bool
    def __init__(self, uint_value: _Optional[int] = ..., int_value: _Optional[int] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class TraceEvent(_message.Message):
    __slots__ = ("seq", "time_ns", "vm_id", "event", "fields", "dropped_before", "virtual_ns")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TraceValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TraceValue, _Mapping]] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_NS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_ns: int
    vm_id: int
    event: str
    fields: _containers.MessageMap[str, TraceValue]
    dropped_before: int
    virtual_ns: int
    def __init__(self, seq: _Optional[int] = ..., time_ns: _Optional[int] = ..., vm_id: _Optional[int] = ..., event: _Optional[str] = ..., fields: _Optional[_Mapping[str, TraceValue]] = ..., dropped_before: _Optional[int] = ..., virtual_ns: _Optional[int] = ...) -> None: ...

class TraceResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: TraceEvent
    def __init__(self, event: _Optional[_Union[TraceEvent, _Mapping]] = ...) -> None: ...
