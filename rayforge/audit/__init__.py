"""The repudiability audit: which membership claims a training log can refute (Theorem 1, Sections III-B, V, VI).

`run_audit` writes RUN/audit/points.parquet (one row per point: repudiable, score, reason, evidence) and
summary.json; `rayforge.audit.criterion` documents the criterion, `rayforge.audit.substitution` the mechanism.
"""

from rayforge.audit.driver import audit_dir, run_audit, substitution_rows
from rayforge.audit.figure import audit_report, least_repudiable_figure
from rayforge.audit.substitution import SubstitutionParams

__all__ = ["SubstitutionParams", "audit_dir", "audit_report", "least_repudiable_figure", "run_audit",
           "substitution_rows"]
