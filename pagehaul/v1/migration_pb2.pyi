from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tracker(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACKER_UNSPECIFIED: _ClassVar[Tracker]
    TRACKER_NONE: _ClassVar[Tracker]
    TRACKER_UFFD_WP: _ClassVar[Tracker]
    TRACKER_SOFT_DIRTY_PAGEMAP: _ClassVar[Tracker]
    TRACKER_SOFT_DIRTY_SCAN: _ClassVar[Tracker]
    TRACKER_HASH: _ClassVar[Tracker]

class VmaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VMA_KIND_UNSPECIFIED: _ClassVar[VmaKind]
    VMA_KIND_ANON: _ClassVar[VmaKind]
    VMA_KIND_HEAP: _ClassVar[VmaKind]
    VMA_KIND_STACK: _ClassVar[VmaKind]
    VMA_KIND_FILE_PRIVATE: _ClassVar[VmaKind]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class HoleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLE_KIND_UNSPECIFIED: _ClassVar[HoleKind]
    HOLE_KIND_ZERO: _ClassVar[HoleKind]
    HOLE_KIND_PARENT: _ClassVar[HoleKind]

class ImageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_KIND_UNSPECIFIED: _ClassVar[ImageKind]
    IMAGE_KIND_PROCESS: _ClassVar[ImageKind]
    IMAGE_KIND_SHMEM: _ClassVar[ImageKind]
TRACKER_UNSPECIFIED: Tracker
TRACKER_NONE: Tracker
TRACKER_UFFD_WP: Tracker
TRACKER_SOFT_DIRTY_PAGEMAP: Tracker
TRACKER_SOFT_DIRTY_SCAN: Tracker
TRACKER_HASH: Tracker
VMA_KIND_UNSPECIFIED: VmaKind
VMA_KIND_ANON: VmaKind
VMA_KIND_HEAP: VmaKind
VMA_KIND_STACK: VmaKind
VMA_KIND_FILE_PRIVATE: VmaKind
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
HOLE_KIND_UNSPECIFIED: HoleKind
HOLE_KIND_ZERO: HoleKind
HOLE_KIND_PARENT: HoleKind
IMAGE_KIND_UNSPECIFIED: ImageKind
IMAGE_KIND_PROCESS: ImageKind
IMAGE_KIND_SHMEM: ImageKind

class Vma(_message.Message):
    __slots__ = ("start", "end", "prot", "kind", "pgoff", "path")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PGOFF_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    prot: int
    kind: VmaKind
    pgoff: int
    path: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., prot: _Optional[int] = ..., kind: _Optional[_Union[VmaKind, str]] = ..., pgoff: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("kind", "id", "vmas", "pid")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    kind: ImageKind
    id: int
    vmas: _containers.RepeatedCompositeFieldContainer[Vma]
    pid: int
    def __init__(self, kind: _Optional[_Union[ImageKind, str]] = ..., id: _Optional[int] = ..., vmas: _Optional[_Iterable[_Union[Vma, _Mapping]]] = ..., pid: _Optional[int] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("protocol_version", "pid", "page_size", "tracker", "comm", "source_host")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRACKER_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HOST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    pid: int
    page_size: int
    tracker: Tracker
    comm: str
    source_host: str
    def __init__(self, protocol_version: _Optional[int] = ..., pid: _Optional[int] = ..., page_size: _Optional[int] = ..., tracker: _Optional[_Union[Tracker, str]] = ..., comm: _Optional[str] = ..., source_host: _Optional[str] = ...) -> None: ...

class RoundBegin(_message.Message):
    __slots__ = ("round", "frozen", "vmas", "dump_uptime_us", "images")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    DUMP_UPTIME_US_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    round: int
    frozen: bool
    vmas: _containers.RepeatedCompositeFieldContainer[Vma]
    dump_uptime_us: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, round: _Optional[int] = ..., frozen: _Optional[bool] = ..., vmas: _Optional[_Iterable[_Union[Vma, _Mapping]]] = ..., dump_uptime_us: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("seq", "vaddr", "nr_pages", "compression", "payload", "xxh3_64", "image")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VADDR_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    XXH3_64_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    vaddr: _containers.RepeatedScalarFieldContainer[int]
    nr_pages: _containers.RepeatedScalarFieldContainer[int]
    compression: Compression
    payload: bytes
    xxh3_64: int
    image: int
    def __init__(self, seq: _Optional[int] = ..., vaddr: _Optional[_Iterable[int]] = ..., nr_pages: _Optional[_Iterable[int]] = ..., compression: _Optional[_Union[Compression, str]] = ..., payload: _Optional[bytes] = ..., xxh3_64: _Optional[int] = ..., image: _Optional[int] = ...) -> None: ...

class Holes(_message.Message):
    __slots__ = ("seq", "kind", "vaddr", "nr_pages", "image")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VADDR_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: HoleKind
    vaddr: _containers.RepeatedScalarFieldContainer[int]
    nr_pages: _containers.RepeatedScalarFieldContainer[int]
    image: int
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[HoleKind, str]] = ..., vaddr: _Optional[_Iterable[int]] = ..., nr_pages: _Optional[_Iterable[int]] = ..., image: _Optional[int] = ...) -> None: ...

