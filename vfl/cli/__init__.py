"""The `vfl` command line: demo, train, status, predict, models."""
