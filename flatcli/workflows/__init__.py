"""Workflows: the only code that reads checkpoints and data sets or writes files."""
