"""rayforge: Proofs of Repudiation for membership-inference claims, forged from SGD training logs on Ray."""

__version__ = "0.1.0"