class RoundStats(_message.Message):
    __slots__ = ("pages_scanned", "pages_skipped_parent", "pages_written", "pages_zero", "dirty_pages", "wire_bytes", "memdump_time_us", "tracker_time_us", "freezing_time_us")
    PAGES_SCANNED_FIELD_NUMBER: _ClassVar[int]
    PAGES_SKIPPED_PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMDUMP_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TRACKER_TIME_US_FIELD_NUMBER: _ClassVar[int]
    FREEZING_TIME_US_FIELD_NUMBER: _ClassVar[int]
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_zero: int
    dirty_pages: int
    wire_bytes: int
    memdump_time_us: int
    tracker_time_us: int
    freezing_time_us: int
    def __init__(self, pages_scanned: _Optional[int] = ..., pages_skipped_parent: _Optional[int] = ..., pages_written: _Optional[int] = ..., pages_zero: _Optional[int] = ..., dirty_pages: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., memdump_time_us: _Optional[int] = ..., tracker_time_us: _Optional[int] = ..., freezing_time_us: _Optional[int] = ...) -> None: ...

class RoundEnd(_message.Message):
    __slots__ = ("round", "last_seq", "final", "stats")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    round: int
    last_seq: int
    final: bool
    stats: RoundStats
    def __init__(self, round: _Optional[int] = ..., last_seq: _Optional[int] = ..., final: _Optional[bool] = ..., stats: _Optional[_Union[RoundStats, _Mapping]] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("frozen_time_us", "total_time_us", "converged", "stop_reason", "left_stopped")
    FROZEN_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_US_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    LEFT_STOPPED_FIELD_NUMBER: _ClassVar[int]
    frozen_time_us: int
    total_time_us: int
    converged: bool
    stop_reason: str
    left_stopped: bool
    def __init__(self, frozen_time_us: _Optional[int] = ..., total_time_us: _Optional[int] = ..., converged: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., left_stopped: _Optional[bool] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("session_id", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...

class Abandon(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SenderMessage(_message.Message):
    __slots__ = ("open", "resume", "round_begin", "batch", "holes", "round_end", "stats", "abandon")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    ROUND_BEGIN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    ROUND_END_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    resume: Resume
    round_begin: RoundBegin
    batch: PageBatch
    holes: Holes
    round_end: RoundEnd
    stats: SessionStats
    abandon: Abandon
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., round_begin: _Optional[_Union[RoundBegin, _Mapping]] = ..., batch: _Optional[_Union[PageBatch, _Mapping]] = ..., holes: _Optional[_Union[Holes, _Mapping]] = ..., round_end: _Optional[_Union[RoundEnd, _Mapping]] = ..., stats: _Optional[_Union[SessionStats, _Mapping]] = ..., abandon: _Optional[_Union[Abandon, _Mapping]] = ...) -> None: ...

class SessionAccepted(_message.Message):
    __slots__ = ("session_id", "protocol_version", "max_batch_bytes", "resume_token", "handled", "round_restarted", "next_round", "last_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HANDLED_FIELD_NUMBER: _ClassVar[int]
    ROUND_RESTARTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol_version: int
    max_batch_bytes: int
    resume_token: str
    handled: int
    round_restarted: bool
    next_round: int
    last_seq: int
    def __init__(self, session_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., resume_token: _Optional[str] = ..., handled: _Optional[int] = ..., round_restarted: _Optional[bool] = ..., next_round: _Optional[int] = ..., last_seq: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("received_seq", "durable_seq", "handled")
    RECEIVED_SEQ_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    HANDLED_FIELD_NUMBER: _ClassVar[int]
    received_seq: int
    durable_seq: int
    handled: int
    def __init__(self, received_seq: _Optional[int] = ..., durable_seq: _Optional[int] = ..., handled: _Optional[int] = ...) -> None: ...

class RoundCommitted(_message.Message):
    __slots__ = ("round", "directory", "pages_written", "pages_zero", "pages_skipped_parent", "bytes_written")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_FIELD_NUMBER: _ClassVar[int]
    PAGES_SKIPPED_PARENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    round: int
    directory: str
    pages_written: int
    pages_zero: int
    pages_skipped_parent: int
    bytes_written: int
    def __init__(self, round: _Optional[int] = ..., directory: _Optional[str] = ..., pages_written: _Optional[int] = ..., pages_zero: _Optional[int] = ..., pages_skipped_parent: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReceiverMessage(_message.Message):
    __slots__ = ("accepted", "ack", "committed", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: SessionAccepted
    ack: Ack
    committed: RoundCommitted
    error: SessionError
    def __init__(self, accepted: _Optional[_Union[SessionAccepted, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., committed: _Optional[_Union[RoundCommitted, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ...) -> None: ...
