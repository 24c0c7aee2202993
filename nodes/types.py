"""Custom socket types of the pack."""
from comfy_api.latest import io

# The recorded inversion (see inversion/trajectory.py for the contract).
TRAJECTORY = io.Custom("DDIM_TRAJECTORY")
