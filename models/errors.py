"""Exceptions for a user's mistakes: the ``leapformer`` command prints them in one line (no
traceback unless ``--debug`` or ``LEAPFORMER_DEBUG=1``) and exits with their ``code``."""


class UserError(Exception):
    """A mistake the user can fix; ``str(e)`` says what is wrong and what to do."""

    code = 1


class UsageError(UserError, ValueError):
    """A flag or config value out of range, or a flag the model does not have (exit code 2)."""

    code = 2


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, of another kind, or from an incompatible version."""


class RunExistsError(UserError, FileExistsError):
    """``--out`` already holds a checkpoint and neither ``--resume`` nor ``--overwrite`` was given."""

    code = 2


class MissingExtra(UserError, ImportError):
    """An optional dependency of a command is not installed (the message names the pip extra)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training: a checkpoint of ``step`` was saved at ``checkpoint``."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def require(command: str, *modules: str, extra: str = "zoo") -> None:
    """Raise ``MissingExtra`` naming the first of ``modules`` that cannot be imported."""
    import importlib.util

    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(f'{command} needs {m}: pip install "leapformer-kernels[{extra}]"')
