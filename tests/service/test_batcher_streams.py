"""The batcher under many concurrent live streams (issue 15 item 3): each stream sends a frame, waits
for its answer, sends the next, as a WebSocket client does. Checked without clocks: every frame of
every stream is answered, in order, with its own rows; batches fill up to the GPU-sized limit; and no
frame waits behind more batches than the frames queued ahead of it can fill (FIFO, no starvation)."""

from __future__ import annotations

import asyncio
import math

import torch

from tests.service.test_server_units import fake_model, run_batcher

STREAMS = 48
FRAMES = 12
PATCHES_PER_FRAME = 96  # a Ped2 frame: 8 x 12 patches of 30 x 30
FRAMES_PER_BATCH = 16


def frame_patches(stream: int, frame: int) -> torch.Tensor:
    """One frame's patches, tagged stream * 1000 + frame so a result shows whose rows it holds."""
    return torch.full((PATCHES_PER_FRAME, 1, 2, 2), float(stream * 1000 + frame))


def test_many_streams_in_order_full_batches_no_starvation() -> None:
    calls: list = []
    model = fake_model(1, calls)
    waited_batches: list[int] = []

    async def one_stream(batcher, stream: int) -> list[float]:
        answered = []
        for frame in range(FRAMES):
            calls_before = len(calls)
            raw = await batcher.score(model, frame_patches(stream, frame))
            # batches that ran while this frame waited, its own included
            waited_batches.append(len(calls) - calls_before)
            assert set(raw[:, 1].tolist()) == {float(stream * 1000 + frame)}  # its own rows
            answered.append(raw[0, 1].item())
            await asyncio.sleep(0)  # the client's turn-around before it sends the next frame
        return answered

    async def scenario(batcher):
        return await asyncio.gather(*(one_stream(batcher, s) for s in range(STREAMS)))

    answers = run_batcher(scenario, max_batch_patches=FRAMES_PER_BATCH * PATCHES_PER_FRAME,
                          max_queue_delay_s=0.002, max_queue=STREAMS)

    for stream, answered in enumerate(answers):  # every frame answered, in the stream's order
        assert answered == [float(stream * 1000 + f) for f in range(FRAMES)]
    sizes = [len(tags) // PATCHES_PER_FRAME for _, tags in calls]
    assert sum(sizes) == STREAMS * FRAMES
    assert max(sizes) <= FRAMES_PER_BATCH
    # With 48 streams always waiting, batches are formed at the limit, not frame by frame: all but
    # the ramp-up and the tail are full.
    full = sum(size == FRAMES_PER_BATCH for size in sizes)
    assert full >= len(sizes) - 2 * math.ceil(STREAMS / FRAMES_PER_BATCH), sizes
    # FIFO: at most one frame per stream is queued, so a frame waits for the batch in flight plus
    # the batches that the frames ahead of it fill, its own included.
    bound = 1 + math.ceil(STREAMS / FRAMES_PER_BATCH)
    assert max(waited_batches) <= bound, (max(waited_batches), bound)
    # within each batch, the frames of a stream appear at most once and in arrival order
    for _, tags in calls:
        frames = [int(t) for t in tags[::PATCHES_PER_FRAME]]
        streams = [f // 1000 for f in frames]
        assert len(streams) == len(set(streams))
