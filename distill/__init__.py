"""Best-of-N distillation: BOND, J-BOND and their baselines (losses, exact test bed, recipes)."""

import os

# Before torch loads (see bonbench/__init__.py): spinning OpenMP waits slow a shared CPU 20-30x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
