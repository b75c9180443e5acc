from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Memslot(_message.Message):
    __slots__ = ("as_id", "id", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd", "guest_memfd_offset")
    AS_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    GUEST_PHYS_ADDR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    USERSPACE_ADDR_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMFD_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMFD_OFFSET_FIELD_NUMBER: _ClassVar[int]
    as_id: int
    id: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int
    guest_memfd_offset: int
    def __init__(self, as_id: _Optional[int] = ..., id: _Optional[int] = ..., flags: _Optional[int] = ..., guest_phys_addr: _Optional[int] = ..., memory_size: _Optional[int] = ..., userspace_addr: _Optional[int] = ..., guest_memfd: _Optional[int] = ..., guest_memfd_offset: _Optional[int] = ...) -> None: ...

class SetUserMemoryRegionRequest(_message.Message):
    __slots__ = ("vm_id", "slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd", "guest_memfd_offset")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    GUEST_PHYS_ADDR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    USERSPACE_ADDR_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMFD_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMFD_OFFSET_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd: int
    guest_memfd_offset: int
    def __init__(self, vm_id: _Optional[int] = ..., slot: _Optional[int] = ..., flags: _Optional[int] = ..., guest_phys_addr: _Optional[int] = ..., memory_size: _Optional[int] = ..., userspace_addr: _Optional[int] = ..., guest_memfd: _Optional[int] = ..., guest_memfd_offset: _Optional[int] = ...) -> None: ...

class SetUserMemoryRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMemslotsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ListMemslotsResponse(_message.Message):
    __slots__ = ("memslots",)
    MEMSLOTS_FIELD_NUMBER: _ClassVar[int]
    memslots: _containers.RepeatedCompositeFieldContainer[Memslot]
    def __init__(self, memslots: _Optional[_Iterable[_Union[Memslot, _Mapping]]] = ...) -> None: ...
