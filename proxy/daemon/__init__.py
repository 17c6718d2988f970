"""The process: listeners, accept loops, reload, drain, workers, file watching, descriptor and memory budgets."""
