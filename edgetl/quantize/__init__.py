"""Stage 3: int8 preparation: calibration recipes and calibration, range equalisation, bias correction,
quantisation-aware fine-tuning."""
