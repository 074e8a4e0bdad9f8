"""Best-of-N distillation: BOND, J-BOND and their baselines (losses, exact test bed, recipes)."""
