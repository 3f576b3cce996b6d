"""Training regimes: ``module=distill`` (:mod:`.distill`) and ``module=datafree`` (:mod:`.datafree`) on one base (:mod:`.base`) and one step (:mod:`.step`)."""
