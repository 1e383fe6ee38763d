"""One module per DVC stage, named exactly as the stage: `stages/<stage>.py` is the only code the notebook of
stage <stage> calls. Stage modules read params, call the library, and write artifacts, metrics and figures;
the library (everything outside this package) never imports a stage."""
