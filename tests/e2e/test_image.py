"""The image builds and serves, proven without Docker: lay out exactly the build context `docker build -f
deploy/Dockerfile .` sends (the repository less what .dockerignore leaves out), apply the Dockerfile's COPY steps,
build the wheel its `pip install` builds, install it into a fresh virtual environment, and serve the stored demo
model from there to SERVING with the image's default command."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, free_port, wait_serving

pytestmark = pytest.mark.e2e
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


# --- .dockerignore, as Docker reads it (moby/patternmatcher) --------------------------------------------------


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) per line: `**` spans folders, `*` and `?` stay within one, `!` re-includes."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part.startswith("**"):
                regex += "(.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((exception, re.compile(regex)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """The last rule that matches the path, or one of its parent folders, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not exception
    return result


def build_context(destination: Path) -> list[str]:
    """Copy the files `docker build` would send; returns their paths relative to the context."""
    rules = ignore_rules((ROOT / ".dockerignore").read_text())
    sent = []
    for folder, subfolders, files in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if relative == "." else relative + "/"
        subfolders[:] = [d for d in subfolders if not ignored(prefix + d, rules) or _reincluded(prefix + d, rules)]
        for name in files:
            path = prefix + name
            if not ignored(path, rules):
                target = destination / path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target)
                sent.append(path)
    return sent


def _reincluded(folder: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether an exception rule could bring back something inside an ignored folder (then walk it)."""
    return any(exception and regex.pattern.startswith(re.escape(folder + "/")) for exception, regex in rules)


# --- the Dockerfile's COPY and pip install steps ----------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def apply_copies(context: Path, image: Path) -> Path:
    """Run the COPY steps (from the context, with WORKDIR) into `image`; returns the folder `pip install` names."""
    workdir, project = "/", None
    for word, rest in instructions():
        if word == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        elif word == "COPY":
            assert not rest.startswith("--from"), "a multi-stage COPY: teach this test the stage"
            *sources, target = shlex.split(rest)
            destination = image / os.path.join(workdir, target).lstrip("/")
            for source in sources:
                origin = context / source
                if origin.is_dir():
                    shutil.copytree(origin, destination, dirs_exist_ok=True)
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, destination)
        elif word == "RUN" and (match := re.search(r"pip install (/\S+)", rest)):
            project = match.group(1)
    assert project is not None, "the Dockerfile installs no project folder with pip"
    return image / project.lstrip("/")


def default_command() -> list[str]:
    """ENTRYPOINT + CMD, as `docker run IMAGE` runs them."""
    exec_form = {word: rest for word, rest in instructions() if word in ("ENTRYPOINT", "CMD")}
    return [*eval_json_list(exec_form["ENTRYPOINT"]), *eval_json_list(exec_form["CMD"])]


def eval_json_list(text: str) -> list[str]:
    import json

    value = json.loads(text)
    assert isinstance(value, list), f"use the exec form: {text}"
    return value


def repository_packages() -> set[str]:
    """Every top-level package of the repository (a folder with __init__.py) that is not a test or a tool."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "scripts"}


# --- the test ---------------------------------------------------------------------------------------------------


def test_dockerignore_matching_follows_docker():
    rules = ignore_rules("**/__pycache__\n.venv\ntests\n*.md\n!README.md\n")
    assert ignored("service/__pycache__/x.pyc", rules) and ignored("__pycache__", rules)
    assert ignored(".venv/bin/python", rules) and ignored("tests/unit/test_x.py", rules)
    assert ignored("NOTES.md", rules) and not ignored("README.md", rules)
    assert not ignored("service/tests.py", rules) and not ignored("docs/a.md", rules)


def test_the_image_built_from_the_dockerfile_serves_the_demo_model(tmp_path):
    context, image, wheels, venv = (tmp_path / name for name in ("context", "image", "wheels", "venv"))
    sent = build_context(context)
    assert not any(path.startswith((".git/", ".venv/", "node_modules/", "tests/")) for path in sent)
    project = apply_copies(context, image)

    python = Path(sys.executable)
    build = [str(python), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(project)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("diffusers_grpc-*.whl")
    shipped = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if "/" in name}
    missing = repository_packages() - shipped
    assert not missing, f"the image would lack the packages {sorted(missing)}"
    assert fnmatch.filter(zipfile.ZipFile(wheel).namelist(), "service/generated/diffusion/v1/*.proto")

    # A fresh environment with only the wheel of our own code; third-party packages come from this one, added as a
    # plain path (its .pth files, the editable install of this checkout among them, are not read).
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    third_party = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "third_party.pth").write_text("\n".join(map(str, third_party)) + "\n")
    pip = [str(python), "-m", "pip", "--python", str(venv / "bin" / "python")]
    subprocess.run([*pip, "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "run"  # not the checkout: nothing may be imported from the source tree
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFUSERS_GRPC_HOME")}
    env["DIFFUSERS_GRPC_HOME"] = str(tmp_path / "models")
    cli = venv / "bin" / "diffusers-grpc"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pipelines, service; print(pipelines.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv)), f"pipelines came from {where.stdout}, not the installed wheel"

    empty = subprocess.run(
        [str(cli), "serve", "tiny-sd", "--port", "0"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert empty.returncode == 1
    (line,) = [line for line in empty.stderr.splitlines() if line.startswith("error:")]
    assert "mount a model store" in line and "Traceback" not in empty.stderr

    subprocess.run([str(cli), "models", "create-demo"], cwd=elsewhere, env=env, check=True, capture_output=True)
    entrypoint, *arguments = default_command()
    assert entrypoint == "diffusers-grpc"
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed below, after the process)
    server = subprocess.Popen(
        [str(cli), *arguments, "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "0"],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process=server)
    finally:
        server.terminate()
        code = server.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
