"""Top-θ decode on CPU: vectorised torch (`torch_decode`) and the C++ kernel (`cpp`, source in `csrc/`)."""
