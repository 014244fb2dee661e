"""adaptive-inference: build, calibrate, benchmark and compare adaptive-inference techniques."""

__version__ = "0.1.0"
