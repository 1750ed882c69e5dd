"""Renderings of a `report.Report`: `terminal` (rich), `markdown` and `html`, built from the same `sections`."""
