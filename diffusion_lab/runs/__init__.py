"""Run plumbing: atomic writes, signals, resume, loggers, config checks and overrides, sweeps, DDP launch."""
