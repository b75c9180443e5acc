import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_HELD: _ClassVar[HoldState]
    HOLD_STATE_ENDED_BY_CLIENT: _ClassVar[HoldState]
    HOLD_STATE_LEASE_EXPIRED: _ClassVar[HoldState]
    HOLD_STATE_CLIENT_GONE: _ClassVar[HoldState]
    HOLD_STATE_VM_DESTROYED: _ClassVar[HoldState]
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_HELD: HoldState
HOLD_STATE_ENDED_BY_CLIENT: HoldState
HOLD_STATE_LEASE_EXPIRED: HoldState
HOLD_STATE_CLIENT_GONE: HoldState
HOLD_STATE_VM_DESTROYED: HoldState

class HeldInvalidation(_message.Message):
    __slots__ = ("id", "start", "end", "state", "lease")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    end: int
    state: HoldState
    lease: _duration_pb2.Duration
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class BeginInvalidationRequest(_message.Message):
    __slots__ = ("vm_id", "start", "end", "lease")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    start: int
    end: int
    lease: _duration_pb2.Duration
    def __init__(self, vm_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class BeginInvalidationResponse(_message.Message):
    __slots__ = ("invalidation_id",)
    INVALIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    invalidation_id: int
    def __init__(self, invalidation_id: _Optional[int] = ...) -> None: ...

class EndInvalidationRequest(_message.Message):
    __slots__ = ("vm_id", "invalidation_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    INVALIDATION_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    invalidation_id: int
    def __init__(self, vm_id: _Optional[int] = ..., invalidation_id: _Optional[int] = ...) -> None: ...

class EndInvalidationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HoldInvalidationRequest(_message.Message):
    __slots__ = ("vm_id", "start", "end")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    start: int
    end: int
    def __init__(self, vm_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class HoldInvalidationResponse(_message.Message):
    __slots__ = ("invalidation",)
    INVALIDATION_FIELD_NUMBER: _ClassVar[int]
    invalidation: HeldInvalidation
    def __init__(self, invalidation: _Optional[_Union[HeldInvalidation, _Mapping]] = ...) -> None: ...

class ListInvalidationsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ListInvalidationsResponse(_message.Message):
    __slots__ = ("held", "ended")
    HELD_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedCompositeFieldContainer[HeldInvalidation]
    ended: _containers.RepeatedCompositeFieldContainer[HeldInvalidation]
    def __init__(self, held: _Optional[_Iterable[_Union[HeldInvalidation, _Mapping]]] = ..., ended: _Optional[_Iterable[_Union[HeldInvalidation, _Mapping]]] = ...) -> None: ...
