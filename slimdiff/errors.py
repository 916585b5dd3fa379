"""The one exception type the CLI turns into a single error line and a non-zero exit."""


class SlimDiffError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model.

    The message is complete on its own; the CLI prints it as one line without a traceback.
    """


class SlimDiffWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. fewer prompts than asked for).

    The CLI prints it as one ``warning:`` line; API users see an ordinary Python warning.
    """
