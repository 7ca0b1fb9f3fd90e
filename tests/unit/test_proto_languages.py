"""The proto names its package for Go, Java and C#, so protoc-gen-go and friends work on it as it ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.generated.diffusion.v1 import diffusion_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_the_descriptor_carries_go_java_and_csharp_options():
    options = diffusion_pb2.DESCRIPTOR.GetOptions()
    assert options.go_package.endswith("/diffusion/v1;diffusionv1")
    assert options.java_package == "com.diffusersgrpc.diffusion.v1" and options.java_multiple_files
    assert options.csharp_namespace == "DiffusersGrpc.Diffusion.V1"


def test_go_stubs_generate(tmp_path):
    plugin = shutil.which("protoc-gen-go")
    if plugin is None:
        pytest.skip("protoc-gen-go is not installed here (go install google.golang.org/protobuf/cmd/protoc-gen-go)")
    import grpc_tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{includes}",
         f"--plugin=protoc-gen-go={plugin}", f"--go_out={tmp_path}", "--go_opt=paths=source_relative",
         "diffusion/v1/diffusion.proto"],
        check=True, env={**os.environ},
    )  # fmt: skip
    generated = (tmp_path / "diffusion" / "v1" / "diffusion.pb.go").read_text(encoding="utf-8")
    assert "package diffusionv1" in generated
