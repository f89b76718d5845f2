"""Spectrum analysis for adarank (filled in by issue 3)."""
