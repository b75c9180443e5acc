from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuestMemfdBinding(_message.Message):
    __slots__ = ("slot", "offset", "size")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    offset: int
    size: int
    def __init__(self, slot: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class GuestMemfd(_message.Message):
    __slots__ = ("fd", "size", "flags", "pages", "bindings")
    FD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    fd: int
    size: int
    flags: int
    pages: int
    bindings: _containers.RepeatedCompositeFieldContainer[GuestMemfdBinding]
    def __init__(self, fd: _Optional[int] = ..., size: _Optional[int] = ..., flags: _Optional[int] = ..., pages: _Optional[int] = ..., bindings: _Optional[_Iterable[_Union[GuestMemfdBinding, _Mapping]]] = ...) -> None: ...

class CreateGuestMemfdRequest(_message.Message):
    __slots__ = ("vm_id", "size", "flags")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    size: int
    flags: int
    def __init__(self, vm_id: _Optional[int] = ..., size: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class CreateGuestMemfdResponse(_message.Message):
    __slots__ = ("guest_memfd",)
    GUEST_MEMFD_FIELD_NUMBER: _ClassVar[int]
    guest_memfd: GuestMemfd
    def __init__(self, guest_memfd: _Optional[_Union[GuestMemfd, _Mapping]] = ...) -> None: ...

class FallocateGuestMemfdRequest(_message.Message):
    __slots__ = ("vm_id", "fd", "mode", "offset", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    fd: int
    mode: int
    offset: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., fd: _Optional[int] = ..., mode: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FallocateGuestMemfdResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGuestMemfdsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ListGuestMemfdsResponse(_message.Message):
    __slots__ = ("guest_memfds",)
    GUEST_MEMFDS_FIELD_NUMBER: _ClassVar[int]
    guest_memfds: _containers.RepeatedCompositeFieldContainer[GuestMemfd]
    def __init__(self, guest_memfds: _Optional[_Iterable[_Union[GuestMemfd, _Mapping]]] = ...) -> None: ...

class SetMemoryAttributesRequest(_message.Message):
    __slots__ = ("vm_id", "address", "size", "attributes", "flags")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    address: int
    size: int
    attributes: int
    flags: int
    def __init__(self, vm_id: _Optional[int] = ..., address: _Optional[int] = ..., size: _Optional[int] = ..., attributes: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class SetMemoryAttributesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPrivateRangesRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class GpaRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ListPrivateRangesResponse(_message.Message):
    __slots__ = ("ranges",)
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[GpaRange]
    def __init__(self, ranges: _Optional[_Iterable[_Union[GpaRange, _Mapping]]] = ...) -> None: ...
