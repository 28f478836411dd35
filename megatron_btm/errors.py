"""One exception hierarchy for errors a user can act on; `btm` (cli.main) catches it once.

Every message names the input (a key, a flag, a path) and the rule it broke, on one line. The
classes also derive from the builtin that existing callers catch (`except ValueError`,
`except FileNotFoundError`), so raising them changes no caller.

    BTMError                       exit 2: bad input (the default)
      ConfigError(ValueError)      a config key / value / YAML file
      DataError(ValueError)        a corpus, a preprocessed data folder, a split
      TokenizerError(ValueError)   a tokenizer file or its vocabulary
      ForestError(ValueError)      a forest registry, an expert id, a lineage
      CheckpointError(ValueError)  a checkpoint folder (missing files, wrong shapes, bad sha256)
      InputNotFound(FileNotFoundError)   a path the user named does not exist
      OutputExists(FileExistsError)      an output the command will not overwrite
      RunFailedError(RuntimeError) exit 3: the input was fine, the run failed
        DivergedError                    the loss became NaN/inf
        JobFailedError                   a stage / job / subprocess exited non-zero

Builtins keep working: ValueError / FileNotFoundError / FileExistsError and an OSError naming a
path (PermissionError, IsADirectoryError, ...) are exit 2, TimeoutError (the forest lock) exit 3,
KeyboardInterrupt 130; anything else is a bug: one line with its type, exit 1.
"""
from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class BTMError(Exception):
    """Base of the project's user-facing errors; the CLI prints `btm CMD: error: <message>`."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BTMError, ValueError):
    """A config key, value or file is invalid (names the key, the value and the rule)."""


class DataError(BTMError, ValueError):
    """A corpus or preprocessed data folder is missing pieces or malformed."""


class TokenizerError(BTMError, ValueError):
    """A tokenizer cannot be loaded or does not fit the data / model."""


class ForestError(BTMError, ValueError):
    """A forest registry or expert reference is invalid (unknown id, locked, inconsistent)."""


class CheckpointError(BTMError, ValueError):
    """A checkpoint folder is incomplete, corrupt or does not fit the model."""


class InputNotFound(BTMError, FileNotFoundError):
    """A path given by the user does not exist (the message names the flag and the path)."""


class OutputExists(BTMError, FileExistsError):
    """An output path exists and the command does not overwrite it without being told."""


class RunFailedError(BTMError, RuntimeError):
    """The input was valid but the run did not finish: exit 3 rather than 2."""

    exit_code = EXIT_RUN_FAILED


class DivergedError(RunFailedError):
    """Training stopped on a NaN/inf loss (the last good checkpoint is kept)."""


class JobFailedError(RunFailedError):
    """A stage, job or subprocess exited non-zero (the message names it and its log)."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (the CLI's error format); OSErrors name their path."""
    if isinstance(exc, OSError) and not isinstance(exc, BTMError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
        if exc.filename2 is not None:
            text += f" (-> {exc.filename2})"
    else:
        text = str(exc)
        if isinstance(exc, KeyError) and len(exc.args) == 1:
            text = str(exc.args[0])
    text = " ".join(text.split())  # newlines and runs of spaces -> one line
    return text or type(exc).__name__


def exit_code(exc: BaseException) -> int | None:
    """The CLI exit status for `exc`, or None when it is not a user-facing error (a bug)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BTMError):
        return exc.exit_code
    if isinstance(exc, TimeoutError):
        return EXIT_RUN_FAILED  # e.g. the forest lock was held too long: retry, the input is fine
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_BAD_INPUT  # PermissionError, IsADirectoryError, ... about a named path
    return None
