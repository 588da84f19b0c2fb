"""The library versions this process runs on, against the tested windows `setup.py` declares.

`setup.py` is the one place a window is written (`install_requires` and the extras); this module reads
them back from the installed distribution's metadata, so a start-up check, the test log and `pebr
--version` all state the same windows without a second copy. In a checkout that is not pip-installed
there is no metadata: the windows are then unknown and nothing is checked (the versions still print).
"""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass

DISTRIBUTION = "pebr-mega"
# The libraries whose internals the project leans on, printed first in every test log and by
# `pebr --version` (`kernels` is Hugging Face's hub-kernels, which transformers imports).
REPORTED = ("torch", "transformers", "megatron-core", "kernels", "triton")


@dataclass(frozen=True)
class Window:
    """One declared requirement: the distribution, its specifier (e.g. ``>=0.5.13,<0.6``) and its extra."""

    name: str
    specifier: str
    extra: str | None  # None: a core requirement


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def declared_windows() -> dict[str, Window]:
    """Every requirement of the installed pebr-mega with a version specifier, by canonical name."""
    from packaging.requirements import Requirement

    try:
        requires = md.requires(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        return {}
    windows: dict[str, Window] = {}
    for line in requires:
        req = Requirement(line)
        if not str(req.specifier):
            continue
        extra = None
        if req.marker is not None:
            # Markers of extras read `extra == "gpu"`; the extra's name is the quoted literal.
            text = str(req.marker)
            extra = text.split('"')[1] if 'extra ==' in text else None
        windows.setdefault(_canonical(req.name), Window(req.name, str(req.specifier), extra))
    return windows


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def version_line(names: tuple[str, ...] = REPORTED) -> str:
    """``torch 2.13.0+cpu, transformers 5.25.0, ...`` (``not installed`` where absent)."""
    return ", ".join(f"{n} {installed_version(n) or 'not installed'}" for n in names)


def outside_window(names: tuple[str, ...]) -> list[str]:
    """One line per installed distribution of `names` whose version is outside its declared window.

    A distribution that is not installed, or has no declared window, is not reported here (whether a
    backend is needed at all is its factory's decision).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    windows = declared_windows()
    problems = []
    for name in names:
        version = installed_version(name)
        window = windows.get(_canonical(name))
        if version is None or window is None:
            continue
        # Local tags (2.13.0+cpu) and pre-releases are judged by their release numbers.
        release = Version(Version(version).base_version)
        if not SpecifierSet(window.specifier).contains(release, prereleases=True):
            where = f"the '{window.extra}' extra" if window.extra else "the core requirements"
            install = f"pip install -e '.[{window.extra}]'" if window.extra else "pip install -e ."
            problems.append(f"{name} {version} is outside the tested window {window.specifier} ({where} of "
                            f"setup.py; docs/ROLLOUT.md says why); install a version inside it: {install}")
    return problems


# The distributions behind each GPU backend, checked against their windows when that backend is chosen.
GPU_BACKENDS: dict[str, tuple[str, ...]] = {
    "sglang": ("sglang",),
    "te": ("transformer-engine", "megatron-core"),
    "flash_attn": ("flash-attn",),
    "dali": ("nvidia-dali-cuda120", "nvidia-dali-cuda130"),
}


def require_in_window(backend: str, names: tuple[str, ...] | None = None) -> None:
    """Refuse the GPU `backend` (a key of GPU_BACKENDS) when an installed distribution behind it is outside
    its declared window: one BackendUnavailableError whose lines name the package, its version and the window.

    Called where the backend is chosen, so a CPU run that never uses it is not refused for it.
    """
    from pebr_mega.errors import BackendUnavailableError

    problems = outside_window(names if names is not None else GPU_BACKENDS[backend])
    if problems:
        raise BackendUnavailableError(f"backend '{backend}': " + "; ".join(problems))
