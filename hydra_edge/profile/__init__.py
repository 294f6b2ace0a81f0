"""Profiling bundles: prefill and decode throughput and memory over context lengths (``hydra-edge profile``).

Each length runs in a fresh process (:mod:`hydra_edge.profile.probe`), so
that its peak resident memory is its own. Like the runtime, this package
imports no torch; matplotlib is imported only to write the plot.
"""

from .measure import (
    STATUS_FAILED,
    STATUS_MEMORY,
    STATUS_OK,
    STATUS_TIMEOUT,
    BundleProfile,
    LengthResult,
    default_memory_limit_mib,
    parse_lengths,
    profile_bundle,
    profile_bundles,
)
from .report import profile_document, ratio_rows, ratios, table_rows, write_json

__all__ = [
    "STATUS_FAILED", "STATUS_MEMORY", "STATUS_OK", "STATUS_TIMEOUT", "BundleProfile", "LengthResult",
    "default_memory_limit_mib", "parse_lengths", "profile_bundle", "profile_bundles", "profile_document",
    "ratio_rows", "ratios", "table_rows", "write_json",
]
