"""Tools on top of the ops and the model: the error budget, verify, bench, the CLI."""
