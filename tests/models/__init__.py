"""Tests of dpvl/models/."""
