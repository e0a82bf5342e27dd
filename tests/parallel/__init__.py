"""Tests of dpvl/parallel/."""
