"""Best-of-N distillation: BOND, J-BOND and their baselines (losses, exact test bed, recipes)."""

import bonbench  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
