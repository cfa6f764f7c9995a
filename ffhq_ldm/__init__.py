"""FaceLDM: a latent diffusion model for 128x128 faces, built on diffusers and accelerate."""

__version__ = "0.1.0"
