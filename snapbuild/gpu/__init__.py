"""GPU snapshots: NVIDIA GPU fingerprints and CUDA checkpointing (``gpu: cuda``).

Only the standard library is used here (the runner imports it); the driver API is
reached through the ``cuda-bindings`` package when it is installed, else through
``libcuda.so.1`` with ctypes.
"""
