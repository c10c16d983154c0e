"""The base of every rcm-pipelines config: unknown fields are errors and attribute docstrings document."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["PipelineConfig"]


class PipelineConfig(BaseModel):
    """Base of the pipeline component configs (nested by recipes): ``extra="forbid"``, field docstrings
    become the ``--help`` text, defaults are validated."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)
