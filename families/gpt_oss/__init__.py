"""GPT-OSS family plugin (gpt-oss-20b / gpt-oss-120b): MXFP4 experts, clamped SwiGLU."""

from families.gpt_oss.plugin import plugin

__all__ = ["plugin"]
