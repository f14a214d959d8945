"""Benchmarks: commands that print the numbers the issues ask for."""
