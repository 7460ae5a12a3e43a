"""The one base of every error a user can fix. The CLI prints it as one line and exits 2; the control
plane answers it with a 4xx; a Ray worker that raises it has its message carried back to the driver."""


class UserError(Exception):
    """Anything the user can fix: the message says what was wrong and what to change."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, or has a file that fails its checksum."""
