"""Gradient-masking diagnostics: registered probes, rules as data, and the audit with its verdict."""
