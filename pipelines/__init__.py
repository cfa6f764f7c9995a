"""Diffusers pipelines of this project (importable without the ffhq_ldm package)."""

from .pipeline_face_ldm import FaceLDMPipeline, PipelineArgumentError

__all__ = ["FaceLDMPipeline", "PipelineArgumentError"]
