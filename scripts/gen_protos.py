"""Generate the Python stubs and typed .pyi files for protos/ into service/generated/.

The stubs are committed (so a plain `pip install` needs no code generation step) and this script is the only
way they change: `make protos` writes them, `make check-protos` (run by the tests) fails when they drift from
the .proto. grpc_tools writes absolute imports (`from diffusion.v1 import ...`); they are rewritten to live under
the `service.generated` package so the generated code never claims a top-level `diffusion` package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service" / "generated"
PACKAGE = "service.generated"
DESCRIPTORS = "descriptors.binpb"  # a FileDescriptorSet of protos/, with source info


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        # The descriptors with their comments, for reflection (grpcurl describe shows each field's docs).
        f"--descriptor_set_out={out / DESCRIPTORS}",
        "--include_source_info",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    top_packages = {Path(p).parts[0] for p in protos}
    for path in out.rglob("*.py*"):
        text = path.read_text()
        for top in top_packages:
            text = re.sub(rf"^(from|import) {top}\.", rf"\1 {PACKAGE}.{top}.", text, flags=re.M)
        path.write_text(text)
    for proto in protos:  # ship the .proto inside the package, beside its stubs
        shutil.copyfile(PROTO_ROOT / proto, out / proto)
    for folder in [out, *(d for d in out.rglob("*") if d.is_dir())]:
        (folder / "__init__.py").touch()
    (out / "py.typed").touch()


def tree(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ from the proto")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if check:
            want, have = tree(fresh), tree(OUT)
            drift = sorted(set(want) ^ set(have)) + sorted(
                name for name in set(want) & set(have) if not filecmp.cmp(want[name], have[name], shallow=False)
            )
            if drift:
                print("generated stubs are stale; run `make protos`:", *drift, sep="\n  ", file=sys.stderr)
                return 1
            print("generated stubs match protos/")
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(fresh, OUT)
        print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
