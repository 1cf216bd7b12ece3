"""leader: distil a disease expert and an anatomy expert into one chest X-ray representation."""

__version__ = "0.1.0"
