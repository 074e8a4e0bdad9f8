"""bonbench: Best-of-N sampling, serving and measurement."""

import os

# With few cores, OpenMP threads that spin while waiting steal the CPU from any other busy thread
# or process (a reward model, a test client) and slow generation 20-30x; sleeping waits avoid it.
# It only takes effect if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
