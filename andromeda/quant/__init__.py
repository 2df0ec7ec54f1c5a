"""Post-training quantisation and packed weight formats, applied to a built model."""
