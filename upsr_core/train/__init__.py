"""Training-side code (degradations, data); never imported by the nodes or the inference path."""
