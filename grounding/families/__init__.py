"""Model families (base.py says what one provides); the native groundseg family is built in, and so are LISA's
and GLaMM's [SEG] checkpoints (lisa.py, glamm.py) and the box-speaking VLMs (llava15.py: LLaVA-1.5; qwen.py:
Qwen2-VL, Qwen2.5-VL), whose boxes become masks."""
from grounding.families.base import ModelFamily, get_family, register_family
from grounding.families import native as _native  # noqa: F401  (registers "groundseg")
from grounding.families import llava15 as _llava15  # noqa: F401  (registers "llava-1.5")
from grounding.families import qwen as _qwen  # noqa: F401  (registers "qwen2-vl", "qwen2.5-vl")
from grounding.families import lisa as _lisa  # noqa: F401  (registers "lisa")
from grounding.families import glamm as _glamm  # noqa: F401  (registers "glamm")

__all__ = ["ModelFamily", "get_family", "register_family"]
