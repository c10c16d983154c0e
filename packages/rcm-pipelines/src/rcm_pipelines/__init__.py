"""rcm_pipelines: Wan2.1 inference and evaluation on top of rcm-nets, rcm-losses and rcm-kernels.

Submodules (docs/pipelines.md has the same list):

* ``config``: ``PipelineConfig``, the base of every config here;
* ``components``: load DiT / VAE / text encoder / CLIP from local files;
* ``generation``: few-step rCM and teacher sampling loops, T2V and I2V conditioning, size presets;
* ``streaming``: ``stream_generate``, block-by-block causal generation with a KV cache;
* ``stream_spec``: ``StreamSpec``, the one causal-sampler config (the session's and the pipeline's);
* ``stream_session``: ``StreamSession``, the causal DiT + VAE loaded once, blocks decoded and written as they come;
* ``pipeline``: the one generation pipeline (``SamplerSpec``, ``VideoSpec``, ``VideoPipeline``, ``encode_texts``,
  ``causal_first_block``) of ``recipes/generate.py`` and the VBench harness;
* ``hooks``: training sample hooks called by ``rcm_train.stages``;
* ``video``: mp4 reading / writing, grids, images, plots;
* ``progress``: progress bars / plain progress lines of long loops;
* ``timing``: ``StageTimer``, the per-stage wall clock;
* ``eval``: VBench (``suite``, ``harness``, ``score``, ``worker``, ``scores``, ``videos``);
* ``testing``: tiny components written in the official formats;
* ``tools``: the console commands (convert, inspect, export EMA / LoRA / diffusers).
"""

__all__: list[str] = []
