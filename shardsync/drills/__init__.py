"""End-to-end checks a person runs: verify (bitwise against a fresh engine load),
chaos (fault scenarios), soak (many updates)."""
