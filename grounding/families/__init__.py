"""Model families (base.py says what one provides); the native groundseg family is built in."""
from grounding.families.base import ModelFamily, get_family, register_family
from grounding.families import native as _native  # noqa: F401  (registers "groundseg")

__all__ = ["ModelFamily", "get_family", "register_family"]
