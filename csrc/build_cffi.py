"""cffi out-of-line API build of ``initdiag._cext`` from the C sources in csrc/.

Self-contained on purpose: cffi ``exec()``s this file during ``setup.py build``,
so it must never import initdiag.  The cdef is the header itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "initdiag.h")
# setuptools wants source paths relative to the project root (the cwd of setup.py)
SOURCES = sorted(
    os.path.relpath(os.path.join(HERE, f)) for f in os.listdir(HERE) if f.endswith(".c")
)


def _cdef_text() -> str:
    text = open(HEADER, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # keep "#define NAME <int>" lines (cffi understands them), drop other directives
    lines = [
        ln
        for ln in text.splitlines()
        if not ln.lstrip().startswith("#")
        or re.match(r"\s*#define\s+\w+\s+-?\d+\s*$", ln)
    ]
    return "\n".join(lines)


def _compiler_has_openmp() -> bool:
    """True when the C compiler accepts -fopenmp and links an OpenMP program."""
    if os.environ.get("INITDIAG_NO_OPENMP", "") not in ("", "0"):
        return False
    cc = os.environ.get("CC", "cc").split()[0]
    src = (
        "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as fh:
            fh.write(src)
        try:
            r = subprocess.run(
                [cc, "-fopenmp", c, "-o", os.path.join(tmp, "t")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _compiler_accepts(flag: str) -> bool:
    """True when the C compiler compiles an empty program with ``flag``."""
    cc = os.environ.get("CC", "cc").split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as fh:
            fh.write("int main(void){return 0;}\n")
        try:
            r = subprocess.run(
                [cc, flag, c, "-o", os.path.join(tmp, "t")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


_openmp = _compiler_has_openmp()
# The extension is built on the machine that runs it (pip install from source), so
# tune for its CPU (AVX2/AVX-512 for the column loops); INITDIAG_PORTABLE=1 opts out
# (e.g. when building a wheel for other machines).
_native = os.environ.get("INITDIAG_PORTABLE", "") in ("", "0") and _compiler_accepts(
    "-march=native"
)
_cflags = ["-O3", "-std=c99", "-fno-strict-aliasing"]
# sqrt() need not set errno (its IEEE result is the same): without this GCC keeps
# a scalar libm call in every loop that takes a square root (Adam's update), and
# such a loop does not vectorise
if _compiler_accepts("-fno-math-errno"):
    _cflags.append("-fno-math-errno")
_ldflags: list[str] = []
if sys.platform != "win32":
    _cflags.append("-fPIC")
if _native:
    _cflags.append("-march=native")
if _openmp:
    _cflags.append("-fopenmp")
    _ldflags.append("-fopenmp")

ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "initdiag._cext",
    '#include "initdiag.h"\n',
    sources=SOURCES,
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["m"],
    # the template bodies are #included, so list them for rebuild tracking
    depends=[
        os.path.relpath(os.path.join(HERE, f))
        for f in sorted(os.listdir(HERE))
        if f == "initdiag.h" or f.endswith("_tmpl.inc")
    ],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
