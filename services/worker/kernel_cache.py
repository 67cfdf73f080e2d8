"""Where Triton keeps the kernels it compiles, checked before a GPU worker loads its model.

Triton compiles each kernel variant (and, at its first launch, its own launcher) into a cache
directory: TRITON_CACHE_DIR, else ~/.triton/cache. The image's user has no home directory,
so without a writable cache the first launch fails, deep inside the warm-up and after the
weights have loaded. The worker checks it first and says what to set. A cache that outlives
the process (the pod's kernel-cache volume, render.py) turns the next start's compiles into
reads; the worker logs how many entries it found.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignedserve.common.errors import ConfigError

ENV = "TRITON_CACHE_DIR"


def kernel_cache_dir() -> Path:
    """The directory Triton compiles into, as it would resolve it now."""
    from triton import knobs

    return Path(knobs.cache.dir)


def check_kernel_cache(path: Path) -> int:
    """Create `path` if need be and check that a file can be written there; the number of
    entries already in it (Triton keeps a directory per compiled variant or launcher). Raises
    ConfigError naming the directory and the variable that moves it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"Triton's kernel cache {path} is not writable ({e.strerror or e}): set {ENV} "
            "to a writable directory (the worker compiles its GPU kernels there)"
        ) from e
    return sum(1 for entry in path.iterdir() if entry.is_dir())
