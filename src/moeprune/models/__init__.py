"""Architecture adapters. Importing this package registers every family."""

from moeprune.models import (  # noqa: F401  (registration side effects)
    deepseek_v3,
    families,
    glm4_moe,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
    qwen3_vl_moe,
)
from moeprune.models.base import KeyRole, MoEAdapter
from moeprune.models.registry import get_adapter, supported_families
from moeprune.models.routing import RoutingSpec

__all__ = ["KeyRole", "MoEAdapter", "RoutingSpec", "get_adapter", "supported_families"]
