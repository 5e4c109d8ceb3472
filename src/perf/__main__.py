"""``python -m src.perf cpu|gpu|check|estimate [arguments]``: the project's measurements (``--help`` after a command).

* ``cpu``       CPU timings of attention modes and samplers, sampler throughput before/after (src/perf/cpu.py);
* ``gpu``       the 1.3B DiT on one CUDA GPU: samplers, MFU, end to end with the VAE (src/perf/gpu.py);
* ``check``     the prepared, budgeted first GPU run (src/perf/check.py);
* ``estimate``  memory and FLOPs of one DMD iteration for any launch, on fake tensors (src/perf/estimate.py).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"cpu": "src.perf.cpu", "gpu": "src.perf.gpu", "check": "src.perf.check", "estimate": "src.perf.estimate"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m src.perf {{{'|'.join(COMMANDS)}}} [arguments]\n\n{__doc__}")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
