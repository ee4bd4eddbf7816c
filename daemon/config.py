"""The daemon's TOML configuration (placeholder until the supervisor lands)."""


class ConfigError(Exception):
    """A malformed config: the message names the file and the key."""
