import os

# Keep the 2 CPU cores for the test processes themselves.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
