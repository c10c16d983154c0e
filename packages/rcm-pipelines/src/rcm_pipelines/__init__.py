"""rcm_pipelines: Wan2.1 inference and evaluation on top of rcm-nets, rcm-losses and rcm-kernels.

Submodules: ``components`` (load DiT / VAE / text encoder / CLIP from local files), ``generation`` (few-step
rCM and teacher sampling, T2V and I2V), ``video`` (the video writer), ``timing``, ``eval`` (VBench sampling,
scoring and aggregation), ``testing`` (tiny components written in the official formats).
"""

__all__: list[str] = []
