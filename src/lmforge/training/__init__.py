"""One training loop for every objective: config, schedule, optimizer, run directory, state, tasks."""
