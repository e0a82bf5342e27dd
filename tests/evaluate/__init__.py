"""Tests of dpvl/evaluate/."""
