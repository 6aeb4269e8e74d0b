"""The zoo's leaf module: its error type and the names every other zoo module shares. Imports nothing."""


class ZooError(ValueError):
    """A model name or option that the zoo cannot build; the message says what is allowed."""


# Any timm architecture is reachable as ``timm/<name>``; the factory alone parses this prefix.
TIMM_PREFIX = "timm/"
