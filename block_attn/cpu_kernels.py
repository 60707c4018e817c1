"""Chooses the CPU kernels when block_attn is imported.

A portable build ships the kernels once per instruction-set capability (``_cpu_kernels_*``
shared objects beside the extension); the extension loads the best one the CPU supports, or the
one ``BLOCK_ATTN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``, ``avx512_bf16``) names.
``block_attn.build_info()`` lists the compiled capabilities and the selected one.
"""

from __future__ import annotations

import importlib.machinery
import os

from block_attn import _C

__all__ = ["SELECTED", "kernel_objects"]

OBJECT_CAPABILITIES = ("avx512_bf16", "avx512", "avx2")


def kernel_objects() -> dict[str, str]:
    """capability -> path of the kernel objects installed beside the extension; none for a
    native-only build (whose own kernels are not the baseline ones), which must not pick up
    objects a portable build left there."""
    if _C.own_cpu_capability() != "default":
        return {}
    here = os.path.dirname(_C.__file__)
    found = {}
    for capability in OBJECT_CAPABILITIES:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(here, f"_cpu_kernels_{capability}{suffix}")
            if os.path.isfile(path):
                found[capability] = path
                break
    return found


SELECTED: str = _C.select_cpu_kernels(kernel_objects())
