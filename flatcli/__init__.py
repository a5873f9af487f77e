"""flatcli: train classifiers and measure the curvature of their loss.

A command-line tool and library to test "Flatness is a False Friend" (Granziol 2020)
on your own models. See README.md for the commands; the public Python API is below.
"""

__version__ = "0.1.0"
