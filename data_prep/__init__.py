"""Converters from raw dataset downloads to the project's HDF5 domain format."""

__version__ = "0.1.0"
