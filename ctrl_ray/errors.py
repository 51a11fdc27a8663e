"""The one exception type for bad user input: the CLI prints it on one line and exits 2."""


class InputError(ValueError):
    """Bad user input (file, config value, label, shape); the message names field and value."""
