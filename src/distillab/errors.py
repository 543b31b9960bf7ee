"""Errors meant for people: the CLI prints their message as one line, without a traceback."""


class DistillabError(Exception):
    """Base class of every error whose message alone tells the user what to fix."""


class DistillabWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one line."""


class MissingInputError(DistillabError, TypeError):
    """A method was called without an input it needs (a strong view, dataset positions)."""


class ConfigError(DistillabError):
    """A config file, field or override is wrong."""


class DataError(DistillabError):
    """A data file is missing, truncated, corrupt or of the wrong format."""


class CheckpointError(DistillabError):
    """A checkpoint cannot be read, or does not match the model it is loaded into."""


class UnknownNameError(DistillabError, KeyError):
    """A model, method or dataset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
