"""quantforge: one Hugging Face checkpoint in, every serving artifact out, measured and registered."""

__version__ = "0.1.0"
