"""One error type for every problem a user can fix; the CLI prints it on one line, exit 2."""


class QuantLRMError(Exception):
    """A problem with the user's input, with the fix in the message."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)
