from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKING_UNSPECIFIED: _ClassVar[Backing]
    BACKING_PAGE_4K: _ClassVar[Backing]
    BACKING_THP: _ClassVar[Backing]
    BACKING_HUGETLB_1G: _ClassVar[Backing]

class Advice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVICE_UNSPECIFIED: _ClassVar[Advice]
    ADVICE_DONTNEED: _ClassVar[Advice]
    ADVICE_POPULATE_WRITE: _ClassVar[Advice]

class Protection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTECTION_UNSPECIFIED: _ClassVar[Protection]
    PROTECTION_NONE: _ClassVar[Protection]
    PROTECTION_READ: _ClassVar[Protection]
    PROTECTION_READ_WRITE: _ClassVar[Protection]
BACKING_UNSPECIFIED: Backing
BACKING_PAGE_4K: Backing
BACKING_THP: Backing
BACKING_HUGETLB_1G: Backing
ADVICE_UNSPECIFIED: Advice
ADVICE_DONTNEED: Advice
ADVICE_POPULATE_WRITE: Advice
PROTECTION_UNSPECIFIED: Protection
PROTECTION_NONE: Protection
PROTECTION_READ: Protection
PROTECTION_READ_WRITE: Protection

class HostRegion(_message.Message):
    __slots__ = ("hva", "size", "backing", "read_only", "populated_4k_pages", "zero_pages")
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    POPULATED_4K_PAGES_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    hva: int
    size: int
    backing: Backing
    read_only: bool
    populated_4k_pages: int
    zero_pages: int
    def __init__(self, hva: _Optional[int] = ..., size: _Optional[int] = ..., backing: _Optional[_Union[Backing, str]] = ..., read_only: _Optional[bool] = ..., populated_4k_pages: _Optional[int] = ..., zero_pages: _Optional[int] = ...) -> None: ...

class CreateRegionRequest(_message.Message):
    __slots__ = ("vm_id", "size", "backing", "read_only", "hva")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    size: int
    backing: Backing
    read_only: bool
    hva: int
    def __init__(self, vm_id: _Optional[int] = ..., size: _Optional[int] = ..., backing: _Optional[_Union[Backing, str]] = ..., read_only: _Optional[bool] = ..., hva: _Optional[int] = ...) -> None: ...

class CreateRegionResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: HostRegion
    def __init__(self, region: _Optional[_Union[HostRegion, _Mapping]] = ...) -> None: ...

class DestroyRegionRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "size")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    size: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class DestroyRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegionsRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    def __init__(self, vm_id: _Optional[int] = ...) -> None: ...

class ListRegionsResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[HostRegion]
    def __init__(self, regions: _Optional[_Iterable[_Union[HostRegion, _Mapping]]] = ...) -> None: ...

class ReadHvaRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "length")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    length: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadHvaResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class WriteHvaRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "data")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    data: bytes
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteHvaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MadviseRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "size", "advice")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    size: int
    advice: Advice
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., size: _Optional[int] = ..., advice: _Optional[_Union[Advice, str]] = ...) -> None: ...

class MadviseResponse(_message.Message):
    __slots__ = ("pages_populated",)
    PAGES_POPULATED_FIELD_NUMBER: _ClassVar[int]
    pages_populated: int
    def __init__(self, pages_populated: _Optional[int] = ...) -> None: ...

class MigratePagesRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "size")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    size: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class MigratePagesResponse(_message.Message):
    __slots__ = ("pages_migrated",)
    PAGES_MIGRATED_FIELD_NUMBER: _ClassVar[int]
    pages_migrated: int
    def __init__(self, pages_migrated: _Optional[int] = ...) -> None: ...

class SwapOutRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "size")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    size: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SwapOutResponse(_message.Message):
    __slots__ = ("pages_swapped",)
    PAGES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    pages_swapped: int
    def __init__(self, pages_swapped: _Optional[int] = ...) -> None: ...

class MprotectRequest(_message.Message):
    __slots__ = ("vm_id", "hva", "size", "protection")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    size: int
    protection: Protection
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ..., size: _Optional[int] = ..., protection: _Optional[_Union[Protection, str]] = ...) -> None: ...

class MprotectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KsmMergeRequest(_message.Message):
    __slots__ = ("vm_id", "hvas")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVAS_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hvas: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vm_id: _Optional[int] = ..., hvas: _Optional[_Iterable[int]] = ...) -> None: ...

class KsmMergeResponse(_message.Message):
    __slots__ = ("pages_merged",)
    PAGES_MERGED_FIELD_NUMBER: _ClassVar[int]
    pages_merged: int
    def __init__(self, pages_merged: _Optional[int] = ...) -> None: ...

class ThpSplitRequest(_message.Message):
    __slots__ = ("vm_id", "hva")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ...) -> None: ...

class ThpSplitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ThpCollapseRequest(_message.Message):
    __slots__ = ("vm_id", "hva")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    HVA_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    hva: int
    def __init__(self, vm_id: _Optional[int] = ..., hva: _Optional[int] = ...) -> None: ...

class ThpCollapseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearYoungRequest(_message.Message):
    __slots__ = ("vm_id", "start", "end", "fast_only")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FAST_ONLY_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    start: int
    end: int
    fast_only: bool
    def __init__(self, vm_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., fast_only: _Optional[bool] = ...) -> None: ...

class ClearYoungResponse(_message.Message):
    __slots__ = ("young",)
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    young: bool
    def __init__(self, young: _Optional[bool] = ...) -> None: ...

class ClearFlushYoungRequest(_message.Message):
    __slots__ = ("vm_id", "start", "end")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    start: int
    end: int
    def __init__(self, vm_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ClearFlushYoungResponse(_message.Message):
    __slots__ = ("young",)
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    young: bool
    def __init__(self, young: _Optional[bool] = ...) -> None: ...

class TestYoungRequest(_message.Message):
    __slots__ = ("vm_id", "start", "end")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    vm_id: int
    start: int
    end: int
    def __init__(self, vm_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TestYoungResponse(_message.Message):
    __slots__ = ("young", "young_bitmap")
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    YOUNG_BITMAP_FIELD_NUMBER: _ClassVar[int]
    young: bool
    young_bitmap: bytes
    def __init__(self, young: _Optional[bool] = ..., young_bitmap: _Optional[bytes] = ...) -> None: ...
