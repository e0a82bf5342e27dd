"""Tests of dpvl/objectives/."""
