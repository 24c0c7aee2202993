"""What the pack's nodes share: their menu category and the custom socket type."""
from comfy_api.latest import io

CATEGORY = "sampling/ddim_inversion"

# The recorded inversion (see inversion/trajectory.py for the contract).
TRAJECTORY = io.Custom("DDIM_TRAJECTORY")

# Attention control for the Inverted-Latent Sampler (an inversion.attention.Control).
ATTENTION_CONTROL = io.Custom("DDIM_ATTENTION_CONTROL")
