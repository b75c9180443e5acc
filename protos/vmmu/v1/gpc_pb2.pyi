from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpcState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPC_STATE_UNSPECIFIED: _ClassVar[GpcState]
    GPC_STATE_INACTIVE: _ClassVar[GpcState]
    GPC_STATE_ACTIVE_INVALID: _ClassVar[GpcState]
    GPC_STATE_ACTIVE_VALID: _ClassVar[GpcState]
GPC_STATE_UNSPECIFIED: GpcState
GPC_STATE_INACTIVE: GpcState
GPC_STATE_ACTIVE_INVALID: GpcState
GPC_STATE_ACTIVE_VALID: GpcState

class Gpc(_message.Message):
    __slots__ = ("id", "gpa", "uhva", "pfn", "state", "active", "valid", "generation", "refreshes", "retries", "wait_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    UHVA_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REFRESHES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    id: int
    gpa: int
    uhva: int
    pfn: int
    state: GpcState
    active: bool
    valid: bool
    generation: int
    refreshes: int
    retries: int
    wait_ns: int
    def __init__(self, id: _Optional[int] = ..., gpa: _Optional[int] = ..., uhva: _Optional[int] = ..., pfn: _Optional[int] = ..., state: _Optional[_Union[GpcState, str]] = ..., active: _Optional[bool] = ..., valid: _Optional[bool] = ..., generation: _Optional[int] = ..., refreshes: _Optional[int] = ..., retries: _Optional[int] = ..., wait_ns: _Optional[int] = ...) -> None: ...

class CreateGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpa", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpa: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., gpa: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class CreateGpcResponse(_message.Message):
    __slots__ = ("gpc",)
    GPC_FIELD_NUMBER: _ClassVar[int]
    gpc: Gpc
    def __init__(self, gpc: _Optional[_Union[Gpc, _Mapping]] = ...) -> None: ...

class CheckGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpc_id", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPC_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpc_id: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., gpc_id: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class CheckGpcResponse(_message.Message):
    __slots__ = ("usable",)
    USABLE_FIELD_NUMBER: _ClassVar[int]
    usable: bool
    def __init__(self, usable: _Optional[bool] = ...) -> None: ...

class RefreshGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpc_id", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPC_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpc_id: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., gpc_id: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class RefreshGpcResponse(_message.Message):
    __slots__ = ("gpc",)
    GPC_FIELD_NUMBER: _ClassVar[int]
    gpc: Gpc
    def __init__(self, gpc: _Optional[_Union[Gpc, _Mapping]] = ...) -> None: ...

class ReadGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpc_id", "offset", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPC_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpc_id: int
    offset: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., gpc_id: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadGpcResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class WriteGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpc_id", "offset", "data")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPC_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpc_id: int
    offset: int
    data: bytes
    def __init__(self, vm_id: _Optional[int] = ..., gpc_id: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteGpcResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeactivateGpcRequest(_message.Message):
    __slots__ = ("vm_id", "gpc_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GPC_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    gpc_id: int
    def __init__(self, vm_id: _Optional[int] = ..., gpc_id: _Optional[int] = ...) -> None: ...

class DeactivateGpcResponse(_message.Message):
    __slots__ = ("gpc",)
    GPC_FIELD_NUMBER: _ClassVar[int]
    gpc: Gpc
    def __init__(self, gpc: _Optional[_Union[Gpc, _Mapping]] = ...) -> None: ...

class ListGpcsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ListGpcsResponse(_message.Message):
    __slots__ = ("gpcs",)
    GPCS_FIELD_NUMBER: _ClassVar[int]
    gpcs: _containers.RepeatedCompositeFieldContainer[Gpc]
    def __init__(self, gpcs: _Optional[_Iterable[_Union[Gpc, _Mapping]]] = ...) -> None: ...
