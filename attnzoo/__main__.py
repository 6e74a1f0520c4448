import os
import sys

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a busy machine
# (more runnable threads than cores) spinning made `attnzoo demo` burn 8x the CPU time
# (measured: 10m27s vs 1m20s user time on 2 shared cores). Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
