"""Training: the cross-entropy recipe, SCST, presence heads, and the export of trained runs."""
