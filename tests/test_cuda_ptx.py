"""Compile every CUDA kernel to PTX with the real compiler and assemble it with ptxas.

The simulator (used by test_cuda_kernels.py) runs kernels as Python, so it cannot see
typing or lowering errors.  Here a subprocess *without* ``NUMBA_ENABLE_CUDASIM``
compiles each kernel of ``initdiag.kernels._cuda_common.ptx_kernels()`` with
``numba.cuda.compile_ptx`` for float32 and float64, for compute capabilities 7.5 and
9.0, and checks the PTX with the CUDA toolkit's ``ptxas -arch=sm_XY``.  No GPU is
needed (one subprocess per compute capability, run concurrently).

numba-cuda 0.30 compiles the *device functions* a kernel calls for the current
device's compute capability, which needs a GPU even inside ``compile_ptx``; the
subprocess therefore hands numba a stand-in device that reports the target
capability (``numba.cuda.dispatcher.get_current_device``), so the whole kernel,
device functions included, is compiled for that target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PTXAS = shutil.which("ptxas")
CCS = ((7, 5), (9, 0))
# the training kernels (optimizer updates, loss heads), beside simulate's
# ptx_kernels(); each module lists its kernels in PTX_KERNELS
TRAINING_MODULES = ("initdiag.kernels._cuda_optim", "initdiag.kernels._cuda_loss")

SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path

    cc = (int(sys.argv[1]), int(sys.argv[2]))
    outdir = Path(sys.argv[3])
    ptxas = sys.argv[4]
    try:
        from numba import cuda, float32, float64
        import numba.cuda.dispatcher as _disp
        if cuda.compile_ptx is None:
            raise ImportError("numba.cuda.compile_ptx is None")
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()  # raises when libNVVM is missing
    except Exception as exc:
        print("SKIP: numba-cuda cannot compile PTX here:", type(exc).__name__, exc)
        sys.exit(0)

    class _TargetDevice:  # stand-in for get_current_device(): no GPU needed
        compute_capability = cc

    _disp.get_current_device = lambda: _TargetDevice

    import importlib

    from initdiag.kernels._cuda_common import ptx_kernels as _simulate_kernels

    def ptx_kernels():
        extra = [importlib.import_module(m).PTX_KERNELS for m in sys.argv[5:]]
        return _simulate_kernels() + [k for ks in extra for k in ks]

    failures = 0
    count = 0
    for name, pyfunc, sig_of in ptx_kernels():
        for dt in (float32, float64):
            tag = f"{name}_{dt}_sm{cc[0]}{cc[1]}"
            try:
                ptx, _ = cuda.compile_ptx(pyfunc, sig_of(dt), cc=cc)
            except Exception as exc:
                print(f"FAIL compile {tag}: {type(exc).__name__}: {exc}")
                failures += 1
                continue
            path = outdir / f"{tag}.ptx"
            path.write_text(ptx)
            arch = f"-arch=sm_{cc[0]}{cc[1]}"
            cmd = [ptxas, arch, str(path), "-o", str(path) + ".cubin"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL ptxas {tag}: {r.stderr.strip()}")
                failures += 1
                continue
            if ".entry" not in ptx:
                print(f"FAIL {tag}: no kernel entry in the PTX")
                failures += 1
                continue
            count += 1
    print(f"OK {count} kernels assembled for sm_{cc[0]}{cc[1]}")
    sys.exit(1 if failures else 0)
    """
)


def test_every_cuda_kernel_compiles_to_ptx_and_assembles(tmp_path: Path) -> None:
    if PTXAS is None:
        pytest.skip("ptxas (CUDA toolkit) is not on PATH; cannot assemble PTX")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    procs = []
    for cc in CCS:
        d = tmp_path / f"sm{cc[0]}{cc[1]}"
        d.mkdir()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(cc[0]), str(cc[1]), str(d), PTXAS]
                + list(TRAINING_MODULES),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outputs.append((p.returncode, out))
    text = "\n".join(o for _, o in outputs)
    if all(o.lstrip().startswith("SKIP:") or "\nSKIP:" in o for _, o in outputs):
        pytest.skip(text.strip().splitlines()[-1])
    for rc, out in outputs:
        assert rc == 0, out
        assert "OK " in out, out
    # every (kernel, dtype) pair produced an assembled cubin for each target
    import importlib

    from initdiag.kernels._cuda_common import ptx_kernels

    extra = sum(len(importlib.import_module(m).PTX_KERNELS) for m in TRAINING_MODULES)
    expected = 2 * (len(ptx_kernels()) + extra)
    for cc in CCS:
        cubins = list((tmp_path / f"sm{cc[0]}{cc[1]}").glob("*.cubin"))
        assert len(cubins) == expected, (cc, len(cubins), expected, text)
