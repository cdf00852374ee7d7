"""`vad bench`: one run that measures the whole path, from the machine's matmul roofline to the wire.

Sections (each prints a line as it finishes; ``--json`` writes them all), one module each:
- ``roofline_gflops`` (roofline.py): float32 matmul GFLOP/s of this machine, in this run, with the
  threads the model path uses;
- ``model`` (model_path.py): the networks' FLOPs per frame (FlopCounterMode on R and D, what scoring
  needs), frames/s of ``PatchScorer.raw_scores`` at the best of 1, 2, 4, 8, 16 frames per batch, GFLOP/s
  and the fraction of the roofline; ``cuda`` on a GPU: each precision, with and without CUDA graphs;
- ``ablation`` (ablation.py): each CPU inference optimisation added in turn;
- ``naive`` (model_path.py): the same networks (unfused modules) scoring one patch at a time, as a
  sliding-window loop does, with the same input encoding; ``speedup`` = the project's full scoring
  path (``full``, full_path.py: FrameStream, encoding, batching, skipping unchanged patches where on)
  over it, end to end on Ped2 test clips (footage.py), with the EER the full path reaches there;
- ``finishing`` (full_path.py): what finishing a single-frame stream chunk costs, one by one and
  256 together (the batcher's way with the torch encoding);
- ``service`` (service_path.py): frames/s of ``POST /v1/clips`` on a real server (a `vad serve`
  subprocess on loopback, server_process.py) and its ratio to the model path; ``streams``: per-frame
  latency of K WebSocket streams at 10 frames/s; ``max_realtime_streams``; ``cameras`` (cameras.py):
  how many 10 fps cameras (looped Ped2 clips) the server watches with p99 capture-to-score lag under
  1 s, ``max_cameras_held`` and ``rss_mb_per_camera``; ``peak_rss_mb`` of the server's processes
  (summed, with ``--processes N``: ``service_processes``).

run.py runs them in order. Figures are from this run only: compare ratios, not absolute numbers from
other machines.
"""

from service.bench.run import run_bench

__all__ = ["run_bench"]
