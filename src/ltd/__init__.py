"""ltd: lossless tree speculative decoding with learned drafting control."""

__version__ = "0.1.0"
