"""Continual methods: one file each, all following methods.base.ContinualMethod."""
