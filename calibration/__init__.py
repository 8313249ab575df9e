"""Offline calibration of Top-θ thresholds (installed as `vllm_topt.calibration`)."""
