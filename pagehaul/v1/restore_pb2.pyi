from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskPid(_message.Message):
    __slots__ = ("host_pid", "vpid")
    HOST_PID_FIELD_NUMBER: _ClassVar[int]
    VPID_FIELD_NUMBER: _ClassVar[int]
    host_pid: int
    vpid: int
    def __init__(self, host_pid: _Optional[int] = ..., vpid: _Optional[int] = ...) -> None: ...

class RestoreBegin(_message.Message):
    __slots__ = ("session_id", "tasks", "tcp_close", "total_bytes", "shell_job", "tcp_established", "addresses")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TCP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHELL_JOB_FIELD_NUMBER: _ClassVar[int]
    TCP_ESTABLISHED_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskPid]
    tcp_close: bool
    total_bytes: int
    shell_job: bool
    tcp_established: bool
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskPid, _Mapping]]] = ..., tcp_close: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., shell_job: _Optional[bool] = ..., tcp_established: _Optional[bool] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "data", "last")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    last: bool
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class RestoreEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("begin", "file_chunk", "end")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    FILE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    begin: RestoreBegin
    file_chunk: FileChunk
    end: RestoreEnd
    def __init__(self, begin: _Optional[_Union[RestoreBegin, _Mapping]] = ..., file_chunk: _Optional[_Union[FileChunk, _Mapping]] = ..., end: _Optional[_Union[RestoreEnd, _Mapping]] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("root_pid", "images_dir", "assemble_us", "restore_us", "extra_pages", "lazy_pages", "lazy_after_resume_pages", "lazy_faults", "lazy_fill_us")
    ROOT_PID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DIR_FIELD_NUMBER: _ClassVar[int]
    ASSEMBLE_US_FIELD_NUMBER: _ClassVar[int]
    RESTORE_US_FIELD_NUMBER: _ClassVar[int]
    EXTRA_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAZY_AFTER_RESUME_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAZY_FAULTS_FIELD_NUMBER: _ClassVar[int]
    LAZY_FILL_US_FIELD_NUMBER: _ClassVar[int]
    root_pid: int
    images_dir: str
    assemble_us: int
    restore_us: int
    extra_pages: int
    lazy_pages: int
    lazy_after_resume_pages: int
    lazy_faults: int
    lazy_fill_us: int
    def __init__(self, root_pid: _Optional[int] = ..., images_dir: _Optional[str] = ..., assemble_us: _Optional[int] = ..., restore_us: _Optional[int] = ..., extra_pages: _Optional[int] = ..., lazy_pages: _Optional[int] = ..., lazy_after_resume_pages: _Optional[int] = ..., lazy_faults: _Optional[int] = ..., lazy_fill_us: _Optional[int] = ...) -> None: ...
