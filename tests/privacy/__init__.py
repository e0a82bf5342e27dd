"""Tests of dpvl/privacy/."""
