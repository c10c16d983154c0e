"""Run the `vbench` package on a folder of videos, one dimension at a time (a standalone script).

It runs in the Python environment that has `vbench` installed, which is usually not rcm's: vbench 0.1.5 pins
``transformers==4.33.2`` and ``numpy<2``. So it imports nothing from rcm, only vbench, torch and the standard
library; `vbench_score.run_vbench` launches it (under ``torch.distributed.run`` for several GPUs).

    python vbench_worker.py --suite t2v --videos_path V --info_json J --output_path O --dimension d1 d2 ...

Each dimension is evaluated by vbench's own ``VBench.evaluate`` (``VBenchI2V`` for the I2V suite) in mode
``vbench_standard`` with ``name=<dimension>``, so its result lands in ``O/<dimension>_eval_results.json``; a
dimension whose result file exists is skipped (resumable). vbench downloads its models on first use into
``$VBENCH_CACHE_DIR`` (default ``~/.cache/vbench``). Its folder (``sys.path[0]`` when run as a script) must
hold no module named ``vbench``: that would shadow the package (hence ``vbench_scores.py`` for our aggregator).
"""

import argparse
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["t2v", "i2v"], required=True)
    p.add_argument("--videos_path", required=True)
    p.add_argument("--info_json", required=True, help="VBench_full_info.json / vbench2_i2v_full_info.json")
    p.add_argument("--output_path", required=True)
    p.add_argument("--dimension", nargs="+", required=True)
    p.add_argument("--i2v_ratio", default="16-9", help="I2V image-suite crop ratio (1-1, 8-5, 7-4, 16-9)")
    p.add_argument("--imaging_quality_preprocessing_mode", default="longer")
    p.add_argument("--local", action="store_true", help="load vbench's models from its cache only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch  # noqa: F401  (vbench needs it; imported here so --help works without it)
    from vbench.distributed import dist_init, get_rank

    if "WORLD_SIZE" in os.environ:  # launched by torch.distributed.run: vbench splits each dimension's videos
        dist_init()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.suite == "i2v":
        from vbench2_beta_i2v import VBenchI2V

        bench = VBenchI2V(device, args.info_json, args.output_path)
        extra = {"resolution": args.i2v_ratio}
    else:
        from vbench import VBench

        bench = VBench(device, args.info_json, args.output_path)
        extra = {}
    for dim in args.dimension:
        result = os.path.join(args.output_path, f"{dim}_eval_results.json")
        if os.path.isfile(result):
            if get_rank() == 0:
                print(f"[vbench worker] {dim}: {result} exists, skipped", flush=True)
            continue
        if get_rank() == 0:
            print(f"[vbench worker] evaluating {dim}", flush=True)
        bench.evaluate(videos_path=args.videos_path, name=dim, dimension_list=[dim], local=args.local,
                       mode="vbench_standard",
                       imaging_quality_preprocessing_mode=args.imaging_quality_preprocessing_mode, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
