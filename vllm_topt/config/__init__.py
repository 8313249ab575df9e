"""Configuration: the `topt` options block, threshold files, per-layer plans, what TOPT refuses."""
