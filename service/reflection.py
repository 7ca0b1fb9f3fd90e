"""Server reflection that serves our protos with their comments, so grpcurl `describe` and grpcui show each
field's documentation.

grpcio-reflection serializes descriptors from the runtime pool, which holds no source info. Our files' full
FileDescriptorProtos, comments included, are generated beside the stubs (`descriptors.binpb`, written by
scripts/gen_protos.py); this servicer answers with those in place of the bare ones. The two overridden methods
are grpcio-reflection's own hooks for file requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

DESCRIPTORS = "descriptors.binpb"


def documented_files() -> dict[str, bytes]:
    """Our .proto files' FileDescriptorProtos with source info, serialized, by file name.

    protoc writes each field's `json_name` into a descriptor set; the runtime descriptors reflection served
    before had none, and grpcurl then prints the proto's own field names. They are removed, so its JSON output
    keeps those names (`text_to_image`, not `textToImage`)."""
    data = resources.files("service.generated").joinpath(DESCRIPTORS).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    for file in files:
        for message in file.message_type:
            _without_json_names(message)
    return {file.name: file.SerializeToString() for file in files}


def _without_json_names(message: Any) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _without_json_names(nested)


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc,name-defined]
    """The standard reflection service, answering with our documented descriptors."""

    def __init__(self, service_names: Sequence[str]) -> None:
        super().__init__(service_names)
        self._documented = documented_files()

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._with_comments(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return self._with_comments(super()._file_containing_symbol(request, fully_qualified_name))

    def _with_comments(self, response: Any) -> Any:
        files = response.file_descriptor_response.file_descriptor_proto
        for index, data in enumerate(files):
            name = descriptor_pb2.FileDescriptorProto.FromString(data).name
            if name in self._documented:
                files[index] = self._documented[name]
        return response


def add_documented_reflection(service_names: Sequence[str], server: Any) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflectionServicer(service_names), server)
