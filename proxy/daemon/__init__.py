"""The process: listeners and accept loops, reload, drain, workers, file watching, file-descriptor and memory budgets."""
