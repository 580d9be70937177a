"""Proofs of Repudiation: export one point's PoR from a forged log, and verify a PoR as a hostile artifact."""

from rayforge.por.artifact import POR_FORMAT, Manifest, model_sha256, params_of, read_manifest
from rayforge.por.export import export_por, write_deployed_model
from rayforge.por.verify import DEFAULT_TOL, Reason, SegmentCheck, VerifyReport, parse_selection, verify_por

__all__ = [
    "DEFAULT_TOL",
    "Manifest",
    "POR_FORMAT",
    "Reason",
    "SegmentCheck",
    "VerifyReport",
    "export_por",
    "model_sha256",
    "params_of",
    "parse_selection",
    "read_manifest",
    "verify_por",
    "write_deployed_model",
]
