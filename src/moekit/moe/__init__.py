"""The Mixture-of-Experts layer: router -> dispatch -> experts -> combine (+ shared experts)."""

from moekit.moe.layer import MoELayer, MoEStats
from moekit.moe.router import RouterOutput, build_router

__all__ = ["MoELayer", "MoEStats", "RouterOutput", "build_router"]
