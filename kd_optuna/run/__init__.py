"""Running a study: configs, storages, worker processes and the trial each runs, the command line,
compare and correlate, the study's story for optuna-dashboard and its HTML report."""
