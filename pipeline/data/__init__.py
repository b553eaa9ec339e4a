"""Text for calibration and evaluation: the shipped public-domain corpus, local files, hub datasets; the calibration stage."""
