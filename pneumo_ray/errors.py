"""The base error of a setting a user can fix. It imports nothing from the package, so every
stage may raise it; the CLI's USER_ERRORS (pneumo_ray.cli) collects it with each stage's own."""


class ConfigError(ValueError):
    """A setting out of range; the message names the command-line flag."""
