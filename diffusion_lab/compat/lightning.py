"""Lightning internals, checked against `lightning<2.7` (the pin in pyproject.toml).

The calls are here; three classes extend Lightning where no public hook exists, each covered by tests:
- `callbacks.checkpoint.RunCheckpoint` saves the current step on demand (`save_checkpoint_now` below;
  tests/test_resume.py, tests/test_faults.py);
- `runs.loggers.ResumableCSVLogger` keeps `metrics.csv` across a resume (`ExperimentWriter._check_log_dir_exists`,
  `metrics_keys`; tests/test_resume.py);
- `runs.distributed` reruns the Hydra job for each rank (`_SubprocessScriptLauncher`, `_hydra_subprocess_cmd`;
  tests/test_scale.py).
"""

TESTED = "2.6"


def save_checkpoint_now(callback, trainer) -> None:
    """A `ModelCheckpoint`'s save of the current step (`<filename>.ckpt` and `last.ckpt`), unless it saved this
    step already: what it does at `every_n_train_steps`, on demand."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)
