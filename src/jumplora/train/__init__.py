"""Training one task, evaluating every task and merging a task's update: no run directory, no CL order."""
