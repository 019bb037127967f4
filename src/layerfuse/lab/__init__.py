"""Measuring tools, apart from the library."""
