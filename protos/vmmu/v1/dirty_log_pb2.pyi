from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetDirtyLogRequest(_message.Message):
    __slots__ = ("vm_id", "slot")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    slot: int
    def __init__(self, vm_id: _Optional[int] = ..., slot: _Optional[int] = ...) -> None: ...

class GetDirtyLogResponse(_message.Message):
    __slots__ = ("bitmap",)
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    bitmap: bytes
    def __init__(self, bitmap: _Optional[bytes] = ...) -> None: ...

class ClearDirtyLogRequest(_message.Message):
    __slots__ = ("vm_id", "slot", "first_page", "num_pages", "bitmap")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    slot: int
    first_page: int
    num_pages: int
    bitmap: bytes
    def __init__(self, vm_id: _Optional[int] = ..., slot: _Optional[int] = ..., first_page: _Optional[int] = ..., num_pages: _Optional[int] = ..., bitmap: _Optional[bytes] = ...) -> None: ...

class ClearDirtyLogResponse(_message.Message):
    __slots__ = ("pages_cleared",)
    PAGES_CLEARED_FIELD_NUMBER: _ClassVar[int]
    pages_cleared: int
    def __init__(self, pages_cleared: _Optional[int] = ...) -> None: ...

class DirtyGfn(_message.Message):
    __slots__ = ("slot", "offset")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    slot: int
    offset: int
    def __init__(self, slot: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class HarvestDirtyRingRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    vcpu_id: int
    def __init__(self, vm_id: _Optional[int] = ..., vcpu_id: _Optional[int] = ...) -> None: ...

class HarvestDirtyRingResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DirtyGfn]
    def __init__(self, entries: _Optional[_Iterable[_Union[DirtyGfn, _Mapping]]] = ...) -> None: ...

class ResetDirtyRingsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ResetDirtyRingsResponse(_message.Message):
    __slots__ = ("entries_reset",)
    ENTRIES_RESET_FIELD_NUMBER: _ClassVar[int]
    entries_reset: int
    def __init__(self, entries_reset: _Optional[int] = ...) -> None: ...
