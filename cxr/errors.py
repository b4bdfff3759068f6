"""The two errors every program turns into one `error:` line (cli.run_cli): a mistake in the
command line or its files, and a run that stopped itself with its files intact."""


class UserError(RuntimeError):
    """A mistake in the command line or its files (a missing checkpoint, no GPU, weights that
    do not fit): run_cli prints its message as one `error:` line."""


class RunStopped(RuntimeError):
    """A run that stopped itself with its files intact (a failed save, a non-finite loss):
    run_cli prints its message as one `error:` line and exits with code 1."""
