"""How fast a run trains: the speed options decided for this device (options.py), applied to
the UNet (compile.py: channels-last, compile, attention kernel), fused q/k/v projections and
half-precision norms. None of it changes what is trained."""
