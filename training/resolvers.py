"""OmegaConf resolvers the configs use; registered on import, before Hydra composes anything."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _if_null(value: Any, default: Any) -> Any:
    """`${if_null:${run_dir},'outputs/...'}`: the value, or the default when it is null.

    (OmegaConf's own oc.select falls back only for a missing key, not for one set to null.)
    """
    return default if value is None else value


def register() -> None:
    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", _if_null)


register()
