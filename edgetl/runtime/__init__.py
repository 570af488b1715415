"""The device runtime: what runs on the board.

This package is a leaf. It needs only the standard library, numpy, OpenCV and (for inference) a
LiteRT interpreter, imports nothing else from edgetl, and is copied into bundles as is. The host
imports its preprocessing too, so training evaluation, calibration, parity and the device all feed the
model through the same code.
"""
