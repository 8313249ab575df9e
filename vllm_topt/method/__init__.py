"""The Top-θ method: its types and codes (`rules`) and the SPEC reference (`reference`)."""
