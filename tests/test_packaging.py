"""What a trainer's environment gets from `pip install shardsync`: one import name.

The repository keeps the user's top-level folders (compiler/, runtime/, generated/);
installed, they are `shardsync.compiler`, `shardsync.runtime`, `shardsync.generated`,
so a library imported into someone else's trainer claims no generic names.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"shardsync": "shardsync", "compiler": "shardsync.compiler", "generated": "shardsync.generated",
          "runtime": "shardsync.runtime"}


def _repo_packages() -> set[str]:
    """Every package folder of the repository, by the name it is installed under."""
    found = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name,) + parts))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, cwd=out, timeout=300)
    (built,) = out.glob("shardsync-*.whl")
    return built


def test_the_wheel_installs_nothing_but_shardsync(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"shardsync"}, top
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _repo_packages(), (_repo_packages() - packages, packages - _repo_packages())
    # what the package needs at run time beyond code: the compiler's templates, the presets
    assert any(n.startswith("shardsync/compiler/templates/") for n in names)
    assert "shardsync/models/qwen3-tiny.json" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "shardsync = shardsync.runtime.integrations.vllm.plugin:register" in text
    assert "shardsync = shardsync.cli:main" in text


def test_the_installed_wheel_imports_from_its_own_files(wheel, tmp_path):
    """Installed (not editable) into a scratch target: the runtime, the converters and
    the vLLM plugin import from there, and no top-level `runtime` exists."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["bin", "shardsync"], installed  # bin/: the `shardsync` console script
    assert sorted(p.name for p in (target / "bin").iterdir()) == ["shardsync"]
    # the worker extension imports vLLM, which a trainer's environment may lack: found, not imported
    probe = ("import importlib.util, shardsync.runtime.transfer, shardsync.generated.qwen3, "
             "shardsync.runtime.integrations.vllm.plugin, shardsync.compiler;"
             "print(shardsync.runtime.__file__);"
             "print(importlib.util.find_spec('shardsync.runtime.integrations.vllm.extension').origin);"
             "print([n for n in ('runtime', 'compiler', 'generated') if importlib.util.find_spec(n)])")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert out[0].startswith(str(target)), out
    assert out[1] == str(target / "shardsync" / "runtime" / "integrations" / "vllm" / "extension.py"), out
    assert out[2] == "[]", out


def test_the_editable_install_maps_the_folders_under_one_name(tmp_path):
    """The development install (`make` installs it editable) resolves the subpackages to
    the repository's folders and claims no top-level name but `shardsync`."""
    probe = ("import importlib.util, shardsync.runtime, shardsync.compiler, shardsync.generated;"
             "print(shardsync.runtime.__file__, shardsync.compiler.__file__, shardsync.generated.__file__);"
             "print([n for n in ('runtime', 'compiler', 'generated') if importlib.util.find_spec(n)])")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert out[0].split() == [str(ROOT / f / "__init__.py") for f in ("runtime", "compiler", "generated")], out
    assert out[1] == "[]", out


def test_the_lock_is_one_environment_the_declared_ranges_allow():
    """pyproject.toml declares ranges for trainers' environments; requirements/lock.txt
    pins the one `make` builds. Every declared requirement, extras included, must hold
    for the pinned version, or the tests would not be testing what users install."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    for text in declared:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name}: declared in pyproject.toml, not pinned in the lock"
        assert requirement.specifier.contains(pinned, prereleases=True), f"lock pins {pinned}; pyproject says {text}"
