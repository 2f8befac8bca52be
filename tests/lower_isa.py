"""Which vector ISA tests/test_isa_builds.py builds and runs besides this machine's own build
(shared with tests/test_cpp_extension.py, whose compile-only check skips the ISAs built for real)."""
import os

from albert_kernels.backends.cpp.isa import ISAS
from albert_kernels.backends.extension import build


def lower_isa():
    """The next ISA below the one this machine's extension is built for (a key of
    ``build.ISA_FLAGS``), or None where there is none or ``$ALBERT_KERNELS_CPU_ISA`` already
    chose the build's ISA."""
    native = build.build_isa() if not os.environ.get(build.ISA_ENV) else None
    if native is None or native == "DEFAULT":
        return None
    order = [name.upper() for name in ISAS]  # the vector tiers, widest first
    return order[order.index(native) + 1]
