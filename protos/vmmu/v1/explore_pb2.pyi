from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scenario(_message.Message):
    __slots__ = ("name", "summary", "knobs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    knobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., knobs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListScenariosRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListScenariosResponse(_message.Message):
    __slots__ = ("scenarios",)
    SCENARIOS_FIELD_NUMBER: _ClassVar[int]
    scenarios: _containers.RepeatedCompositeFieldContainer[Scenario]
    def __init__(self, scenarios: _Optional[_Iterable[_Union[Scenario, _Mapping]]] = ...) -> None: ...

class ExploreRequest(_message.Message):
    __slots__ = ("scenario", "seeds", "first_seed", "knobs", "progress_every", "workers", "ray", "ray_address")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEED_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RAY_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    seeds: int
    first_seed: int
    knobs: _containers.RepeatedScalarFieldContainer[str]
    progress_every: int
    workers: int
    ray: bool
    ray_address: str
    def __init__(self, scenario: _Optional[str] = ..., seeds: _Optional[int] = ..., first_seed: _Optional[int] = ..., knobs: _Optional[_Iterable[str]] = ..., progress_every: _Optional[int] = ..., workers: _Optional[int] = ..., ray: _Optional[bool] = ..., ray_address: _Optional[str] = ...) -> None: ...

class SeedOutcome(_message.Message):
    __slots__ = ("seed", "violation", "oracle", "gfn", "trace", "points")
    SEED_FIELD_NUMBER: _ClassVar[int]
    VIOLATION_FIELD_NUMBER: _ClassVar[int]
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    GFN_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    violation: str
    oracle: str
    gfn: int
    trace: str
    points: int
    def __init__(self, seed: _Optional[int] = ..., violation: _Optional[str] = ..., oracle: _Optional[str] = ..., gfn: _Optional[int] = ..., trace: _Optional[str] = ..., points: _Optional[int] = ...) -> None: ...

class ExploreResponse(_message.Message):
    __slots__ = ("seeds_run", "done", "first_violation", "workers_lost")
    SEEDS_RUN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FIRST_VIOLATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_LOST_FIELD_NUMBER: _ClassVar[int]
    seeds_run: int
    done: bool
    first_violation: SeedOutcome
    workers_lost: int
    def __init__(self, seeds_run: _Optional[int] = ..., done: _Optional[bool] = ..., first_violation: _Optional[_Union[SeedOutcome, _Mapping]] = ..., workers_lost: _Optional[int] = ...) -> None: ...
