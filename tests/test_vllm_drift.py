"""Every vLLM name, signature and attribute TOPT relies on is the same in other vLLM releases as in the installed one.

Each other supported release (RELEASES, from the range in pyproject.toml) is
read from its wheel, downloaded once into the user cache and never installed
or imported, and compared with the installed vLLM's files; both are parsed by
tests/vllm_sources.py. One test per touchpoint and release; a failure names
the touchpoint and shows both sides.
"""

from __future__ import annotations

import subprocess

import pytest
from packaging.version import Version

from tests.vllm_sources import (
    Sources,
    attribute_drift,
    installed,
    installed_version,
    pinned_drift,
    resolve,
    signature,
    touchpoint_drift,
)
from vllm_topt.cache import cache_dir
from vllm_topt.calibration.wheels import download_command, download_wheel
from vllm_topt.vllm_support import (
    SUPPORTED_VLLM,
    VLLM_ATTRIBUTES,
    VLLM_LAYER_ATTRIBUTES,
    VLLM_PINNED,
    VLLM_TOUCHPOINTS,
)


def other_supported_releases(installed_release: str, first: str, end: str) -> tuple[str, ...]:
    """The first release (X.Y.0) of every supported minor version but the installed one's."""
    (major, minor), (end_major, end_minor) = Version(first).release[:2], Version(end).release[:2]
    assert major == end_major, f"a supported range across major versions ({first}, {end}) needs listing by hand"
    mine = Version(installed_release).release[:2]
    return tuple(f"{major}.{m}.0" for m in range(minor, end_minor) if (major, m) != mine)


# The releases compared with the installed vLLM: widening the range in pyproject.toml adds the new one.
RELEASES = other_supported_releases(installed_version(), *SUPPORTED_VLLM)


def release(version: str) -> Sources:
    requirement, folder = f"vllm=={version}", cache_dir() / "wheels"
    try:
        return Sources.from_wheel(version, download_wheel(requirement, folder))
    except (subprocess.CalledProcessError, OSError) as exc:
        # Failed outside the except block, so that pytest shows one message, not a chain.
        problem = f"pip exited with status {exc.returncode}" if isinstance(exc, subprocess.CalledProcessError) else exc
    pytest.fail(f"could not download the wheel of vLLM {version} ({problem}); TOPT is checked against it. "
                f"Run: {' '.join(download_command(requirement, folder))}", pytrace=False)


@pytest.fixture(scope="session", params=RELEASES)
def other(request) -> Sources:
    """One other supported release (a session fixture: a failed download is tried once, not per test)."""
    return release(request.param)


def _check(drift: str | None) -> None:
    if drift:
        pytest.fail(f"vLLM changed what TOPT relies on:\n{drift}", pytrace=False)


@pytest.mark.parametrize("touchpoint", VLLM_TOUCHPOINTS)
def test_touchpoint_is_unchanged(other, touchpoint):
    _check(touchpoint_drift(installed(), other, touchpoint))


@pytest.mark.parametrize("attribute", VLLM_ATTRIBUTES)
def test_attribute_is_still_set(other, attribute):
    _check(attribute_drift(installed(), other, attribute))


@pytest.mark.parametrize("attribute", VLLM_LAYER_ATTRIBUTES)
def test_layer_attribute_is_still_set(other, attribute):
    _check(attribute_drift(installed(), other, attribute, on_self=False))


@pytest.mark.parametrize("touchpoint", VLLM_PINNED)
def test_kv_cache_layout_is_unchanged(other, touchpoint):
    _check(pinned_drift(installed(), other, touchpoint))


def test_every_other_supported_release_is_checked():
    assert other_supported_releases("0.32.0", "0.32", "0.34") == ("0.33.0",)
    assert other_supported_releases("0.33.1", "0.32", "0.34") == ("0.32.0",)
    assert other_supported_releases("0.32.0+cpu", "0.32", "0.33") == ()


def test_the_reader_resolves_every_touchpoint_of_the_installed_vllm():
    """The static reader finds what the import-based tests/test_vllm_touchpoints.py finds."""
    missing = [t for t in VLLM_TOUCHPOINTS if resolve(installed(), t) is None]
    assert not missing, missing


# --------------------------------------------------------------------------- the comparison itself (synthetic)

OLD = {
    "pkg/__init__.py": "from .impl import Impl as Impl\nfrom pkg.base import *\n",
    "pkg/base.py": "class Base:\n    kind = 1\n    def build(self, a, b=0): ...\n    def keep(self): ...\n"
                   "    def __init__(self):\n        self.heads = 2\n",
    "pkg/impl.py": "from pkg.base import Base\n\nclass Impl(Base):\n    def setup(self, layer):\n"
                   "        layer.isa = 'vec'\n",
}


def _drifted(compare, files: dict[str, str], *args) -> str | None:
    """`compare` (a *_drift function) of the synthetic OLD release with `files`."""
    return compare(Sources.from_strings("old", OLD), Sources.from_strings("new", files), *args)


def test_a_planted_signature_change_is_reported_with_both_signatures():
    new = dict(OLD, **{"pkg/base.py": OLD["pkg/base.py"].replace("def build(self, a, b=0)", "def build(self, a, *, b)")})
    drift = _drifted(touchpoint_drift, new, "pkg:Impl.build")
    assert drift and "Base.build(self, a, b=…)" in drift and "Base.build(self, a, *, b)" in drift, drift
    assert _drifted(touchpoint_drift, new, "pkg:Impl.keep") is None


def test_a_removed_name_and_a_new_override_are_reported():
    removed = dict(OLD, **{"pkg/base.py": OLD["pkg/base.py"].replace("kind = 1", "")})
    assert "missing" in _drifted(touchpoint_drift, removed, "pkg:Base.kind")
    overridden = dict(OLD, **{"pkg/impl.py": OLD["pkg/impl.py"] + "    def keep(self): ...\n"})
    drift = _drifted(touchpoint_drift, overridden, "pkg:Impl.keep")
    assert drift and "Base.keep(self)" in drift and "Impl.keep(self)" in drift, drift


def test_re_exports_star_imports_and_instance_attributes_resolve():
    old = Sources.from_strings("old", OLD)
    assert signature(old, resolve(old, "pkg:Impl.build")) == "Base.build(self, a, b=…)"
    assert resolve(old, "pkg:Base") is not None  # through `from pkg.base import *`
    assert attribute_drift(old, old, "pkg:Impl.heads") is None  # set in the base's __init__
    assert attribute_drift(old, old, "pkg:Impl.isa", on_self=False) is None
    assert "not set" in attribute_drift(old, old, "pkg:Impl.isa")  # set on the layer, not on self


def test_a_planted_layout_change_is_reported():
    new = dict(OLD, **{"pkg/base.py": OLD["pkg/base.py"].replace("kind = 1", "kind = 2")})
    drift = _drifted(pinned_drift, new, "pkg:Impl.kind")
    assert drift and ": 1" in drift and ": 2" in drift, drift


def test_a_planted_dataclass_field_is_reported_in_its_generated_init():
    old = Sources.from_strings("old", {"m.py": "@dataclass\nclass Slice:\n    requests: slice\n    tokens: slice\n"})
    new = Sources.from_strings("new", {"m.py": "@dataclass\nclass Slice:\n    requests: slice\n    padded: int\n"
                                                "    tokens: slice\n"})
    drift = touchpoint_drift(old, new, "m:Slice.__init__")
    assert drift and "__init__(self, requests, tokens)" in drift and "__init__(self, requests, padded, tokens)" in drift
    assert touchpoint_drift(old, new, "m:Slice") is None  # still a dataclass
