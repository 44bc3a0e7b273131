"""bincounter: count the items in warehouse bin photos."""

__version__ = "0.1.0"
