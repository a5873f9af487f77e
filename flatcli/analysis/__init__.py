"""Analysis: pure functions of a model, its data and settings (measures, scale, rank, verdicts, claims)."""
