"""A plugin whose import fails (a dependency that is not installed)."""

from __future__ import annotations

import lorafarm_missing_dependency  # noqa: F401
