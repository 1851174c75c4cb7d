"""The one training engine (optimizer, schedule, step and epoch loops with hooks, evaluation),
training a classifier on it, the teacher cache, checkpoints and a worker's device."""
