"""Tests of dpvl/data/."""
