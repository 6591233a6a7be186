"""Base class of every config section: strict, documented, immutable after validation."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section.

    * unknown keys are rejected (`extra="forbid"`), so a typo never silently falls back to a
      default;
    * values are validated on assignment too;
    * the docstring under each field is its documentation (`use_attribute_docstrings`).
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        protected_namespaces=(),
    )
