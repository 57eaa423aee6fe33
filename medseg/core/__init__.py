"""The base every other part stands on: errors, the config schema, labels, device and memory runtime,
progress bars and privacy helpers. Imports nothing else from medseg."""
