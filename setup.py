"""Build script: the cffi extension ``initdiag._cext`` from ``csrc/``.

Everything else lives in ``pyproject.toml``.  If the C build fails (no compiler, a
broken toolchain) the install still succeeds without the extension; the ``c``
kernel backend then reports itself unavailable with the reason
(``initdiag.kernels.available_backends()``).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build C extensions, but let the install go on if that fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._warn(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        msg = (
            "\n*** initdiag: building the C extension failed "
            f"({type(exc).__name__}: {exc}).\n"
            "*** initdiag installs without it; the 'c' kernel backend will be "
            "unavailable. Install a C compiler (gcc) and reinstall to enable it.\n"
        )
        sys.stderr.write(msg)


cffi_modules = []
if os.environ.get("INITDIAG_NO_CEXT", "") in ("", "0"):
    cffi_modules = ["csrc/build_cffi.py:ffibuilder"]

setup(cffi_modules=cffi_modules, cmdclass={"build_ext": OptionalBuildExt})
