"""Build the light Python client distribution, `diffusers-grpc-client`: the generated stubs and
`DiffusionClient`, needing only grpcio, protobuf and grpcio-status (no torch, diffusers, peft or s3fs).

It ships the same modules as the server distribution (`service.client`, `service.generated`), so code written
against one runs with the other; install one of the two, not both (they own the same files).

    python scripts/build_client.py --out dist/
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "diffusers-grpc-client"
DEPENDENCIES = ("grpcio>=1.62", "protobuf>=5", "grpcio-status>=1.62")


def version() -> str:
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert found is not None, "pyproject.toml has no version"
    return found.group(1)


def stage(folder: Path) -> None:
    """The distribution's source tree: the client module, the stubs (with their .proto), a pyproject."""
    package = folder / "service"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""diffusers-grpc: the light client (stubs and DiffusionClient)."""\n')
    shutil.copyfile(ROOT / "service" / "client.py", package / "client.py")
    shutil.copytree(ROOT / "service" / "generated", package / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    requirements = ", ".join(f'"{dependency}"' for dependency in DEPENDENCIES)
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{version()}"
description = "The Python client of diffusers-grpc: generated stubs and DiffusionClient"
requires-python = ">=3.10"
dependencies = [{requirements}]

[tool.setuptools.packages.find]
include = ["service*"]

[tool.setuptools.package-data]
"service.generated" = ["**/*.proto", "**/*.pyi", "py.typed", "descriptors.binpb"]
""",
        encoding="utf-8",
    )


def build(out: Path) -> Path:
    """Build the wheel into `out`; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="client-dist-") as tmp:
        stage(Path(tmp))
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", tmp, "-w", str(out)],
            check=True,
        )
    wheels = sorted(out.glob(f"{NAME.replace('-', '_')}-{version()}-*.whl"))
    assert wheels, f"no wheel of {NAME} in {out}"
    return wheels[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    print(build(parser.parse_args().out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
